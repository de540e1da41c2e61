//! What a session needs from its connection, whatever the framing: TCP (STARTTLS or Direct TLS)
//! here, WebSocket in `listener::websocket`. One session implementation drives them all.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::sasl::scram::ChannelBindings;
use crate::stream::reader::Limits;
use crate::stream::{writer, StreamError, StreamErrorKind, StreamEvent, XmlReader};
use crate::tls::Tls;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Stream(StreamError),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

pub trait Transport: Send {
    /// The next stream event, `None` at end of input. Cancel-safe: no input is lost if the
    /// future is dropped.
    fn next_event(
        &mut self,
    ) -> impl Future<Output = Result<Option<StreamEvent>, TransportError>> + Send;
    /// Queues serialised data (a stanza or nonza) for writing; `flush` sends it.
    fn write(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    fn flush(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends the server's stream header (or `<open/>`).
    fn open(
        &mut self,
        id: &str,
        from: &str,
        to: Option<&str>,
    ) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a stream error if any, then the closing tag, and shuts the connection down.
    fn close(&mut self, err: Option<&StreamError>) -> impl Future<Output = ()> + Send;
    /// A stream restart (after STARTTLS or SASL): the next event is a new header.
    fn restart(&mut self);
    /// Total bytes received so far.
    fn bytes_in(&self) -> u64;
    /// Refuse input once `bytes_in` passes `limit` (the pre-authentication budget), checked as
    /// bytes arrive, whether or not they complete an element.
    fn set_read_limit(&mut self, limit: Option<u64>);
    fn peer(&self) -> SocketAddr;
    fn is_secure(&self) -> bool;
    /// Whether SASL may proceed on this connection as it is now.
    fn auth_allowed(&self) -> bool;
    fn can_starttls(&self) -> bool;
    fn starttls(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
    fn bindings(&self) -> ChannelBindings;
    /// Called when the session has nothing to do: release what can be rebuilt cheaply.
    fn idle(&mut self);
    /// Called when the session has read nothing for a while: release what can be rebuilt,
    /// even at some cost (the stream parser).
    fn release(&mut self) {}
    fn transport_name(&self) -> &'static str;
}

/// The error for input beyond the read limit.
pub fn check_read_limit(bytes_in: u64, limit: Option<u64>) -> Result<(), TransportError> {
    match limit {
        Some(l) if bytes_in > l => Err(TransportError::Stream(StreamError::new(
            StreamErrorKind::PolicyViolation,
            "too much data before authentication",
        ))),
        _ => Ok(()),
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only during the STARTTLS handshake.
    Upgrading,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Upgrading => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Upgrading => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// Size of the read buffer. Small on purpose: an idle session should cost a few KiB, and TLS
/// already buffers whole records inside rustls.
const READ_BUF: usize = 2048;

/// TCP framing: `<stream:stream>` over a byte stream, plain or TLS.
pub struct TcpTransport {
    io: Io,
    /// `None` while released between stanzas by an idle session ([`Transport::release`]); rebuilt
    /// when input arrives. Boxed so that a released one costs no room in the session.
    reader: Option<Box<XmlReader>>,
    limits: Limits,
    /// Allocated while there is unparsed input or a read in progress; dropped when idle on a
    /// plain socket.
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    bytes_in: u64,
    read_limit: Option<u64>,
    peer: SocketAddr,
    tls: Option<Tls>,
    require_tls: bool,
    bindings: ChannelBindings,
    direct_tls: bool,
}

impl TcpTransport {
    fn new(io: Io, peer: SocketAddr, tls: Option<Tls>, require_tls: bool, limits: Limits) -> Self {
        TcpTransport {
            io,
            reader: Some(Box::new(XmlReader::new(limits))),
            limits,
            buf: Vec::new(),
            pos: 0,
            len: 0,
            bytes_in: 0,
            read_limit: None,
            peer,
            tls,
            require_tls,
            bindings: ChannelBindings::default(),
            direct_tls: false,
        }
    }

    /// A c2s connection that may upgrade with STARTTLS (when `tls` is given).
    pub fn plain(
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<Tls>,
        require_tls: bool,
        limits: Limits,
    ) -> Self {
        Self::new(Io::Plain(stream), peer, tls, require_tls, limits)
    }

    /// A Direct TLS (XEP-0368) connection, handshake done.
    pub fn direct_tls(
        stream: TlsStream<TcpStream>,
        peer: SocketAddr,
        tls: &Tls,
        limits: Limits,
    ) -> Self {
        let bindings = tls.bindings(stream.get_ref().1);
        let mut t = Self::new(Io::Tls(Box::new(stream)), peer, None, true, limits);
        t.bindings = bindings;
        t.direct_tls = true;
        t
    }
}

impl Transport for TcpTransport {
    async fn next_event(&mut self) -> Result<Option<StreamEvent>, TransportError> {
        loop {
            if self.pos < self.len {
                let reader = match &mut self.reader {
                    Some(r) => r,
                    None => self.reader.insert(Box::new(
                        XmlReader::after_header(self.limits).map_err(TransportError::Stream)?,
                    )),
                };
                let mut input = &self.buf[self.pos..self.len];
                let r = reader.next(&mut input);
                self.pos = self.len - input.len();
                match r {
                    Ok(Some(ev)) => return Ok(Some(ev)),
                    Ok(None) => {}
                    Err(e) => return Err(TransportError::Stream(e)),
                }
            }
            let n = match &mut self.io {
                Io::Plain(tcp) => {
                    // Wait for readiness without a buffer, so an idle session holds none
                    // (rustls buffers records itself, so TLS reads directly). A read that finds
                    // nothing drops the buffer and waits; `try_read` clears the readiness it
                    // reports, so a spurious wake-up costs a wait, never a spin.
                    if self.buf.is_empty() {
                        tcp.readable().await?;
                        self.buf = vec![0; READ_BUF];
                    }
                    match tcp.try_read(&mut self.buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.buf = Vec::new();
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                io => {
                    if self.buf.is_empty() {
                        self.buf = vec![0; READ_BUF];
                    }
                    io.read(&mut self.buf).await?
                }
            };
            if n == 0 {
                return Ok(None);
            }
            self.bytes_in += n as u64;
            check_read_limit(self.bytes_in, self.read_limit)?;
            self.pos = 0;
            self.len = n;
        }
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    async fn open(&mut self, id: &str, from: &str, to: Option<&str>) -> io::Result<()> {
        self.io
            .write_all(writer::stream_header(id, from, to).as_bytes())
            .await
    }

    async fn close(&mut self, err: Option<&StreamError>) {
        let mut out = String::new();
        if let Some(e) = err {
            out.push_str(&writer::stream_error(e));
        }
        out.push_str(writer::STREAM_FOOTER);
        let _ = self.io.write_all(out.as_bytes()).await;
        let _ = self.io.flush().await;
        let _ = self.io.shutdown().await;
    }

    fn restart(&mut self) {
        self.reader = Some(Box::new(XmlReader::new(self.limits)));
    }

    fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    fn set_read_limit(&mut self, limit: Option<u64>) {
        self.read_limit = limit;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn is_secure(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    fn auth_allowed(&self) -> bool {
        self.is_secure() || !self.require_tls
    }

    fn can_starttls(&self) -> bool {
        matches!(self.io, Io::Plain(_)) && self.tls.is_some()
    }

    async fn starttls(&mut self) -> Result<(), TransportError> {
        let tls = self.tls.take().ok_or_else(|| {
            TransportError::Stream(StreamError::new(
                StreamErrorKind::PolicyViolation,
                "TLS is not available",
            ))
        })?;
        let rest = &self.buf[self.pos.min(self.len)..self.len];
        if rest
            .iter()
            .any(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        {
            // Bytes pipelined after <starttls/> were sent in the clear and cannot be trusted
            // (the STARTTLS command-injection attack): refuse rather than process them.
            return Err(TransportError::Stream(StreamError::new(
                StreamErrorKind::PolicyViolation,
                "data sent after <starttls/> before the TLS handshake",
            )));
        }
        self.pos = 0;
        self.len = 0;
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Upgrading) else {
            return Err(TransportError::Io(io::ErrorKind::NotConnected.into()));
        };
        let stream = tls.acceptor.accept(tcp).await?;
        self.bindings = tls.bindings(stream.get_ref().1);
        self.io = Io::Tls(Box::new(stream));
        self.reader = Some(Box::new(XmlReader::new(self.limits)));
        self.buf = Vec::new();
        Ok(())
    }

    fn bindings(&self) -> ChannelBindings {
        self.bindings.clone()
    }

    fn idle(&mut self) {
        if self.pos >= self.len {
            self.buf = Vec::new();
            self.pos = 0;
            self.len = 0;
            if let Some(r) = self.reader.as_mut() {
                r.shrink();
            }
        }
    }

    fn release(&mut self) {
        if self.pos >= self.len && self.reader.as_ref().is_some_and(|r| r.releasable()) {
            self.reader = None;
        }
    }

    fn transport_name(&self) -> &'static str {
        if self.direct_tls {
            "direct-tls"
        } else {
            "tcp"
        }
    }
}
