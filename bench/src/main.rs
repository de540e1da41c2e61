//! `halyard-bench`: Halyard's benchmarks and load tool. Performance targets live here, never in
//! timed tests.
//!
//! - `archive`: the archive store and MAM handler in-process (Halyard only).
//! - `users`: creates benchmark accounts in a stopped Halyard's store.
//! - `connect`, `chat`, `mam`: load against any XMPP server over c2s (see bench/README.md).
//! - `soak`: a long mixed load reported every interval: flat memory, descriptors, latency.

mod archive;
mod chat;
mod connect;
mod mam;
mod procfs;
mod scram;
mod soak;
mod stats;
mod users;
mod xmpp;

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::procfs::Sample;
use crate::stats::{Errors, Latency};
use crate::xmpp::{Mech, Session, Target};

#[derive(Parser)]
#[command(
    name = "halyard-bench",
    about = "Halyard benchmarks and XMPP load tool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Archive append throughput, query latency through the MAM handler, disk bytes per message
    /// (in-process, Halyard only).
    Archive(archive::ArchiveArgs),
    /// Create accounts u0..uN-1 directly in a stopped Halyard's data directory.
    Users(users::UsersArgs),
    /// Open N authenticated sessions at a given rate and hold them idle: logins/s, login
    /// latency, server KiB per idle session and CPU per login.
    Connect(connect::ConnectArgs),
    /// P pairs of sessions exchanging messages: throughput, delivery latency, losses, server
    /// CPU per message.
    Chat(chat::ChatArgs),
    /// Concurrent MAM (XEP-0313) page queries against filled archives: queries/s and latency.
    Mam(mam::MamArgs),
    /// A long mixed load (chat, connection churn, presence storms, archive queries) at steady
    /// rates, reported every interval: server RSS, descriptors, CPU, latency, errors; a verdict
    /// on whether they stayed flat.
    Soak(soak::SoakArgs),
}

/// Connection and reporting options shared by `connect`, `chat` and `mam`.
#[derive(clap::Args, Clone)]
pub struct Common {
    /// Server address (name or IP).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server c2s port (STARTTLS or plain; Direct TLS is not supported).
    #[arg(long, default_value_t = 5222)]
    port: u16,
    /// XMPP domain of the accounts (the stream's `to`, the TLS server name).
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Account localpart pattern: the account number replaces the placeholder n in braces (as in
    /// the default).
    #[arg(long = "user", default_value = "u{n}")]
    user_pattern: String,
    /// Password of every account.
    #[arg(long, default_value = "pw")]
    password: String,
    /// First account number used (accounts first..first+N).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Use STARTTLS (any certificate is accepted: benchmark only). Without it the stream stays
    /// plain, which the server must allow (Halyard: `[c2s] require_tls = false`).
    #[arg(long)]
    tls: bool,
    /// Force a SASL mechanism; default: the strongest offered of SCRAM-SHA-256, SCRAM-SHA-1,
    /// PLAIN.
    #[arg(long, value_enum)]
    mech: Option<Mech>,
    /// Bind connections round-robin to loopback sources 127.0.0.2 … 127.0.0.(N+1) so ephemeral
    /// ports do not cap the session count (~28k per source); 0 lets the kernel choose.
    #[arg(long, default_value_t = 4)]
    sources: u32,
    /// Resource requested at bind.
    #[arg(long, default_value = "bench")]
    resource: String,
    /// Sessions logging in at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds one login (connect to bound session) may take before it counts as a timeout.
    #[arg(long, default_value_t = 30.0)]
    login_timeout: f64,
    /// The server's process id: its CPU time (/proc/PID/stat) and RSS (/proc/PID/status) are
    /// reported next to the tool's own.
    #[arg(long)]
    pid: Option<u32>,
    /// Label for the server in the report and JSON (e.g. "halyard-0.1 tls").
    #[arg(long, default_value = "")]
    label: String,
    /// Append one JSON object per run to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep SCRAM salted passwords in this file across runs, so the tool's PBKDF2 work is done
    /// once per account (the file holds the benchmark password: benchmark machines only).
    #[arg(long)]
    scram_cache: Option<PathBuf>,
}

impl Common {
    fn target(&self) -> anyhow::Result<Target> {
        let addr: SocketAddr = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}:{}", self.host, self.port))?
            .find(|a| a.is_ipv4())
            .with_context(|| format!("{} has no IPv4 address", self.host))?;
        let cache = match &self.scram_cache {
            Some(p) => scram::SaltCache::load(p)?,
            None => scram::SaltCache::default(),
        };
        Ok(Target {
            addr,
            domain: self.domain.clone(),
            user_pattern: self.user_pattern.clone(),
            password: self.password.clone(),
            tls: self.tls,
            mech: self.mech,
            sources: xmpp::loopback_sources(self.sources)?,
            resource: self.resource.clone(),
            tls_config: xmpp::insecure_tls_config()?,
            cache: Arc::new(cache),
        })
    }

    fn login_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.login_timeout.max(0.001))
    }

    fn save_cache(&self, t: &Target) -> anyhow::Result<()> {
        if let Some(p) = &self.scram_cache {
            t.cache.save(p)?;
        }
        Ok(())
    }

    /// The JSON fields every run carries.
    fn json(&self, scenario: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("scenario".into(), json!(scenario));
        m.insert("label".into(), json!(self.label));
        m.insert("time".into(), json!(stats::unix_secs()));
        m.insert("host".into(), json!(self.host));
        m.insert("port".into(), json!(self.port));
        m.insert("domain".into(), json!(self.domain));
        m.insert("tls".into(), json!(self.tls));
        m.insert("mech".into(), json!(self.mech.map(|m| m.name())));
        m.insert("sources".into(), json!(self.sources));
        m.insert("concurrency".into(), json!(self.concurrency));
        m.insert("server_pid".into(), json!(self.pid));
        m
    }

    fn write_json(&self, m: serde_json::Map<String, Value>) -> anyhow::Result<()> {
        if let Some(p) = &self.json {
            stats::append_json(p, &Value::Object(m))?;
            println!("appended to {}", p.display());
        }
        Ok(())
    }
}

/// Logs in accounts `first..first+n` with at most `concurrency` logins at once; returns the
/// sessions (indexed by position, `None` where the login failed), the login latencies and the
/// errors. Used by `chat` and `mam` to set up; `connect` paces its own.
async fn login_all(
    c: &Common,
    t: &Arc<Target>,
    n: u64,
    presence: bool,
) -> (Vec<Option<Session>>, Latency, Errors) {
    let sem = Arc::new(tokio::sync::Semaphore::new(c.concurrency.max(1)));
    let timeout = c.login_timeout();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = t.clone();
        let sem = sem.clone();
        let first = c.first;
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let start = Instant::now();
            let r = tokio::time::timeout(timeout, xmpp::login(&t, first + i, presence)).await;
            (start.elapsed(), r)
        }));
    }
    let mut sessions = Vec::with_capacity(n as usize);
    let mut lat = Latency::new();
    let mut errors = Errors::default();
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok((took, Ok(Ok(s)))) => {
                lat.record(took);
                sessions.push(Some(s));
            }
            Ok((_, Ok(Err(e)))) => {
                errors.add(e.stage.kind());
                first_error.get_or_insert_with(|| e.to_string());
                sessions.push(None);
            }
            Ok((_, Err(_))) => {
                errors.add("timeout");
                sessions.push(None);
            }
            Err(_) => {
                errors.add("panic");
                sessions.push(None);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("first login error: {e}");
    }
    (sessions, lat, errors)
}

/// "server 1.234 s (0.617 cores), tool 0.321 s (0.160 cores)".
fn cpu_line(a: &Sample, b: &Sample) -> String {
    let (server, own, wall) = procfs::cpu_between(a, b);
    let wall = wall.max(1e-9);
    let server = match server {
        Some(s) => format!("server {s:.3} s ({:.2} cores)", s / wall),
        None => "server n/a (no --pid, or the process is gone)".into(),
    };
    format!(
        "CPU: {server}, tool {own:.3} s ({:.2} cores) over {wall:.2} s",
        own / wall
    )
}

fn main() -> anyhow::Result<()> {
    stats::init_clock();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Archive(a) => rt.block_on(archive::run(a)),
        Cmd::Users(a) => rt.block_on(users::run(a)),
        Cmd::Connect(a) => rt.block_on(connect::run(a)),
        Cmd::Chat(a) => rt.block_on(chat::run(a)),
        Cmd::Mam(a) => rt.block_on(mam::run(a)),
        Cmd::Soak(a) => rt.block_on(soak::run(a)),
    }
}
