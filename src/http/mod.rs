//! The general HTTP service: one axum router on the HTTP and HTTPS listeners, assembled from
//! the routes of each service (WebSocket now; BOSH, discovery, uploads, the API, metrics and the
//! web client as they come). Each service lives in its own module and contributes a
//! `routes() -> Router<HttpState>`.

pub mod upload;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::limits::ConnSlot;
use crate::server::Server;

pub mod api;
pub mod bosh;
pub mod discovery;
pub mod metrics;
pub mod webclient;

/// What every HTTP handler gets.
#[derive(Clone)]
pub struct HttpState {
    pub server: Arc<Server>,
    /// The listener terminates TLS itself.
    pub secure: bool,
}

/// The routes served on the HTTP(S) listeners.
fn router(server: Arc<Server>, secure: bool) -> Router {
    Router::new()
        .merge(crate::listener::websocket::routes())
        .merge(webclient::routes(&server))
        .merge(crate::http::bosh::routes())
        .merge(crate::http::discovery::routes())
        .merge(crate::http::upload::routes())
        .merge(crate::http::api::routes())
        .merge(crate::http::metrics::routes())
        .with_state(HttpState { server, secure })
}

/// The address of the peer, from whichever listener accepted it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, CountedListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, CountedListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

/// CORS headers for services a web client on another origin uses (BOSH, uploads): any origin,
/// the given methods, `Content-Type` as a request header.
pub fn cors(h: &mut axum::http::HeaderMap, methods: &'static str) {
    use axum::http::{header, HeaderValue};
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(methods),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
}

/// Loopback and configured reverse proxies may authenticate over plain HTTP: they terminate TLS
/// in front of us.
pub fn is_trusted(server: &Server, ip: IpAddr) -> bool {
    ip.is_loopback() || server.config.http.trusted_proxies.contains(&ip)
}

/// A connection that holds its place under the connection limits (`[limits]`) while open.
pub struct Counted<S> {
    io: S,
    _slot: ConnSlot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Admits an accepted HTTP connection under the connection limits. A refused one is closed at
/// once: before a request there is no way to tell it why that every client understands.
fn admit(server: &Server, peer: SocketAddr) -> Option<ConnSlot> {
    server.admit_connection(peer).ok()
}

/// Plain HTTP connections, counted under the connection limits.
pub struct CountedListener {
    inner: TcpListener,
    server: Arc<Server>,
}

impl axum::serve::Listener for CountedListener {
    type Io = Counted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((io, peer)) => {
                    if let Some(slot) = admit(&self.server, peer) {
                        let _ = io.set_nodelay(true);
                        return (Counted { io, _slot: slot }, peer);
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves plain HTTP on `listener`.
pub fn spawn_http(set: &mut JoinSet<()>, listener: TcpListener, server: Arc<Server>) {
    let mut shutdown = server.shutdown.clone();
    let counted = CountedListener {
        inner: listener,
        server: server.clone(),
    };
    let app = router(server, false).into_make_service_with_connect_info::<Peer>();
    set.spawn(async move {
        let r = axum::serve(counted, app)
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
    rx: mpsc::Receiver<(
        Counted<tokio_rustls::server::TlsStream<TcpStream>>,
        SocketAddr,
    )>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = Counted<tokio_rustls::server::TlsStream<TcpStream>>;
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
    let acceptor_server = server.clone();
    let handshake = crate::listener::tls_handshake_timeout(&server);
    let mut shutdown = server.shutdown.clone();
    set.spawn(async move {
        loop {
            tokio::select! {
                r = listener.accept() => {
                    let Ok((stream, peer)) = r else { continue };
                    let Some(slot) = admit(&acceptor_server, peer) else { continue };
                    let _ = stream.set_nodelay(true);
                    let (tls, tx) = (tls.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Ok(Ok(io)) = tokio::time::timeout(handshake, tls.acceptor.accept(stream)).await {
                            let _ = tx.send((Counted { io, _slot: slot }, peer)).await;
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
