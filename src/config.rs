//! Typed configuration (serde + toml), validated at load with errors that say the fix.
//!
//! Every option has a doc comment, a default and an entry in the annotated `config.toml` at the
//! top of the repository. Relative paths resolve against the folder of the config file (or the
//! working directory when built-in defaults are used).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Domains served; the first is the primary one (used for the admin socket, certificates
    /// generated first, and the server's own address).
    pub domains: Vec<String>,
    /// Where the store (sled) and the admin socket live.
    pub data_dir: PathBuf,
    /// Where `<domain>.crt` / `<domain>.key` (PEM) are read from, or generated into.
    pub certs_dir: PathBuf,
    /// Log level or tracing filter (e.g. `info`, `halyard=debug`). `RUST_LOG` overrides it.
    pub log: String,
    pub listeners: Listeners,
    pub c2s: C2s,
    pub auth: Auth,
    pub http: Http,
    pub storage: Storage,
    /// RFC 6121 rosters.
    pub roster: halyard_xep::host::RosterSettings,
    /// XEP-0313 message archive.
    pub archive: halyard_xep::host::ArchiveSettings,
    /// XEP-0160 offline messages.
    pub offline: halyard_xep::host::OfflineSettings,
    /// XEP-0198 stream management.
    pub stream_management: StreamManagement,
    /// XEP-0352 client state indication.
    pub csi: Csi,
    /// XEP-0357 push notifications.
    pub push: halyard_xep::host::PushSettings,
    /// The built-in XEP-0357 app server (`push.<domain>`), which delivers push notifications to
    /// phones through FCM, APNs or a webhook.
    pub appserver: AppServer,
    /// The HTTP API under `/api/v1`.
    pub api: Api,
    /// `/metrics` (Prometheus).
    pub metrics: Metrics,
    /// The browser chat client served at `/`.
    pub web: Web,
    /// XEP-0124/XEP-0206 BOSH at `/http-bind` on the HTTP(S) listeners.
    pub bosh: Bosh,
    /// XEP-0363 HTTP file upload (`upload.<domain>`).
    pub upload: Upload,
    /// Connections per address and in total, new connections per second, read rates.
    pub limits: LimitsConfig,
}

/// `[limits]`: abuse limits beyond one stanza's shape (see `crate::limits`). 0 turns a limit
/// off, except `max_connections`, where 0 means "the open-file limit less a reserve".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open at once on all listeners; beyond it new ones are refused with
    /// `resource-constraint`. 0: the process's open-file limit less 256 (for the store, logs and
    /// admin connections), so that the server refuses cleanly instead of failing to accept.
    pub max_connections: usize,
    /// Connections open at once from one IPv4 address or IPv6 /64; beyond it new ones are refused
    /// with `policy-violation`. High by default: a mobile carrier's NAT or a load test puts
    /// thousands of users behind one address.
    pub connections_per_ip: u32,
    /// New connections per second from one address, after a burst of `new_connections_burst`.
    pub new_connections_per_ip_per_sec: u32,
    pub new_connections_burst: u32,
    /// Bytes per second one bound session is read at, after a burst of `read_burst_bytes`; a
    /// faster sender is read more slowly (TCP pushes back), not disconnected.
    pub read_bytes_per_sec: u64,
    pub read_burst_bytes: u64,
    /// Stanzas per second one bound session is read at, after a burst of `stanza_burst`.
    pub stanzas_per_sec: u32,
    pub stanza_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 0,
            connections_per_ip: 10_000,
            new_connections_per_ip_per_sec: 200,
            new_connections_burst: 10_000,
            read_bytes_per_sec: 256 * 1024,
            read_burst_bytes: 1024 * 1024,
            stanzas_per_sec: 1_000,
            stanza_burst: 5_000,
        }
    }
}

/// Reserve of file descriptors kept out of `max_connections = 0`.
const FD_RESERVE: usize = 256;

impl LimitsConfig {
    /// `max_connections`, with 0 resolved against the process's open-file limit (read from
    /// `/proc/self/limits`; no limit when it cannot be read).
    pub fn effective_max_connections(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        match open_file_limit() {
            Some(n) => n.saturating_sub(FD_RESERVE).max(1),
            None => 0,
        }
    }
}

/// The soft open-file limit of this process (Linux), without a libc binding.
fn open_file_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `[api]`: the HTTP API (`/api/v1`) on the HTTP and HTTPS listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Serve `/api/v1`.
    pub enabled: bool,
    /// Bearer tokens with admin rights, compared in constant time (at least 32 characters
    /// each). Tokens issued by `halyard admin token` are admin tokens too.
    pub admin_tokens: Vec<String>,
    /// Seconds a user token (exchanged for a password) stays valid; a client may ask for less.
    pub token_ttl_secs: u64,
    /// Archive messages read per page by the history stream (memory per stream is about one
    /// page, however large the archive).
    pub history_page: usize,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            enabled: true,
            admin_tokens: Vec::new(),
            token_ttl_secs: 86_400,
            history_page: 500,
        }
    }
}

/// `[metrics]`: `/metrics` in the Prometheus text format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Serve `/metrics`.
    pub enabled: bool,
    /// Peer addresses allowed to scrape; empty allows anyone.
    pub allow: Vec<std::net::IpAddr>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            allow: Vec::new(),
        }
    }
}

/// `[web]`: the browser client (Converse.js) at `/` of the HTTP(S) listeners.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Web {
    /// Serve the client page at `/` and its files at `/converse/`.
    pub enabled: bool,
    /// Converse.js's `dist` folder (`npm ci --prefix web` puts it at the default place).
    pub client_dir: PathBuf,
}

impl Default for Web {
    fn default() -> Self {
        Web {
            enabled: true,
            client_dir: PathBuf::from("web/node_modules/converse.js/dist"),
        }
    }
}

/// `[bosh]`: XMPP over BOSH. The server clamps what clients ask for to these limits and reports
/// the values it chose in the session creation response.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bosh {
    /// Serve `/http-bind` (and advertise it in host-meta).
    pub enabled: bool,
    /// Longest time, in seconds, a request is held waiting for data (`wait`).
    pub max_wait_secs: u64,
    /// Most requests held at once (`hold`); `requests` is one more.
    pub max_hold: u32,
    /// Seconds without any request held or arriving after which the session counts as lost
    /// (`inactivity`).
    pub inactivity_secs: u64,
    /// Shortest polling interval reported to clients, in seconds (`polling`).
    pub polling_secs: u64,
    /// Longest pause a client may ask for, in seconds (`maxpause`); 0 offers no pausing.
    pub max_pause_secs: u64,
    /// BOSH sessions at once; beyond it new ones are refused.
    pub max_sessions: usize,
}

impl Default for Bosh {
    fn default() -> Self {
        Bosh {
            enabled: true,
            max_wait_secs: 60,
            max_hold: 1,
            inactivity_secs: 60,
            polling_secs: 2,
            max_pause_secs: 120,
            max_sessions: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamManagement {
    /// Seconds a session whose connection dropped waits to be resumed (a client may ask for
    /// less with `max`). Meanwhile it counts as online and its stanzas queue up.
    pub resume_timeout_secs: u64,
    /// Stanzas sent but not acknowledged (including those queued while waiting to be resumed)
    /// beyond which the session ends; they are rerouted (other resources, offline storage).
    pub max_unacked: usize,
    /// Sessions of one account that may wait to be resumed at once; beyond it the oldest ends.
    pub max_hibernating_per_account: usize,
    /// Seconds after an unanswered ack request before the server asks again.
    pub ack_request_secs: u64,
    /// `host:port` where clients should reconnect to resume (`location` in `<enabled/>`);
    /// empty leaves it out, and clients reconnect as usual.
    pub location: String,
}

impl Default for StreamManagement {
    fn default() -> Self {
        StreamManagement {
            resume_timeout_secs: 300,
            max_unacked: 1000,
            max_hibernating_per_account: 5,
            ack_request_secs: 30,
            location: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Csi {
    /// Stanzas held back for an inactive client before they are all sent anyway.
    pub max_held: usize,
}

impl Default for Csi {
    fn default() -> Self {
        Csi { max_held: 100 }
    }
}

/// `[appserver]`: the XEP-0357 app server component. Each provider is off while its key
/// settings are empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppServer {
    /// Serve the component.
    pub enabled: bool,
    /// Its address; empty means `push.<primary domain>`.
    pub domain: String,
    /// Seconds one provider request (connect, send, read the answer) may take.
    pub timeout_secs: u64,
    /// Deliveries in progress at once; a publish beyond it gets `resource-constraint` (wait).
    pub max_in_flight: usize,
    /// Devices one account may register.
    pub max_devices_per_account: usize,
    /// Notifications one device is sent per minute; a publish beyond it gets
    /// `resource-constraint` (the publishing server retries later). 0: no limit.
    pub max_per_device_per_minute: u32,
    /// A PEM file of extra CA certificates trusted for provider connections (besides the
    /// system's), e.g. a corporate proxy's or a test stand-in's. Empty: none.
    pub extra_ca_file: PathBuf,
    pub fcm: Fcm,
    pub apns: Apns,
    pub webhook: Webhook,
}

/// `[appserver.fcm]`: Firebase Cloud Messaging, HTTP v1 API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fcm {
    /// The service account's JSON key file (from the Firebase console). Empty: FCM is off.
    pub service_account_file: PathBuf,
    /// The Firebase project; empty takes `project_id` from the service account file.
    pub project_id: String,
    /// The API base URL.
    pub endpoint: String,
    /// The OAuth2 token endpoint; empty takes `token_uri` from the service account file.
    pub token_uri: String,
}

/// `[appserver.apns]`: Apple Push Notification service, HTTP/2 with token authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Apns {
    /// The `.p8` signing key (PKCS#8 PEM) from the Apple developer account. Empty: APNs is off.
    pub key_file: PathBuf,
    /// The key's id (10 characters), sent as the JWT's `kid`.
    pub key_id: String,
    /// The developer team id, sent as the JWT's `iss`.
    pub team_id: String,
    /// The app's bundle id, sent as `apns-topic`.
    pub topic: String,
    /// `https://api.push.apple.com`, or `https://api.sandbox.push.apple.com` for development
    /// builds of the app.
    pub endpoint: String,
    /// `alert` (a visible notification, priority 10, `mutable-content` so the app's notification
    /// extension can fetch the message) or `background` (a silent wake-up, priority 5).
    pub push_type: String,
}

/// `[appserver.webhook]`: an HTTP POST of a JSON document, signed with HMAC-SHA256.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Webhook {
    /// Where to POST. Empty: webhooks are off.
    pub url: String,
    /// The HMAC-SHA256 key for the `X-Halyard-Signature` header; required with `url`.
    pub secret: String,
}

impl Default for AppServer {
    fn default() -> Self {
        AppServer {
            enabled: false,
            domain: String::new(),
            timeout_secs: 10,
            max_in_flight: 256,
            max_devices_per_account: 20,
            max_per_device_per_minute: 30,
            extra_ca_file: PathBuf::new(),
            fcm: Fcm::default(),
            apns: Apns::default(),
            webhook: Webhook::default(),
        }
    }
}

impl Default for Fcm {
    fn default() -> Self {
        Fcm {
            service_account_file: PathBuf::new(),
            project_id: String::new(),
            endpoint: "https://fcm.googleapis.com".into(),
            token_uri: String::new(),
        }
    }
}

impl Default for Apns {
    fn default() -> Self {
        Apns {
            key_file: PathBuf::new(),
            key_id: String::new(),
            team_id: String::new(),
            topic: String::new(),
            endpoint: "https://api.push.apple.com".into(),
            push_type: "alert".into(),
        }
    }
}

impl AppServer {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The component's address for a server whose primary domain is `primary`.
    pub fn domain_for(&self, primary: &str) -> String {
        if self.domain.is_empty() {
            format!("push.{primary}")
        } else {
            self.domain.clone()
        }
    }

    fn problems(&mut self, primary: &str, served: &[String], out: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        let effective = self.domain_for(primary);
        check_component_domain(
            &mut self.domain,
            &effective,
            ("appserver", "the app server", "push"),
            primary,
            served,
            out,
        );
        if self.timeout_secs == 0 {
            out.push("appserver.timeout_secs must be at least 1".into());
        }
        if self.max_in_flight == 0 || self.max_devices_per_account == 0 {
            out.push(
                "appserver.max_in_flight and appserver.max_devices_per_account must be at least 1"
                    .into(),
            );
        }
        let fcm = !self.fcm.service_account_file.as_os_str().is_empty();
        let apns = !self.apns.key_file.as_os_str().is_empty();
        let webhook = !self.webhook.url.is_empty();
        if !fcm && !apns && !webhook {
            out.push("appserver is enabled but no provider is configured: set appserver.fcm.service_account_file, appserver.apns.key_file or appserver.webhook.url".into());
        }
        if apns {
            if self.apns.key_id.is_empty()
                || self.apns.team_id.is_empty()
                || self.apns.topic.is_empty()
            {
                out.push("appserver.apns needs key_id, team_id and topic (the app's bundle id) with key_file".into());
            }
            if self.apns.push_type != "alert" && self.apns.push_type != "background" {
                out.push(format!(
                    "appserver.apns.push_type {:?} must be \"alert\" or \"background\"",
                    self.apns.push_type
                ));
            }
        }
        if webhook {
            if self.webhook.secret.is_empty() {
                out.push("appserver.webhook.secret is empty: set a long random string, the receiver checks the X-Halyard-Signature header with it".into());
            }
            if !self.webhook.url.starts_with("https://") && !self.webhook.url.starts_with("http://")
            {
                out.push("appserver.webhook.url must start with https:// (or http://)".into());
            }
        }
    }
}

/// `[upload]`: the XEP-0363 HTTP file upload component and its HTTP routes (`/upload/...`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upload {
    /// Serve the component and the upload routes.
    pub enabled: bool,
    /// Its address; empty means `upload.<primary domain>`.
    pub domain: String,
    /// Largest file, in bytes (advertised as `max-file-size`).
    pub max_file_size: u64,
    /// Bytes one account may have stored (and reserved by open slots); 0: no quota.
    pub quota_per_user: u64,
    /// Slots one account may request per minute; 0: no limit.
    pub slots_per_minute: u32,
    /// Uploaded files are deleted this long after the upload (`"30d"`, `"12h"`, ...); `"off"`
    /// keeps them until the account is removed.
    #[serde(deserialize_with = "halyard_xep::host::duration_secs")]
    pub expire_after: u64,
    /// Seconds a slot's PUT URL stays valid.
    pub slot_validity_secs: u64,
    /// The key PUT URLs are signed with (HMAC-SHA256). Empty: a random key generated once and
    /// kept in `<data_dir>/upload.key`.
    pub secret: String,
}

/// The secret stays out of `Debug` (and so out of logs).
impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("enabled", &self.enabled)
            .field("domain", &self.domain)
            .field("max_file_size", &self.max_file_size)
            .field("quota_per_user", &self.quota_per_user)
            .field("slots_per_minute", &self.slots_per_minute)
            .field("expire_after", &self.expire_after)
            .field("slot_validity_secs", &self.slot_validity_secs)
            .field("secret", &if self.secret.is_empty() { "" } else { "<set>" })
            .finish()
    }
}

impl Default for Upload {
    fn default() -> Self {
        Upload {
            enabled: true,
            domain: String::new(),
            max_file_size: 100 * 1024 * 1024,
            quota_per_user: 1024 * 1024 * 1024,
            slots_per_minute: 30,
            expire_after: 30 * 86_400,
            slot_validity_secs: 300,
            secret: String::new(),
        }
    }
}

/// Checks a component's address (`effective`: the configured `domain`, or the default built from
/// the primary domain): a domain name of its own, not one of the served `domains`. A configured
/// domain is replaced by its normalised form. `names`: the config section, what the component is
/// called in messages, and the default label (`push` for `push.<primary>`).
fn check_component_domain(
    domain: &mut String,
    effective: &str,
    (section, what, label): (&str, &str, &str),
    primary: &str,
    served: &[String],
    out: &mut Vec<String>,
) {
    match jid::BareJid::new(effective) {
        Ok(j) if j.node().is_none() => {
            let d = j.domain().to_string();
            if served.contains(&d) {
                out.push(format!("{section}.domain {d:?} is one of `domains`: {what} needs an address of its own, e.g. \"{label}.{primary}\""));
            }
            if !domain.is_empty() {
                *domain = d;
            }
        }
        _ => out.push(format!(
            "{section}.domain {domain:?} is not a valid domain name: use e.g. \"{label}.{primary}\""
        )),
    }
}

impl Upload {
    /// The component's address for a server whose primary domain is `primary`.
    pub fn domain_for(&self, primary: &str) -> String {
        if self.domain.is_empty() {
            format!("upload.{primary}")
        } else {
            self.domain.clone()
        }
    }

    fn problems(&mut self, primary: &str, served: &[String], out: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        let effective = self.domain_for(primary);
        check_component_domain(
            &mut self.domain,
            &effective,
            ("upload", "the upload service", "upload"),
            primary,
            served,
            out,
        );
        if self.max_file_size == 0 {
            out.push("upload.max_file_size must be at least 1 (bytes)".into());
        }
        if self.slot_validity_secs == 0 {
            out.push("upload.slot_validity_secs must be at least 1 (300 is usual)".into());
        }
        if !self.secret.is_empty() && self.secret.len() < 16 {
            out.push("upload.secret is shorter than 16 characters: use a long random string, or leave it empty to have one generated".into());
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Milliseconds during which requests for a durable write are gathered into one flush
    /// (group commit). A message stored offline is on disk when the session reads the next
    /// stanza; the archive copy of a message delivered live rides the next flush, so a crash
    /// can lose at most this window (plus the flush itself) of live messages' archive copies.
    pub group_commit_ms: u64,
    /// Megabytes of the store's page cache (sled). Hot data (accounts, recent archive pages)
    /// stays in memory; the rest is read from disk.
    pub cache_mb: u64,
    /// Megabytes that must stay free on the data folder's file system: below it the server
    /// refuses writes (as on a full disk) until half as much again is free, so the store never
    /// meets a full disk (sled cannot write again after that without a restart). 0: off.
    pub min_free_mb: u64,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            group_commit_ms: 2,
            cache_mb: 128,
            min_free_mb: 64,
        }
    }
}

/// Listen addresses per kind; an empty list turns that kind off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// Client-to-server with STARTTLS (RFC 6120).
    pub c2s: Vec<SocketAddr>,
    /// Client-to-server with Direct TLS (XEP-0368).
    pub c2s_tls: Vec<SocketAddr>,
    /// Plain HTTP: WebSocket at `/xmpp-websocket`, BOSH at `/http-bind`, host-meta.
    pub http: Vec<SocketAddr>,
    /// HTTPS: the same routes over TLS.
    pub https: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2s {
    /// Refuse SASL before TLS on TCP listeners. Turn off only for loopback benchmarks.
    pub require_tls: bool,
    /// Largest stanza, in bytes; a larger one closes the stream with `policy-violation`.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside a stanza.
    pub max_depth: usize,
    /// Most attributes on one element (namespace declarations included).
    pub max_attributes: usize,
    /// Longest attribute value, in bytes as sent.
    pub max_attribute_bytes: usize,
    /// Seconds a connection may take to authenticate and bind.
    pub preauth_timeout_secs: u64,
    /// Bytes a connection may send before it has authenticated.
    pub preauth_max_bytes: usize,
    /// Seconds of silence after which the server pings the client (XEP-0199).
    pub idle_timeout_secs: u64,
    /// Seconds to wait for any data after that ping before closing with `connection-timeout`.
    pub ping_timeout_secs: u64,
    /// Stanzas queued for one session before it is treated as a slow reader and disconnected.
    pub outbound_queue: usize,
    /// Seconds one write may block before the peer is treated as stalled and disconnected.
    pub write_timeout_secs: u64,
    /// Deliver messages to a bare JID to every available resource with non-negative priority,
    /// not only the highest-priority ones (RFC 6121 §8.5.2.1.1 allows both).
    pub deliver_to_all_resources: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// PBKDF2 iterations for new SCRAM credentials (RFC 5802 §5.1; at least 4096).
    pub scram_iterations: u32,
    /// Failed attempts on one connection before it is closed.
    pub max_failures_per_connection: u32,
    /// Failures from one IP address per minute before each further attempt is delayed.
    pub failures_per_minute_per_ip: u32,
    /// Failures for one account per hour, from any address, before each further attempt on it
    /// is delayed (doubling): slows down guessing spread over many addresses. Never a lockout.
    pub failures_per_hour_per_account: u32,
    /// The cap on those delays, in milliseconds.
    pub max_delay_ms: u64,
    /// Offer PLAIN (only ever over TLS).
    pub allow_plain: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Peers allowed to authenticate over the plain HTTP listener besides loopback, e.g. a
    /// TLS-terminating reverse proxy.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Origins allowed to open a WebSocket; empty accepts any.
    pub websocket_origins: Vec<String>,
    /// The base URL under which clients reach the HTTP service (upload slots, host-meta); empty
    /// means `https://<primary domain>:<first HTTPS listener's port>`. Set it when a reverse
    /// proxy or another port faces the clients, e.g. `https://chat.example.org`.
    pub public_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domains: vec!["localhost".into()],
            data_dir: PathBuf::from("data"),
            certs_dir: PathBuf::from("certs"),
            log: "info".into(),
            listeners: Listeners::default(),
            c2s: C2s::default(),
            auth: Auth::default(),
            http: Http::default(),
            storage: Storage::default(),
            roster: Default::default(),
            archive: Default::default(),
            offline: Default::default(),
            stream_management: Default::default(),
            csi: Default::default(),
            push: Default::default(),
            appserver: AppServer::default(),
            api: Api::default(),
            metrics: Metrics::default(),
            web: Web::default(),
            bosh: Bosh::default(),
            upload: Upload::default(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
        Listeners {
            c2s: vec![any(5222)],
            c2s_tls: vec![any(5223)],
            http: vec![any(5280)],
            https: vec![any(5281)],
        }
    }
}

impl Default for C2s {
    fn default() -> Self {
        C2s {
            require_tls: true,
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            max_attribute_bytes: 4096,
            preauth_timeout_secs: 30,
            preauth_max_bytes: 64 * 1024,
            idle_timeout_secs: 300,
            ping_timeout_secs: 60,
            outbound_queue: 1024,
            write_timeout_secs: 60,
            deliver_to_all_resources: false,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            scram_iterations: 4096,
            max_failures_per_connection: 5,
            failures_per_minute_per_ip: 10,
            failures_per_hour_per_account: 30,
            max_delay_ms: 2000,
            allow_plain: true,
        }
    }
}

impl C2s {
    pub fn preauth_timeout(&self) -> Duration {
        Duration::from_secs(self.preauth_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_secs(self.ping_timeout_secs)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
}

impl Config {
    /// Loads `path`, resolving relative paths against its folder, and validates it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.into(),
            message,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve_paths(&base);
        Ok(cfg)
    }

    /// Parses TOML text without resolving paths.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.certs_dir,
            &mut self.web.client_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        // Empty means "off" for these, so it stays empty.
        let a = &mut self.appserver;
        for p in [
            &mut a.extra_ca_file,
            &mut a.fcm.service_account_file,
            &mut a.apns.key_file,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
    }

    pub fn cache_bytes(&self) -> u64 {
        self.storage.cache_mb.saturating_mul(1 << 20)
    }

    pub fn group_commit(&self) -> Duration {
        Duration::from_millis(self.storage.group_commit_ms)
    }

    pub fn primary_domain(&self) -> &str {
        self.domains
            .first()
            .map(String::as_str)
            .unwrap_or("localhost")
    }

    /// Normalises domains (RFC 7622 via the `jid` crate) and checks every rule, returning all
    /// problems found, each with its fix.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.domains.is_empty() {
            problems.push(
                "`domains` is empty: list at least one domain, e.g. domains = [\"example.com\"]"
                    .to_string(),
            );
        }
        let mut normalised = Vec::new();
        for d in &self.domains {
            match halyard_xep::stanza::parse_jid(d) {
                Ok(j) if j.node().is_none() && j.resource().is_none() => {
                    normalised.push(j.domain().to_string())
                }
                _ => problems.push(format!("domain {d:?} is not a valid domain name: use a host name such as \"example.com\"")),
            }
        }
        self.domains = normalised;
        if self.auth.scram_iterations < 4096 {
            problems.push(format!(
                "auth.scram_iterations = {} is below RFC 7677's minimum: set it to 4096 or more",
                self.auth.scram_iterations
            ));
        }
        if self.c2s.max_stanza_bytes < 10_000 {
            problems.push("c2s.max_stanza_bytes must be at least 10000 (RFC 6120 §13.12 requires accepting 10000-byte stanzas)".into());
        }
        if self.c2s.max_depth < 4 {
            problems
                .push("c2s.max_depth must be at least 4, or ordinary stanzas are refused".into());
        }
        if self.c2s.max_attributes < 8 {
            problems.push(
                "c2s.max_attributes must be at least 8, or ordinary stanzas are refused".into(),
            );
        }
        if self.c2s.max_attribute_bytes < 3071 {
            problems.push(
                "c2s.max_attribute_bytes must be at least 3071, the longest JID (RFC 7622 §3.1)"
                    .into(),
            );
        }
        let l = &self.limits;
        if l.new_connections_per_ip_per_sec > 0 && l.new_connections_burst == 0 {
            problems.push("limits.new_connections_burst must be at least 1 when limits.new_connections_per_ip_per_sec is set".into());
        }
        if l.read_bytes_per_sec > 0 && l.read_burst_bytes < self.c2s.max_stanza_bytes as u64 {
            problems.push(format!(
                "limits.read_burst_bytes = {} is below c2s.max_stanza_bytes = {}: set it at least that high, or one large stanza stalls its session",
                l.read_burst_bytes, self.c2s.max_stanza_bytes
            ));
        }
        if self.c2s.outbound_queue == 0 {
            problems.push("c2s.outbound_queue must be at least 1".into());
        }
        if self.c2s.preauth_max_bytes < 4096 {
            problems.push(
                "c2s.preauth_max_bytes must be at least 4096, or SASL cannot complete".into(),
            );
        }
        if self.c2s.idle_timeout_secs == 0
            || self.c2s.ping_timeout_secs == 0
            || self.c2s.preauth_timeout_secs == 0
        {
            problems.push("c2s timeouts must be at least 1 second".into());
        }
        if self.c2s.outbound_queue < 2 * self.archive.max_page {
            problems.push(format!(
                "c2s.outbound_queue ({}) must be at least twice archive.max_page ({}): an archive page is queued to the client at once",
                self.c2s.outbound_queue, self.archive.max_page
            ));
        }
        if self.archive.default_page == 0 || self.archive.max_page < self.archive.default_page {
            problems.push("archive.default_page must be at least 1 and archive.max_page at least default_page".into());
        }
        if self.storage.group_commit_ms > 1000 {
            problems.push("storage.group_commit_ms above 1000 would hold every offline message for over a second: use a few milliseconds".into());
        }
        let p = &self.push;
        if p.request_timeout_ms < 100 || p.retry_base_ms == 0 || p.retry_max_ms < p.retry_base_ms {
            problems.push("push.request_timeout_ms must be at least 100, push.retry_base_ms at least 1 and push.retry_max_ms at least retry_base_ms".into());
        }
        if p.max_attempts == 0 || p.max_in_flight == 0 {
            problems.push("push.max_attempts and push.max_in_flight must be at least 1".into());
        }
        if self.auth.max_failures_per_connection == 0 {
            problems.push("auth.max_failures_per_connection must be at least 1".into());
        }
        if self.api.token_ttl_secs == 0 {
            problems.push("api.token_ttl_secs must be at least 1 (86400 is a day)".into());
        }
        if self.api.history_page == 0 || self.api.history_page > 10_000 {
            problems.push("api.history_page must be between 1 and 10000".into());
        }
        if self.api.admin_tokens.iter().any(|t| t.len() < 32) {
            problems.push("api.admin_tokens entries must be at least 32 characters: generate one with e.g. `head -c 32 /dev/urandom | base64`, or issue one with `halyard admin token`".into());
        }
        let b = &self.bosh;
        if b.max_wait_secs == 0 || b.inactivity_secs == 0 || b.max_hold == 0 || b.max_sessions == 0
        {
            problems.push("bosh.max_wait_secs, bosh.inactivity_secs, bosh.max_hold and bosh.max_sessions must be at least 1".into());
        }
        let primary = self.primary_domain().to_string();
        self.appserver
            .problems(&primary, &self.domains, &mut problems);
        self.upload.problems(&primary, &self.domains, &mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n  - ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut c = Config::default();
        c.validate().expect("defaults validate");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("domanis = [\"x\"]").unwrap_err();
        assert!(err.contains("domanis"), "{err}");
    }

    #[test]
    fn bad_values_say_the_fix() {
        let mut c =
            Config::parse("domains = [\"Exa mple\"]\n[auth]\nscram_iterations = 10").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("scram_iterations"), "{err}");
        assert!(err.contains("not a valid domain"), "{err}");
    }

    #[test]
    fn appserver_settings_are_checked_when_enabled() {
        let mut c = Config::parse("[appserver]\nenabled = true").unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("no provider is configured"), "{err}");
        let mut c = Config::parse(
            "domains = [\"x.org\"]\n[appserver]\nenabled = true\ndomain = \"x.org\"\n[appserver.webhook]\nurl = \"ftp://h\"\n[appserver.apns]\nkey_file = \"k.p8\"",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        for needle in [
            "is one of `domains`",
            "webhook.secret",
            "https://",
            "key_id",
        ] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let mut c = Config::parse(
            "[appserver]\nenabled = true\nextra_ca_file = \"ca.pem\"\n[appserver.webhook]\nurl = \"https://h/x\"\nsecret = \"s\"",
        )
        .unwrap();
        c.resolve_paths(Path::new("/etc/halyard"));
        c.validate().unwrap();
        assert_eq!(c.appserver.domain_for(c.primary_domain()), "push.localhost");
        assert_eq!(
            c.appserver.extra_ca_file,
            PathBuf::from("/etc/halyard/ca.pem")
        );
        assert_eq!(c.appserver.fcm.service_account_file, PathBuf::new());
    }

    #[test]
    fn api_settings_are_checked() {
        let mut c = Config::parse(
            "[api]\nadmin_tokens = [\"short\"]\ntoken_ttl_secs = 0\nhistory_page = 0\n[metrics]\nallow = [\"127.0.0.1\"]",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        for needle in ["admin_tokens", "token_ttl_secs", "history_page"] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        assert_eq!(
            c.metrics.allow,
            vec![std::net::IpAddr::from([127, 0, 0, 1])]
        );
    }

    #[test]
    fn upload_settings() {
        let mut c = Config::default();
        c.validate().unwrap();
        assert!(c.upload.enabled);
        assert_eq!(c.upload.domain_for(c.primary_domain()), "upload.localhost");
        let mut c = Config::parse(
            "domains = [\"x.org\"]\n[upload]\ndomain = \"X.org\"\nexpire_after = \"2h\"\nmax_file_size = 0\nsecret = \"short\"",
        )
        .unwrap();
        assert_eq!(c.upload.expire_after, 7200);
        let err = c.validate().unwrap_err().to_string();
        for needle in ["is one of `domains`", "max_file_size", "upload.secret"] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let c =
            Config::parse("[upload]\nexpire_after = \"off\"\nsecret = \"0123456789abcdef-long\"")
                .unwrap();
        assert_eq!(c.upload.expire_after, 0);
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "the secret is not in Debug"
        );
    }

    #[test]
    fn domains_are_normalised_and_paths_resolved() {
        let mut c = Config::parse("domains = [\"LocalHost\"]\ndata_dir = \"d\"").unwrap();
        c.resolve_paths(Path::new("/etc/halyard"));
        c.validate().unwrap();
        assert_eq!(c.domains, vec!["localhost".to_string()]);
        assert_eq!(c.data_dir, PathBuf::from("/etc/halyard/d"));
    }
}

#[cfg(test)]
mod shipped_file {
    use super::*;

    /// The annotated config.toml at the top of the repository documents every option with its
    /// default: it must parse, validate, and equal the built-in defaults.
    #[test]
    fn shipped_config_toml_is_the_defaults() {
        let text = include_str!("../config.toml");
        let mut shipped = Config::parse(text).expect("config.toml parses");
        shipped.validate().expect("config.toml validates");
        assert_eq!(format!("{shipped:?}"), format!("{:?}", Config::default()));
    }
}
