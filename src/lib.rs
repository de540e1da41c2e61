//! Halyard, an XMPP server.
//!
//! How the code is laid out (and the path a message takes through it):
//!
//! - [`listener`] accepts TCP (STARTTLS) and Direct TLS connections, and [`http`] serves the
//!   HTTP(S) listeners (WebSocket, BOSH, host-meta, uploads, the web client); each XMPP
//!   connection becomes a session task in [`c2s`], which negotiates TLS, SASL ([`sasl`]) and
//!   resource binding over a [`c2s::Transport`] (framing in [`stream`]: our own reader with byte
//!   and depth limits on top of rxml/minidom). A bound session outlives its connection when the
//!   client enabled XEP-0198 resumption ([`c2s::sm`]).
//! - A bound session hands each stanza to the [`router`], which stamps `from`, classifies the
//!   address (host, bare, full), answers for unknown accounts and domains, then runs the
//!   handlers that modules registered. Modules live in the `halyard-xep` crate, one file per
//!   XEP, and see the core only through its `Host` trait, which [`server::Server`] implements.
//! - Delivery goes through the [`sessions`] table: every bound resource has a bounded queue
//!   ([`outbound`]);
//!   a stanza is serialised once and its bytes shared by every queue it goes to.
//! - Components own a domain of their own: the push app server ([`appserver`]) and file upload
//!   ([`upload`]).
//! - Persistence goes through store traits ([`store`]); sled is the embedded backend.
//! - [`admin`] holds the commands behind `halyard user ...`, served on `<data_dir>/admin.sock`
//!   by a running server.
//!
//! [`serve`] runs a node until its shutdown signal.

pub mod admin;
pub mod appserver;
pub mod c2s;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod limits;
pub mod listener;
pub mod maintenance;
pub mod outbound;
pub mod router;
pub mod sasl;
pub mod server;
pub mod sessions;
pub mod store;
pub mod stream;
pub mod tls;
pub mod upload;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinSet;

use config::Config;
use server::Server;
use store::Stores;

/// The addresses a running node listens on (port 0 resolved).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub c2s: Vec<SocketAddr>,
    pub c2s_tls: Vec<SocketAddr>,
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Installs the process-wide rustls crypto provider (ring). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Starts a node: opens the store, loads or generates certificates, binds every listener, and
/// returns once all are bound. `ready` receives the bound addresses. The returned future runs
/// until `shutdown` turns true, then closes every session with `system-shutdown`, flushes
/// storage and returns (within about two seconds).
pub async fn serve(
    config: Config,
    shutdown: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    serve_with_stores(config, |s| s, shutdown, ready).await
}

/// [`serve`] with the opened stores passed through `wrap` before the node uses them (tests wrap
/// them to inject faults: [`store::faults`]).
pub async fn serve_with_stores(
    mut config: Config,
    wrap: impl FnOnce(Stores) -> Stores + Send,
    shutdown: watch::Receiver<bool>,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    install_crypto_provider();
    config.validate()?;
    if !config.c2s.require_tls {
        tracing::warn!("c2s.require_tls is off: passwords may cross the network in the clear; use this for loopback benchmarks only");
    }
    let mut stores = wrap(Stores::open_sled(
        &config.data_dir,
        config.group_commit(),
        config.cache_bytes(),
    )?);
    if config.storage.min_free_mb > 0 {
        let switch = store::faults::FaultSwitch::new();
        store::diskguard::spawn(
            config.data_dir.clone(),
            config.storage.min_free_mb.saturating_mul(1024 * 1024),
            switch.clone(),
            shutdown.clone(),
        );
        stores = stores.with_faults(switch, config.group_commit());
    }
    let tls = tls::load(&config.certs_dir, &config.domains)?;
    // A session asks for channel bindings at most this long after its handshake began: Direct
    // TLS and HTTPS handshakes are cut at 15 s at most, STARTTLS ones by the pre-authentication timeout.
    tls.set_handshake_window(
        config
            .c2s
            .preauth_timeout()
            .max(listener::TLS_HANDSHAKE_TIMEOUT)
            + Duration::from_secs(1),
    );
    let server = Arc::new(Server::new(
        config.clone(),
        stores.clone(),
        Some(tls),
        shutdown.clone(),
    )?);
    if let Some(a) = &server.appserver {
        let weak = Arc::downgrade(&server);
        let host: std::sync::Weak<dyn halyard_xep::host::Host> = weak;
        a.attach(host);
    }
    tracing::info!(modules = ?server.registry.modules(), domains = ?config.domains, "starting");

    let mut set = JoinSet::new();
    let mut bound = Bound::default();
    for addr in &config.listeners.c2s {
        let l = listener::bind(*addr, "c2s").await?;
        bound.c2s.push(l.local_addr()?);
        listener::spawn_c2s(&mut set, l, server.clone());
    }
    for addr in &config.listeners.c2s_tls {
        let l = listener::bind(*addr, "c2s_tls").await?;
        bound.c2s_tls.push(l.local_addr()?);
        listener::spawn_c2s_tls(&mut set, l, server.clone());
    }
    for addr in &config.listeners.http {
        let l = listener::bind(*addr, "http").await?;
        bound.http.push(l.local_addr()?);
        http::spawn_http(&mut set, l, server.clone());
    }
    for addr in &config.listeners.https {
        let l = listener::bind(*addr, "https").await?;
        bound.https.push(l.local_addr()?);
        http::spawn_https(&mut set, l, server.clone())?;
    }
    let public_url = if !config.http.public_url.is_empty() {
        config.http.public_url.trim_end_matches('/').to_string()
    } else if let Some(a) = bound.https.first() {
        format!("https://{}:{}", config.primary_domain(), a.port())
    } else if let Some(a) = bound.http.first() {
        format!("http://{}:{}", config.primary_domain(), a.port())
    } else {
        String::new()
    };
    let _ = server.public_url.set(public_url);
    if let Some(u) = &server.upload {
        // XEP-0363: slots are built from the public URL; expired files and slots are removed.
        u.set_base_url(server.public_url());
        set.spawn(upload::expiry(u.clone(), shutdown.clone()));
    }
    let admin = admin::socket::bind(&config.data_dir).await?;
    set.spawn(admin::socket::serve(admin, server.clone()));
    {
        // XEP-0357: the notification queue's worker, for the node's lifetime; it resumes what
        // the queue holds from before a restart.
        let host: Arc<dyn halyard_xep::Host> = server.clone();
        let mut sd = shutdown.clone();
        set.spawn(async move {
            tokio::select! {
                _ = halyard_xep::push::worker(host) => {}
                _ = crate::server::until_shutdown(&mut sd) => {}
            }
        });
    }
    if config.archive.expire_after > 0 {
        set.spawn(maintenance::retention(
            server.clone(),
            config.archive.expire_after,
        ));
    }

    // SIGHUP reloads the certificates (before the `listening` line, so that a SIGHUP sent once
    // it is logged can no longer end the process).
    #[cfg(unix)]
    spawn_reload_on_sighup(&mut set, server.clone());

    tracing::info!(
        "listening c2s={} c2s_tls={} http={} https={}",
        join(&bound.c2s),
        join(&bound.c2s_tls),
        join(&bound.http),
        join(&bound.https)
    );
    if let Some(tx) = ready {
        let _ = tx.send(bound);
    }

    let mut sd = shutdown.clone();
    crate::server::until_shutdown(&mut sd).await;
    tracing::info!(
        connections = server.connections.load(Ordering::Relaxed),
        "shutting down"
    );
    // Sessions see the same signal and send system-shutdown themselves; give them a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while server.connections.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set.abort_all();
    if let Err(e) = (server.stores.flush)() {
        tracing::error!(error = %e, "flushing storage at shutdown failed");
    }
    let _ = std::fs::remove_file(admin::socket::path(&config.data_dir));
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads every domain's certificate and key on each SIGHUP (see [`tls::Tls::reload`]); a
/// failed reload keeps the certificates served so far.
#[cfg(unix)]
fn spawn_reload_on_sighup(set: &mut JoinSet<()>, server: Arc<Server>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: certificates will not be reloaded");
            return;
        }
    };
    let mut sd = server.shutdown.clone();
    set.spawn(async move {
        loop {
            tokio::select! {
                r = hup.recv() => {
                    if r.is_none() {
                        return;
                    }
                    tracing::info!("SIGHUP: reloading TLS certificates");
                    // The outcome is logged by the reload itself.
                    let _ = reload_certificates(&server).await;
                }
                _ = crate::server::until_shutdown(&mut sd) => return,
            }
        }
    });
}

/// Reloads the server's certificates off the runtime's threads (file reads); the outcome is
/// logged. What SIGHUP and `halyard reload-certs` do.
pub async fn reload_certificates(server: &Server) -> anyhow::Result<Vec<String>> {
    let Some(tls) = server.tls.clone() else {
        anyhow::bail!("this server has no TLS");
    };
    tokio::task::spawn_blocking(move || tls.reload())
        .await
        .context("the certificate reload task failed")?
}

#[cfg(test)]
mod readme {
    /// The README's supported-spec table lists every loaded module, so it cannot drift.
    #[test]
    fn readme_lists_every_module() {
        let readme = include_str!("../README.md");
        let mut reg = halyard_xep::Registry::new();
        halyard_xep::register_all(&mut reg);
        for m in reg.modules() {
            assert!(
                readme.contains(&format!("| {m} |")),
                "README's table misses module {m}"
            );
        }
    }
}
