//! `connect`: open N authenticated sessions at a given rate, hold them idle, and report login
//! throughput and latency, the server's memory per idle session and CPU per login.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::procfs::Sample;
use crate::stats::{Errors, Latency, Pacer};
use crate::{cpu_line, procfs, xmpp, Common};

#[derive(clap::Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    c: Common,
    /// Sessions to open (accounts first..first+N).
    #[arg(long, short = 'n', default_value_t = 1000)]
    count: u64,
    /// Logins started per second; 0 = as fast as --concurrency allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds to hold the sessions idle after the last login finished (includes --settle).
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Seconds after the last login before the server's RSS is read (lets it settle).
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Send initial presence after binding (an available session, as a real client's).
    #[arg(long)]
    presence: bool,
}

enum Outcome {
    Ok(Duration),
    Failed(&'static str, String),
}

pub async fn run(a: ConnectArgs) -> anyhow::Result<()> {
    let c = &a.c;
    let t = Arc::new(c.target()?);
    let n = a.count;
    println!(
        "connect: {n} sessions to {} ({}, {}), rate {}, concurrency {}, sources {}",
        t.addr,
        if c.tls { "STARTTLS" } else { "plain" },
        c.mech.map(|m| m.name()).unwrap_or("best SASL mechanism"),
        if a.rate > 0.0 {
            format!("{}/s", a.rate)
        } else {
            "unpaced".into()
        },
        c.concurrency,
        c.sources
    );
    let s0 = Sample::take(c.pid);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (res_tx, mut res_rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let dropped = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(c.concurrency.max(1)));
    let timeout = c.login_timeout();
    let (first, presence, rate) = (c.first, a.presence, a.rate);
    let launcher = {
        let t = t.clone();
        let dropped = dropped.clone();
        tokio::spawn(async move {
            let mut pacer = Pacer::new(rate, Duration::ZERO);
            let mut handles = Vec::with_capacity(n as usize);
            let mut launched = 0u64;
            while launched < n {
                let due = if pacer.unpaced() {
                    n - launched
                } else {
                    pacer.due().await
                };
                for _ in 0..due.min(n - launched) {
                    let Ok(permit) = sem.clone().acquire_owned().await else {
                        return handles;
                    };
                    let (t, res_tx, mut stop_rx, dropped) =
                        (t.clone(), res_tx.clone(), stop_rx.clone(), dropped.clone());
                    let i = first + launched;
                    handles.push(tokio::spawn(async move {
                        let start = Instant::now();
                        let r = tokio::time::timeout(timeout, xmpp::login(&t, i, presence)).await;
                        drop(permit);
                        let mut s = match r {
                            Ok(Ok(s)) => {
                                let _ = res_tx.send(Outcome::Ok(start.elapsed()));
                                s
                            }
                            Ok(Err(e)) => {
                                let _ = res_tx.send(Outcome::Failed(e.stage.kind(), e.to_string()));
                                return;
                            }
                            Err(_) => {
                                let _ = res_tx.send(Outcome::Failed(
                                    "timeout",
                                    format!("login of account {i} timed out"),
                                ));
                                return;
                            }
                        };
                        // Hold: read (and answer pings) until told to stop.
                        loop {
                            tokio::select! {
                                r = s.next_element() => if r.is_err() {
                                    dropped.fetch_add(1, Ordering::Relaxed);
                                    return;
                                },
                                _ = stop_rx.changed() => break,
                            }
                        }
                        s.close().await;
                    }));
                    launched += 1;
                }
            }
            handles
        })
    };

    let start = Instant::now();
    let mut lat = Latency::new();
    let mut errors = Errors::default();
    let mut first_error = None;
    for _ in 0..n {
        match res_rx.recv().await {
            Some(Outcome::Ok(d)) => lat.record(d),
            Some(Outcome::Failed(kind, msg)) => {
                errors.add(kind);
                first_error.get_or_insert(msg);
            }
            None => break,
        }
    }
    let login_secs = start.elapsed().as_secs_f64();
    let s1 = Sample::take(c.pid);
    let ok = lat.count();
    tokio::time::sleep(Duration::from_secs_f64(a.settle.max(0.0))).await;
    let s2 = Sample::take(c.pid);
    tokio::time::sleep(Duration::from_secs_f64((a.hold - a.settle).max(0.0))).await;
    let s3 = Sample::take(c.pid);
    let _ = stop_tx.send(true);
    let handles = launcher.await.unwrap_or_default();
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    c.save_cache(&t)?;

    let (server_login_cpu, own_login_cpu, _) = procfs::cpu_between(&s0, &s1);
    let (server_hold_cpu, _, hold_secs) = procfs::cpu_between(&s1, &s3);
    let dropped = dropped.load(Ordering::Relaxed);
    let rss_per = match (s0.server_rss_kib, s2.server_rss_kib) {
        (Some(b), Some(a2)) if ok > 0 => Some((a2 as f64 - b as f64) / ok as f64),
        _ => None,
    };
    println!(
        "sessions: {ok}/{n} logged in in {login_secs:.2} s: {:.1} logins/s",
        ok as f64 / login_secs.max(1e-9)
    );
    println!("login latency: {}", lat.line());
    println!("errors: {}", errors.line());
    if let Some(e) = &first_error {
        println!("  first error: {e}");
    }
    println!("login phase {}", cpu_line(&s0, &s1));
    if let (Some(cpu), true) = (server_login_cpu, ok > 0) {
        println!(
            "  server CPU per login: {:.3} ms (tool: {:.3} ms)",
            cpu * 1e3 / ok as f64,
            own_login_cpu * 1e3 / ok as f64
        );
    }
    match (s0.server_rss_kib, s2.server_rss_kib) {
        (Some(b), Some(a2)) => println!(
            "server RSS: {b} KiB before, {a2} KiB {:.1} s after the last login: {} KiB per idle session",
            a.settle,
            rss_per.map(|p| format!("{p:.2}")).unwrap_or_else(|| "n/a".into())
        ),
        _ => println!("server RSS: n/a (no --pid, or the process is gone)"),
    }
    println!(
        "hold: {hold_secs:.1} s, {dropped} sessions dropped by the server, server CPU while idle: {}",
        server_hold_cpu
            .map(|c| format!("{:.3} s", c))
            .unwrap_or_else(|| "n/a".into())
    );
    println!(
        "tool RSS: {} KiB; SCRAM salted-password cache: {} hits, {} misses",
        s2.own_rss_kib,
        t.cache.hits.load(Ordering::Relaxed),
        t.cache.misses.load(Ordering::Relaxed)
    );
    let mut m = c.json("connect");
    m.insert(
        "params".into(),
        json!({"count": n, "rate": a.rate, "hold_s": a.hold, "settle_s": a.settle, "presence": a.presence, "first": c.first}),
    );
    m.insert("sessions_ok".into(), json!(ok));
    m.insert("login_secs".into(), json!(login_secs));
    m.insert(
        "logins_per_s".into(),
        json!(ok as f64 / login_secs.max(1e-9)),
    );
    m.insert("login_latency".into(), lat.json());
    m.insert("errors".into(), errors.json());
    m.insert("dropped_during_hold".into(), json!(dropped));
    m.insert("server_cpu_login_s".into(), json!(server_login_cpu));
    m.insert(
        "server_cpu_ms_per_login".into(),
        json!(server_login_cpu
            .filter(|_| ok > 0)
            .map(|c| c * 1e3 / ok as f64)),
    );
    m.insert("tool_cpu_login_s".into(), json!(own_login_cpu));
    m.insert("server_rss_before_kib".into(), json!(s0.server_rss_kib));
    m.insert("server_rss_after_kib".into(), json!(s2.server_rss_kib));
    m.insert("server_kib_per_session".into(), json!(rss_per));
    m.insert("server_cpu_hold_s".into(), json!(server_hold_cpu));
    m.insert("hold_secs".into(), json!(hold_secs));
    m.insert("tool_rss_kib".into(), json!(s2.own_rss_kib));
    c.write_json(m)?;
    Ok(())
}
