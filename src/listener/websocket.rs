//! RFC 7395 XMPP over WebSocket at `/xmpp-websocket`, on the HTTP and HTTPS listeners (axum).
//!
//! Framing: subprotocol `xmpp`, one complete element per text message, `<open/>`/`<close/>`
//! instead of the stream tags. The session itself is the same as for TCP (`c2s::run`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::SinkExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::c2s::{self, Transport, TransportError};
use crate::sasl::scram::ChannelBindings;
use crate::server::Server;
use crate::stream::reader::{parse_element, Limits};
use crate::stream::{writer, StreamError, StreamErrorKind, StreamEvent};
use halyard_xep::ns;

#[derive(Clone)]
struct HttpState {
    server: Arc<Server>,
    /// The listener terminates TLS itself.
    secure: bool,
}

/// The routes served on the HTTP(S) listeners.
fn router(server: Arc<Server>, secure: bool) -> Router {
    Router::new()
        .route("/xmpp-websocket", get(upgrade))
        .with_state(HttpState { server, secure })
}

/// The address of the peer, from whichever listener accepted it.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    State(st): State<HttpState>,
    headers: HeaderMap,
) -> Response {
    let allowed = &st.server.config.http.websocket_origins;
    if !allowed.is_empty() {
        let origin = headers
            .get("origin")
            .and_then(|o| o.to_str().ok())
            .unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    let ws = ws.protocols(["xmpp"]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol 'xmpp' is required (RFC 7395)",
        )
            .into_response();
    }
    let server = st.server.clone();
    let trusted = st.secure || is_trusted(&server, peer.ip());
    let limits = crate::listener::limits(&server);
    ws.max_message_size(server.config.c2s.max_stanza_bytes + 1024)
        .on_upgrade(move |socket| async move {
            let t = WsTransport {
                ws: socket,
                peer,
                secure: st.secure,
                auth_allowed: trusted,
                limits,
                bytes_in: 0,
                read_limit: None,
            };
            c2s::run(server, t).await
        })
        .into_response()
}

/// Loopback and configured reverse proxies may authenticate over plain HTTP: they terminate TLS
/// in front of us.
fn is_trusted(server: &Server, ip: IpAddr) -> bool {
    ip.is_loopback() || server.config.http.trusted_proxies.contains(&ip)
}

pub struct WsTransport {
    ws: WebSocket,
    peer: SocketAddr,
    secure: bool,
    auth_allowed: bool,
    limits: Limits,
    bytes_in: u64,
    read_limit: Option<u64>,
}

impl Transport for WsTransport {
    async fn next_event(&mut self) -> Result<Option<StreamEvent>, TransportError> {
        loop {
            let msg = match self.ws.recv().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(TransportError::Io(io::Error::other(e))),
                Some(Ok(m)) => m,
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    return Err(TransportError::Stream(StreamError::new(
                        StreamErrorKind::BadFormat,
                        "RFC 7395 carries XML in text messages only",
                    )))
                }
                Message::Close(_) => return Ok(None),
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            self.bytes_in += text.len() as u64;
            crate::c2s::transport::check_read_limit(self.bytes_in, self.read_limit)?;
            if text.as_str().trim().is_empty() {
                // Whitespace keepalive.
                continue;
            }
            let el = parse_element(text.as_bytes(), self.limits).map_err(TransportError::Stream)?;
            if el.is("open", ns::FRAMING) {
                return Ok(Some(StreamEvent::Open(el)));
            }
            if el.is("close", ns::FRAMING) {
                return Ok(Some(StreamEvent::Close));
            }
            if el.is("stream", ns::STREAM) {
                return Err(TransportError::Stream(StreamError::new(
                    StreamErrorKind::InvalidNamespace,
                    "WebSocket framing uses <open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
                )));
            }
            return Ok(Some(StreamEvent::Element(el)));
        }
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(data).into_owned();
        self.ws
            .feed(Message::Text(text.into()))
            .await
            .map_err(io::Error::other)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.ws.flush().await.map_err(io::Error::other)
    }

    async fn open(&mut self, id: &str, from: &str, to: Option<&str>) -> io::Result<()> {
        self.ws
            .send(Message::Text(writer::ws_open(id, from, to).into()))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self, err: Option<&StreamError>) {
        if let Some(e) = err {
            let _ = self
                .ws
                .feed(Message::Text(writer::ws_stream_error(e).into()))
                .await;
        }
        let _ = self.ws.feed(Message::Text(writer::ws_close().into())).await;
        let _ = self.ws.close().await;
    }

    fn restart(&mut self) {}

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
        self.secure || self.auth_allowed
    }

    fn auth_allowed(&self) -> bool {
        self.auth_allowed
    }

    fn can_starttls(&self) -> bool {
        false
    }

    async fn starttls(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Stream(StreamError::new(
            StreamErrorKind::PolicyViolation,
            "no STARTTLS over WebSocket",
        )))
    }

    fn bindings(&self) -> ChannelBindings {
        // The TLS session (ours or a proxy's) is not visible at this layer: no -PLUS here.
        ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: None,
            tls: self.is_secure(),
        }
    }

    fn idle(&mut self) {}

    fn transport_name(&self) -> &'static str {
        "websocket"
    }
}

/// Serves plain HTTP on `listener`.
pub fn spawn_http(set: &mut JoinSet<()>, listener: TcpListener, server: Arc<Server>) {
    let mut shutdown = server.shutdown.clone();
    let app = router(server, false).into_make_service_with_connect_info::<Peer>();
    set.spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                crate::server::until_shutdown(&mut shutdown).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });
}

/// A listener that completes TLS handshakes in their own tasks, so a slow handshake cannot hold
/// up the others, and yields finished TLS streams to axum.
pub struct TlsListener {
    rx: mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor task only ends at shutdown; park until axum is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves HTTPS on `listener`.
pub fn spawn_https(
    set: &mut JoinSet<()>,
    listener: TcpListener,
    server: Arc<Server>,
) -> anyhow::Result<()> {
    let Some(tls) = server.tls.clone() else {
        anyhow::bail!("HTTPS needs TLS certificates")
    };
    let local = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    let mut shutdown = server.shutdown.clone();
    set.spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((stream, peer)) = r else { continue };
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Ok(Ok(s)) = tokio::time::timeout(std::time::Duration::from_secs(15), tls.acceptor.accept(stream)).await {
                            let _ = tx.send((s, peer)).await;
                        }
                    });
                }
                _ = crate::server::until_shutdown(&mut shutdown) => return,
            }
        }
    });
    let mut shutdown = server.shutdown.clone();
    let app = router(server, true).into_make_service_with_connect_info::<Peer>();
    set.spawn(async move {
        let r = axum::serve(TlsListener { rx, local }, app)
            .with_graceful_shutdown(async move {
                crate::server::until_shutdown(&mut shutdown).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTPS listener failed");
        }
    });
    Ok(())
}
