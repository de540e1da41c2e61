//! The node's shared state, and the core's side of the module contract ([`Host`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use halyard_xep::host::{
    ArchiveStore, Host, LastActivityStore, ModuleSettings, OfflineStore, PushStore, ResourceInfo,
    RosterStore, StoreResult,
};
use halyard_xep::rate::Windows;
use halyard_xep::Registry;
use halyard_xep::Stanza;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;
use tokio::sync::watch;

use crate::config::Config;
use crate::sessions::{Queued, Sessions};
use crate::store::Stores;
use crate::stream::writer;
use crate::tls::Tls;

pub struct Server {
    pub config: Config,
    pub registry: Registry,
    pub sessions: Sessions,
    pub stores: Stores,
    pub tls: Option<Tls>,
    pub started: SystemTime,
    /// The XEP-0115 `<c/>` for stream features, computed once from the registry.
    pub caps: Element,
    /// Secret for SCRAM's fake salts, so an unknown user looks like a wrong password.
    pub fake_salt_secret: [u8; 32],
    pub auth_throttle: AuthThrottle,
    /// Connections per address and in total ([limits]).
    pub conn_limiter: Arc<crate::limits::ConnLimiter>,
    conn_ids: AtomicU64,
    /// Live connections (negotiating or bound), for shutdown.
    pub connections: AtomicU64,
    pub shutdown: watch::Receiver<bool>,
    settings: ModuleSettings,
    /// The server's own iq requests ([`Host::request`]) waiting for their answer, by id.
    pending: dashmap::DashMap<String, PendingRequest>,
    /// Sessions that can be resumed (XEP-0198), by resumption id.
    pub sm: crate::c2s::sm::Resumable,
    /// The HTTP service's base URL as clients see it (no trailing `/`), set once the listeners
    /// are bound (`http.public_url`, or derived from the HTTPS listener).
    pub public_url: std::sync::OnceLock<String>,
    /// The XEP-0357 app server component, when `[appserver]` enables it (also in the registry).
    pub appserver: Option<Arc<crate::appserver::AppServer>>,
    /// The XEP-0363 upload component, when `[upload]` enables it (also in the registry).
    pub upload: Option<Arc<crate::upload::UploadService>>,
    /// Prometheus metrics (`/metrics`).
    pub metrics: crate::http::metrics::Metrics,
}

/// An iq the server sent and whose result or error it awaits.
struct PendingRequest {
    /// Who must answer: a reply from anyone else is not taken as the answer.
    to: Jid,
    reply: tokio::sync::oneshot::Sender<Element>,
}

impl Server {
    pub fn new(
        config: Config,
        stores: Stores,
        tls: Option<Tls>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Server> {
        let mut registry = Registry::new();
        halyard_xep::register_all(&mut registry);
        let appserver = if config.appserver.enabled {
            let domain = config.appserver.domain_for(config.primary_domain());
            let a = Arc::new(crate::appserver::AppServer::from_config(
                &config.appserver,
                domain.clone(),
                stores.appserver.clone(),
            )?);
            registry.component(domain, a.clone());
            Some(a)
        } else {
            None
        };
        let upload = if config.upload.enabled {
            let domain = config.upload.domain_for(config.primary_domain());
            let u = Arc::new(crate::upload::UploadService::new(
                &config.upload,
                domain.clone(),
                stores.uploads.clone(),
                &config.data_dir,
            )?);
            registry.component(domain, u.clone());
            Some(u)
        } else {
            None
        };
        let caps = halyard_xep::caps::element(&registry);
        let metrics = crate::http::metrics::Metrics::new()
            .map_err(|e| anyhow::anyhow!("setting up metrics: {e}"))?;
        let sessions = Sessions::new();
        sessions.count_outbound(metrics.stanzas_out.clone());
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
        let auth_throttle = AuthThrottle::new(
            config.auth.failures_per_minute_per_ip,
            config.auth.failures_per_hour_per_account,
            config.auth.max_delay_ms,
        );
        let conn_limiter = crate::limits::ConnLimiter::new(&config.limits);
        let settings = ModuleSettings {
            roster: config.roster.clone(),
            archive: config.archive.clone(),
            offline: config.offline.clone(),
            push: config.push.clone(),
        };
        Ok(Server {
            config,
            registry,
            sessions,
            stores,
            tls,
            started: SystemTime::now(),
            caps,
            fake_salt_secret: secret,
            auth_throttle,
            conn_limiter,
            conn_ids: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            shutdown,
            settings,
            pending: dashmap::DashMap::new(),
            sm: Default::default(),
            public_url: std::sync::OnceLock::new(),
            appserver,
            upload,
            metrics,
        })
    }

    /// Admits a connection from `peer` under the connection limits (`[limits]`); a refusal is
    /// counted in the metrics and logged here, for every listener alike.
    pub fn admit_connection(
        &self,
        peer: std::net::SocketAddr,
    ) -> Result<crate::limits::ConnSlot, crate::limits::Refusal> {
        self.conn_limiter.admit(peer.ip()).inspect_err(|why| {
            self.metrics
                .connections_refused
                .with_label_values(&[why.label()])
                .inc();
            tracing::debug!(%peer, limit = why.label(), "connection refused");
        })
    }

    /// The HTTP service's base URL as clients see it, e.g. `https://example.org:5281`.
    pub fn public_url(&self) -> &str {
        self.public_url
            .get()
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn domain(&self) -> &str {
        self.config.primary_domain()
    }

    /// Takes an iq result or error addressed to the server as the answer to one of its requests.
    /// Returns false when it answers nothing we asked (it is then dropped, RFC 6120 §8.2.3).
    pub fn answer(&self, reply: &Stanza) -> bool {
        let Some(id) = reply.id() else {
            return false;
        };
        let Some((_, p)) = self.pending.remove_if(id, |_, p| p.to == reply.from) else {
            return false;
        };
        p.reply.send(reply.el.clone()).is_ok()
    }

    /// Sends `el` to a local full JID; anything else (the server itself, a bare JID) is dropped.
    pub fn send_to(&self, to: &Jid, el: &Element) -> Queued {
        match to.try_as_full() {
            Ok(full) => self.sessions.send(full, writer::to_bytes(el)),
            Err(_) => Queued::NoSuchResource,
        }
    }
}

#[async_trait]
impl Host for Server {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn is_local_domain(&self, domain: &str) -> bool {
        self.config.domains.iter().any(|d| d == domain)
    }

    fn started_at(&self) -> SystemTime {
        self.started
    }

    async fn route(&self, el: Element) {
        crate::router::route_trusted(self, el).await
    }

    async fn request(&self, mut iq: Element, timeout: Duration) -> Option<Element> {
        let id = format!("h{}", self.next_conn_id());
        // A request a module builds: its `to` is ours or was checked on the way in.
        let to = iq.attr("to").and_then(|t| Jid::new(t).ok())?;
        iq.set_attr(
            minidom::rxml::Namespace::NONE,
            halyard_xep::stanza::n("id"),
            id.clone(),
        );
        if iq.attr("from").is_none() {
            let from = self.domain().to_owned();
            iq.set_attr(
                minidom::rxml::Namespace::NONE,
                halyard_xep::stanza::n("from"),
                from,
            );
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending
            .insert(id.clone(), PendingRequest { to, reply: tx });
        crate::router::route_trusted(self, iq).await;
        let answer = tokio::time::timeout(timeout, rx).await;
        self.pending.remove(&id);
        answer.ok().and_then(Result::ok)
    }

    fn deliver_raw(&self, to: &FullJid, xml: String) -> bool {
        self.sessions.send(to, bytes::Bytes::from(xml)) == Queued::Yes
    }

    fn deliver(&self, to: &FullJid, el: &Element) -> bool {
        self.sessions.send(to, writer::to_bytes(el)) == Queued::Yes
    }

    fn resources(&self, user: &BareJid) -> Vec<ResourceInfo> {
        self.sessions.resources(user)
    }

    fn set_presence(&self, full: &FullJid, presence: Option<(Element, i8)>) {
        self.sessions.set_presence(full, presence)
    }

    fn set_roster_interested(&self, full: &FullJid) {
        self.sessions.set_roster_interested(full)
    }

    fn add_directed_presence(&self, full: &FullJid, to: &Jid) {
        self.sessions.add_directed(full, to)
    }

    fn remove_directed_presence(&self, full: &FullJid, to: &Jid) {
        self.sessions.remove_directed(full, to)
    }

    fn directed_presence(&self, full: &FullJid) -> Vec<Jid> {
        self.sessions.directed(full)
    }

    async fn account_exists(&self, user: &BareJid) -> StoreResult<bool> {
        self.stores.accounts.exists(user).await
    }

    fn roster(&self) -> &dyn RosterStore {
        self.stores.roster.as_ref()
    }

    fn last_activity(&self) -> &dyn LastActivityStore {
        self.stores.last.as_ref()
    }

    fn set_carbons(&self, full: &FullJid, on: bool) {
        self.sessions.set_carbons(full, on)
    }

    fn delivery_targets(&self, st: &Stanza) -> Vec<FullJid> {
        crate::router::message_targets(self, st)
    }

    fn archive(&self) -> &dyn ArchiveStore {
        self.stores.archive.as_ref()
    }

    fn offline(&self) -> &dyn OfflineStore {
        self.stores.offline.as_ref()
    }

    fn push(&self) -> &dyn PushStore {
        self.stores.push.as_ref()
    }

    async fn durable(&self) -> StoreResult<()> {
        self.stores.durable.wait().await
    }

    fn settings(&self) -> &ModuleSettings {
        &self.settings
    }
}

/// Slows down password guessing. Per IP address: up to `per_minute` failures in a minute pass
/// without delay; beyond that each failure is answered twice as late as the last, up to
/// `max_delay`. Per account, from any address: the same over an hour with `per_hour_account`,
/// which slows guessing spread over many addresses. The failure's answer waits for the larger
/// of the two delays (parallel connections each wait theirs, so the connection limits bound how
/// many guesses are in flight). There is deliberately no lockout: it would let anyone lock a
/// user out.
pub struct AuthThrottle {
    per_minute: u32,
    per_hour_account: u32,
    max_delay: Duration,
    by_ip: Windows<IpAddr>,
    by_account: Windows<String>,
}

impl AuthThrottle {
    pub fn new(per_minute: u32, per_hour_account: u32, max_delay_ms: u64) -> Self {
        AuthThrottle {
            per_minute,
            per_hour_account,
            max_delay: Duration::from_millis(max_delay_ms),
            by_ip: Windows::new(Duration::from_secs(60)),
            by_account: Windows::new(Duration::from_secs(3600)),
        }
    }

    fn delay_over(&self, count: u32, allowed: u32) -> Duration {
        let over = count.saturating_sub(allowed);
        if over == 0 || allowed == 0 {
            return Duration::ZERO;
        }
        let ms = 100u64.saturating_mul(1u64 << over.min(20));
        Duration::from_millis(ms).min(self.max_delay)
    }

    /// Records a failure from `ip`, naming `account` when the attempt named one (known or not),
    /// and returns how long to wait before answering it.
    pub fn failure(&self, ip: IpAddr, account: Option<&str>) -> Duration {
        let by_ip = self.by_ip.count(crate::limits::address_key(ip));
        let mut delay = self.delay_over(by_ip, self.per_minute);
        if let Some(a) = account {
            let n = self.by_account.count(a.to_owned());
            delay = delay.max(self.delay_over(n, self.per_hour_account));
        }
        delay
    }

    /// How long `ip` must wait before it may try again, when it has used up this minute's
    /// failures (the HTTP API answers 429 with this as Retry-After instead of delaying).
    pub fn retry_after(&self, ip: IpAddr) -> Option<Duration> {
        let (n, left) = self.by_ip.peek(&crate::limits::address_key(ip))?;
        (self.per_minute > 0 && n >= self.per_minute).then_some(left)
    }
}

/// Resolves when the node's shutdown signal is set (or its sender is gone).
pub async fn until_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_grows_and_caps() {
        let t = AuthThrottle::new(2, 100, 2000);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.failure(ip, None), Duration::ZERO);
        assert_eq!(t.failure(ip, None), Duration::ZERO);
        let d1 = t.failure(ip, None);
        let d2 = t.failure(ip, None);
        assert!(d1 > Duration::ZERO && d2 > d1);
        for _ in 0..30 {
            assert!(t.failure(ip, None) <= Duration::from_millis(2000));
        }
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(t.retry_after(ip).is_some());
        assert_eq!(t.retry_after(other), None);
        assert_eq!(t.failure(other, None), Duration::ZERO);
        assert_eq!(t.retry_after(other), None, "under the limit");
    }

    #[test]
    fn guessing_one_account_from_many_addresses_is_slowed() {
        let t = AuthThrottle::new(5, 3, 2000);
        let mut delays = Vec::new();
        for i in 0..6u8 {
            let ip = IpAddr::from([10, 1, 0, i]);
            delays.push(t.failure(ip, Some("alice@example.com")));
        }
        assert_eq!(&delays[..3], &[Duration::ZERO; 3]);
        assert!(delays[3] > Duration::ZERO && delays[4] > delays[3] && delays[5] > delays[4]);
        // Another account from the same addresses is not slowed.
        assert_eq!(
            t.failure(IpAddr::from([10, 1, 0, 0]), Some("bob@example.com")),
            Duration::ZERO
        );
    }

    #[test]
    fn zero_turns_a_window_off() {
        let t = AuthThrottle::new(0, 0, 2000);
        for _ in 0..50 {
            assert_eq!(
                t.failure(IpAddr::from([10, 0, 0, 9]), Some("a@b")),
                Duration::ZERO
            );
        }
    }
}
