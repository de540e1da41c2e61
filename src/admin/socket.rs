//! The admin socket: one JSON request per line, one JSON response per line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{execute, Context, Request, Response};
use crate::server::Server;

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the socket, replacing a stale one left by a killed server.
pub async fn bind(data_dir: &Path) -> anyhow::Result<UnixListener> {
    let p = path(data_dir);
    if p.exists() {
        if UnixStream::connect(&p).await.is_ok() {
            anyhow::bail!("another halyard is serving {} (stop it first)", p.display());
        }
        std::fs::remove_file(&p)
            .with_context(|| format!("cannot remove stale socket {}", p.display()))?;
    }
    let l = UnixListener::bind(&p)
        .with_context(|| format!("cannot bind admin socket {}", p.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", p.display()))?;
    }
    Ok(l)
}

/// Whether the peer may use the socket: the server's own user, or root. The socket's mode (0600)
/// says the same, but only from just after `bind`; this also covers a connection made before
/// the mode was set.
fn peer_allowed(stream: &UnixStream, owner: Option<u32>) -> bool {
    match (stream.peer_cred(), owner) {
        (Ok(cred), Some(owner)) => cred.uid() == owner || cred.uid() == 0,
        // Without credentials to compare, the socket's mode is what protects it.
        _ => true,
    }
}

pub async fn serve(listener: UnixListener, server: Arc<Server>) {
    let mut shutdown = server.shutdown.clone();
    // The socket file belongs to the user the server runs as.
    let owner = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path(&server.config.data_dir))
            .ok()
            .map(|m| m.uid())
    };
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                if !peer_allowed(&stream, owner) {
                    let uid = stream.peer_cred().map(|c| c.uid()).ok();
                    tracing::warn!(?uid, "admin socket connection from another user refused");
                    continue;
                }
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &server).await {
                        tracing::warn!(error = %e, "admin socket request failed");
                    }
                });
            }
            _ = crate::server::until_shutdown(&mut shutdown) => return,
        }
    }
}

async fn handle(stream: UnixStream, server: &Server) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let ctx = Context {
                    stores: &server.stores,
                    server: Some(server),
                    domains: &server.config.domains,
                    scram_iterations: server.config.auth.scram_iterations,
                };
                execute(&ctx, req).await
            }
            Err(e) => Response::err(format!("bad admin request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

/// Sends `req` to a running server. `Ok(None)` when no server is listening (no socket, or a
/// stale one).
pub async fn request(data_dir: &Path, req: &Request) -> anyhow::Result<Option<Response>> {
    let p = path(data_dir);
    let Ok(stream) = UnixStream::connect(&p).await else {
        return Ok(None);
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .context("writing to the admin socket")?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines
        .next_line()
        .await
        .context("reading from the admin socket")?
        .context("the server closed the admin socket")?;
    Ok(Some(
        serde_json::from_str(&resp).context("bad answer on the admin socket")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_servers_user_or_root_may_connect() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let me = a.peer_cred().expect("credentials").uid();
        assert!(peer_allowed(&a, Some(me)), "the server's own user");
        if me == 0 {
            assert!(
                peer_allowed(&a, Some(12345)),
                "root, whoever runs the server"
            );
        } else {
            assert!(!peer_allowed(&a, Some(me + 1)), "another user is refused");
        }
        assert!(peer_allowed(&a, None), "no owner known: the mode decides");
    }
}
