//! Acceptors: c2s with STARTTLS, c2s with Direct TLS (XEP-0368), and HTTP(S) for WebSocket.
//! Each accepted connection becomes one session task (`c2s::run`).

pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::c2s::{self, TcpTransport};
use crate::limits::{ConnSlot, Refusal, REFUSAL_TIMEOUT};
use crate::server::Server;
use crate::stream::reader::Limits;

/// Longest time a peer gets to complete a TLS handshake (Direct TLS, HTTPS); one that stalls
/// mid-handshake is dropped. Shorter when `c2s.preauth_timeout_secs` is.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// The handshake timeout in force: [`TLS_HANDSHAKE_TIMEOUT`] or the pre-authentication
/// timeout, whichever is shorter.
pub fn tls_handshake_timeout(server: &Server) -> Duration {
    TLS_HANDSHAKE_TIMEOUT.min(server.config.c2s.preauth_timeout())
}

pub fn limits(server: &Server) -> Limits {
    Limits {
        max_stanza_bytes: server.config.c2s.max_stanza_bytes,
        max_depth: server.config.c2s.max_depth,
        max_attributes: server.config.c2s.max_attributes,
        max_attribute_bytes: server.config.c2s.max_attribute_bytes,
    }
}

/// Pending connections the kernel queues per listener before `accept` (capped by the kernel's
/// `net.core.somaxconn`). Tokio's default of 1024 overflowed in login bursts: the dropped SYNs
/// are retried after a second, which showed as one-second logins.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener, saying which option to change when it fails.
pub async fn bind(addr: SocketAddr, kind: &str) -> anyhow::Result<TcpListener> {
    let fail = |e: std::io::Error| {
        anyhow::anyhow!("cannot listen on {addr} for {kind}: {e} (change listeners.{kind} in the config or pass --{})", kind.replace('_', "-"))
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    // As std and tokio do for listeners: a restarted server can bind while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(fail)?;
    socket.bind(addr).map_err(fail)?;
    socket.listen(LISTEN_BACKLOG).map_err(fail)
}

/// How a refused connection is told why.
#[derive(Clone, Copy)]
enum Refuse {
    /// A c2s stream in the clear (STARTTLS port): header, then the stream error.
    Plain,
    /// Direct TLS: the handshake first.
    Tls,
}

async fn accept_loop<F, Fut>(listener: TcpListener, server: Arc<Server>, refuse: Refuse, handle: F)
where
    F: Fn(Arc<Server>, TcpStream, SocketAddr, ConnSlot) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut shutdown = server.shutdown.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match server.admit_connection(peer) {
                        Ok(slot) => {
                            tokio::spawn(handle(server.clone(), stream, peer, slot));
                        }
                        Err(why) => refused(&server, stream, peer, why, refuse),
                    }
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = crate::server::until_shutdown(&mut shutdown) => return,
        }
    }
}

/// While few are being told, tells a refused client why with a stream error; otherwise (a
/// flood) just closes the connection.
fn refused(server: &Arc<Server>, stream: TcpStream, peer: SocketAddr, why: Refusal, how: Refuse) {
    let Some(told) = server.conn_limiter.refusal_slot() else {
        return;
    };
    let server = server.clone();
    tokio::spawn(async move {
        let _told = told;
        let err = why.stream_error();
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            match how {
                Refuse::Plain => {
                    let t = TcpTransport::plain(stream, peer, None, true, limits(&server));
                    c2s::refuse(&server, t, err).await
                }
                Refuse::Tls => {
                    let Some(tls) = server.tls.clone() else {
                        return;
                    };
                    if let Ok(s) = tls.acceptor.accept(stream).await {
                        let t = TcpTransport::direct_tls(s, peer, &tls, limits(&server));
                        c2s::refuse(&server, t, err).await
                    }
                }
            }
        })
        .await;
    });
}

/// Spawns the c2s (STARTTLS) accept loop.
pub fn spawn_c2s(set: &mut JoinSet<()>, listener: TcpListener, server: Arc<Server>) {
    set.spawn(accept_loop(
        listener,
        server,
        Refuse::Plain,
        |server, stream, peer, slot| async move {
            let t = TcpTransport::plain(
                stream,
                peer,
                server.tls.clone(),
                server.config.c2s.require_tls,
                limits(&server),
            );
            c2s::run(server, t, Some(slot)).await
        },
    ));
}

/// Spawns the Direct TLS accept loop.
pub fn spawn_c2s_tls(set: &mut JoinSet<()>, listener: TcpListener, server: Arc<Server>) {
    set.spawn(accept_loop(
        listener,
        server,
        Refuse::Tls,
        |server, stream, peer, slot| async move {
            let Some(tls) = server.tls.clone() else {
                return;
            };
            match tokio::time::timeout(tls_handshake_timeout(&server), tls.acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => {
                    let t = TcpTransport::direct_tls(s, peer, &tls, limits(&server));
                    c2s::run(server, t, Some(slot)).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        },
    ));
}
