//! `soak`: a long run of mixed, steady load, reported every `--interval` seconds, to show that
//! the server's memory, file descriptors, errors and latency stay flat (not a throughput test).
//!
//! Four loads run together for `--duration` seconds:
//!
//! - **chat**: `--pairs P` pairs (accounts first..first+2P) exchange messages both ways at
//!   `--rate` messages/s in total, as `chat` does (same body encoding: send time and sequence);
//!   delivery latency, losses, duplicates and reordering are counted.
//! - **presence storms**: `--presence-sessions S` sessions (the next S accounts) in groups of
//!   `--roster-size` G, every member mutually subscribed to every other of its group (set up over
//!   the wire at the start: pre-approval, then subscription requests, checked with a roster get).
//!   Every `--storm-every` seconds a batch of them (`--storm-batch`, default all) each broadcast
//!   `--storm-updates` presence updates (show away / available, the status carrying the send
//!   time), which the server fans out to the G−1 contacts: presence deliveries and latency.
//! - **connection churn**: `--churn-rate` logins per second (connect, STARTTLS, SASL, bind,
//!   initial presence) cycling through `--churn-accounts` accounts after the storm ones; each
//!   session stays `--churn-hold` seconds, then closes its stream, or, every
//!   `--churn-abrupt-every`th, just drops the TCP connection.
//! - **archive queries**: `--mam-sessions` extra sessions (resource `mam`, no presence) of the
//!   chat pairs' first accounts query their own growing archives at `--mam-rate` queries/s in
//!   total (newest page, RSM before/after a known id, start at a known time, in turn).
//!
//! Every interval one row: the server's RSS, open file descriptors (`/proc/PID/fd`), CPU, and the
//! interval's counts and latency percentiles. The server's descriptors are also counted with only
//! the steady sessions open, before the load starts and after it stopped and drained (the "quiet"
//! counts: a leak shows as a difference). The verdict compares the end of the warm-up with the
//! end of the run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::Rng as _;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::chat::{decode_body, encode_body, push_u64, Seen};
use crate::procfs::{self, Sample};
use crate::stats::{self, now_ns, Errors, Latency, Pacer};
use crate::xmpp::{self, attr, child_text, name, Session, Target};
use crate::{login_all, Common};

#[derive(clap::Args)]
pub struct SoakArgs {
    #[command(flatten)]
    c: Common,
    /// Seconds of load (1800: 30 minutes).
    #[arg(long, default_value_t = 1800.0)]
    duration: f64,
    /// Seconds from the start counted as warm-up (excluded from the verdict's baselines);
    /// default: 20 % of --duration.
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds between report rows.
    #[arg(long, default_value_t = 30.0)]
    interval: f64,
    /// Chat pairs (accounts first..first+2P), messages both ways.
    #[arg(long, default_value_t = 50)]
    pairs: u64,
    /// Chat messages per second over all senders together.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Chat body length in bytes.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Churn logins started per second (each a new connection; 0: no churn).
    #[arg(long, default_value_t = 20.0)]
    churn_rate: f64,
    /// Accounts the churn cycles through (after the presence accounts); at least
    /// 2 × churn-rate × (churn-hold + login time), so one account is never logged in twice.
    #[arg(long, default_value_t = 1000)]
    churn_accounts: u64,
    /// Seconds each churn session stays connected (answering pings) before it leaves.
    #[arg(long, default_value_t = 2.0)]
    churn_hold: f64,
    /// Every Nth churn session drops its TCP connection without closing the stream (0: never).
    #[arg(long, default_value_t = 4)]
    churn_abrupt_every: u64,
    /// Sessions taking part in presence storms (accounts after the chat pairs; 0: none).
    #[arg(long, default_value_t = 100)]
    presence_sessions: u64,
    /// Size of each group of mutually subscribed presence accounts (each has G−1 contacts).
    #[arg(long, default_value_t = 10)]
    roster_size: u64,
    /// Seconds between presence storms.
    #[arg(long, default_value_t = 15.0)]
    storm_every: f64,
    /// Sessions broadcasting in each storm (taken in turn); default: all presence sessions.
    #[arg(long)]
    storm_batch: Option<u64>,
    /// Presence updates each broadcasting session sends per storm.
    #[arg(long, default_value_t = 1)]
    storm_updates: u64,
    /// Sessions querying archives (second resources of the chat pairs' first accounts).
    #[arg(long, default_value_t = 4)]
    mam_sessions: u64,
    /// Archive queries per second over all MAM sessions (one in flight per session).
    #[arg(long, default_value_t = 20.0)]
    mam_rate: f64,
    /// Archive page size (RSM max).
    #[arg(long, default_value_t = 20)]
    mam_max: u32,
    /// Seconds receivers keep reading after the load stops, before losses are counted.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Seconds one archive query may take before it counts as an error.
    #[arg(long, default_value_t = 10.0)]
    query_timeout: f64,
    /// Write the rows and the verdict as a markdown table to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// RSS growth from the end of the warm-up to the end that still counts as flat, in percent.
    #[arg(long, default_value_t = 10.0)]
    rss_tolerance_pct: f64,
    /// Descriptors the quiet count after the run may exceed the one before it and count as flat.
    #[arg(long, default_value_t = 4)]
    fd_tolerance: u64,
}

/// The run's phases, told to every task through a watch channel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Run,
    /// Stop sending (receivers keep reading: the drain).
    Stop,
    /// Close the sessions and return.
    Close,
}

/// Counters and histograms every task records into; the reporter reads and resets the
/// histograms each interval (counters are cumulative, the reporter takes differences).
#[derive(Default)]
struct Shared {
    chat_sent: AtomicU64,
    chat_recv: AtomicU64,
    chat_dups: AtomicU64,
    chat_ooo: AtomicU64,
    chat_lat: Mutex<Latency>,
    churn_ok: AtomicU64,
    churn_err: AtomicU64,
    churn_lat: Mutex<Latency>,
    pres_sent: AtomicU64,
    pres_expected: AtomicU64,
    pres_recv: AtomicU64,
    pres_lat: Mutex<Latency>,
    mam_ok: AtomicU64,
    mam_err: AtomicU64,
    mam_lat: Mutex<Latency>,
    errors: Mutex<Errors>,
    errors_total: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn error(&self, kind: &str, detail: impl FnOnce() -> String) {
        self.errors_total.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            e.add(kind);
        }
        if let Ok(mut f) = self.first_error.lock() {
            if f.is_none() {
                *f = Some(format!("{kind}: {}", detail()));
            }
        }
    }
}

fn record(h: &Mutex<Latency>, ns: u64) {
    if let Ok(mut h) = h.lock() {
        h.record_ns(ns);
    }
}

fn take(h: &Mutex<Latency>) -> Latency {
    h.lock()
        .map(|mut h| std::mem::take(&mut *h))
        .unwrap_or_default()
}

/// Waits until the phase is at least `p` (or the sender is gone).
async fn until(rx: &mut watch::Receiver<Phase>, p: Phase) {
    let _ = rx.wait_for(|&x| x as u8 >= p as u8).await;
}

// --- chat -------------------------------------------------------------------------------------

#[derive(Default)]
struct ChatOut {
    sent: u64,
    unique: u64,
}

async fn chat_task(
    mut s: Session,
    peer: String,
    per_sender_rate: f64,
    body_bytes: usize,
    start: Instant,
    sh: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> ChatOut {
    let mut o = ChatOut::default();
    let head = format!("<message type='chat' to='{peer}' id='m").into_bytes();
    let mut wbuf: Vec<u8> = Vec::with_capacity(1024);
    let mut seen = Seen::default();
    let mut max_seq: Option<u64> = None;
    let jitter = rand::thread_rng().gen_range(0.0..1.0) / per_sender_rate.max(1e-9);
    let mut pacer = Pacer::new(
        per_sender_rate,
        start.saturating_duration_since(Instant::now()) + Duration::from_secs_f64(jitter),
    );
    let mut sending = per_sender_rate > 0.0;
    loop {
        tokio::select! {
            r = s.next_element() => match r {
                Ok(range) => {
                    let el = s.get(range);
                    if name(el) != b"message" {
                        continue;
                    }
                    if attr(el, b"type") == Some(b"error") {
                        sh.error("chat-message-error", || String::from_utf8_lossy(el).into_owned());
                        continue;
                    }
                    let Some((ts, seq)) = child_text(el, b"body").and_then(decode_body) else {
                        continue;
                    };
                    let now = now_ns();
                    if !seen.insert(seq) {
                        sh.chat_dups.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    o.unique += 1;
                    if max_seq.is_some_and(|m| seq < m) {
                        sh.chat_ooo.fetch_add(1, Ordering::Relaxed);
                    }
                    max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
                    sh.chat_recv.fetch_add(1, Ordering::Relaxed);
                    record(&sh.chat_lat, now.saturating_sub(ts));
                }
                Err(e) => {
                    sh.error("chat-session-lost", || format!("{}: {e:#}", s.jid));
                    return o;
                }
            },
            n = pacer.due(), if sending => {
                // A tick late by more than a second does not turn into an unbounded burst.
                let n = n.min((per_sender_rate as u64).max(1));
                if n == 0 {
                    continue;
                }
                wbuf.clear();
                let ts = now_ns();
                for _ in 0..n {
                    wbuf.extend_from_slice(&head);
                    push_u64(&mut wbuf, o.sent);
                    wbuf.extend_from_slice(b"'><body>");
                    encode_body(&mut wbuf, ts, o.sent, body_bytes);
                    wbuf.extend_from_slice(b"</body></message>");
                    o.sent += 1;
                }
                if let Err(e) = s.send(&wbuf).await {
                    sh.error("chat-session-lost", || format!("{}: {e:#}", s.jid));
                    return o;
                }
                sh.chat_sent.fetch_add(n, Ordering::Relaxed);
            }
            r = phase.changed() => {
                let p = if r.is_ok() { *phase.borrow_and_update() } else { Phase::Close };
                sending &= p == Phase::Run;
                if p == Phase::Close {
                    break;
                }
            }
        }
    }
    s.close().await;
    o
}

// --- presence ---------------------------------------------------------------------------------

const ROSTER_GET: &str = "<query xmlns='jabber:iq:roster'/>";

/// Answers a roster push (an `<iq type='set'/>` from the server) with a result, as a client
/// must; true when `el` was one.
async fn answer_push(s: &mut Session, el_range: std::ops::Range<usize>) -> anyhow::Result<bool> {
    let el = s.get(el_range);
    if name(el) != b"iq" || attr(el, b"type") != Some(b"set") {
        return Ok(false);
    }
    let id = attr(el, b"id").unwrap_or_default();
    let mut reply = b"<iq type='result' id='".to_vec();
    reply.extend_from_slice(id);
    reply.extend_from_slice(b"'/>");
    s.send(&reply).await?;
    Ok(true)
}

/// Sends `stanzas`, then a roster get, and reads until its result (the server handles a
/// session's stanzas in order, so the stanzas have been processed): returns the roster.
async fn send_and_sync(s: &mut Session, stanzas: &str, id: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = stanzas.to_string();
    out.push_str(&format!("<iq type='get' id='{id}'>{ROSTER_GET}</iq>"));
    s.send(out.as_bytes()).await?;
    loop {
        let r = s.next_element().await?;
        if answer_push(s, r.clone()).await? {
            continue;
        }
        let el = s.get(r);
        if name(el) == b"iq" && attr(el, b"id") == Some(id.as_bytes()) {
            if attr(el, b"type") != Some(b"result") {
                bail!("roster get refused: {}", String::from_utf8_lossy(el));
            }
            return Ok(el.to_vec());
        }
    }
}

/// Runs one setup step on every presence session at once and waits for all (a barrier between
/// steps, so no two steps touch the same roster item at the same time).
async fn step<F>(
    sessions: Vec<Session>,
    f: F,
) -> anyhow::Result<Vec<(Session, anyhow::Result<Vec<u8>>)>>
where
    F: Fn(usize) -> (String, String),
{
    let mut tasks = Vec::with_capacity(sessions.len());
    for (k, mut s) in sessions.into_iter().enumerate() {
        let (stanzas, id) = f(k);
        tasks.push(tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                send_and_sync(&mut s, &stanzas, &id),
            )
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no roster result within 60 s")));
            (s, r)
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.context("a presence setup task panicked")?);
    }
    Ok(out)
}

/// Makes every presence session's group mutually subscribed: (1) everyone pre-approves every
/// contact, (2) the lower-numbered of each pair asks, (3) the higher-numbered asks, (4) each
/// roster is fetched and must hold its G−1 contacts with subscription both. Returns the
/// sessions.
async fn setup_rosters(
    t: &Target,
    first: u64,
    sessions: Vec<Session>,
    group: u64,
) -> anyhow::Result<Vec<Session>> {
    let n = sessions.len() as u64;
    let contacts = move |k: u64| {
        let g0 = k / group * group;
        (g0..(g0 + group).min(n)).filter(move |&j| j != k)
    };
    let stanzas = |k: usize, kind: &str, pick: &dyn Fn(u64, u64) -> bool| {
        let k = k as u64;
        contacts(k)
            .filter(|&j| pick(k, j))
            .map(|j| format!("<presence type='{kind}' to='{}'/>", t.bare_jid(first + j)))
            .collect::<String>()
    };
    let check =
        |r: Vec<(Session, anyhow::Result<Vec<u8>>)>, what: &str| -> anyhow::Result<Vec<Session>> {
            let mut ok = Vec::with_capacity(r.len());
            for (s, res) in r {
                if let Err(e) = res {
                    bail!("presence setup ({what}) failed for {}: {e:#}", s.jid);
                }
                ok.push(s);
            }
            Ok(ok)
        };
    let r = step(sessions, |k| {
        (stanzas(k, "subscribed", &|_, _| true), "pre".into())
    })
    .await?;
    let sessions = check(r, "pre-approval")?;
    let r = step(sessions, |k| {
        (stanzas(k, "subscribe", &|k, j| k < j), "up".into())
    })
    .await?;
    let sessions = check(r, "requests up")?;
    let r = step(sessions, |k| {
        (stanzas(k, "subscribe", &|k, j| k > j), "down".into())
    })
    .await?;
    let sessions = check(r, "requests down")?;
    // Every request has been handled now: the rosters as they stand.
    let r = step(sessions, |_| (String::new(), "check".into())).await?;
    let mut sessions = Vec::with_capacity(r.len());
    let mut short = 0;
    for (k, (s, res)) in r.into_iter().enumerate() {
        let roster = res.map_err(|e| anyhow::anyhow!("presence setup failed: {e:#}"))?;
        let both = memchr::memmem::find_iter(&roster, b"subscription='both'").count()
            + memchr::memmem::find_iter(&roster, b"subscription=\"both\"").count();
        if (both as u64) < contacts(k as u64).count() as u64 {
            short += 1;
            if short == 1 {
                eprintln!(
                    "roster of {} after setup: {}",
                    s.jid,
                    String::from_utf8_lossy(&roster)
                );
            }
        }
        sessions.push(s);
    }
    if short > 0 {
        bail!("{short} presence sessions lack mutual subscriptions after setup");
    }
    Ok(sessions)
}

struct StormPlan {
    index: u64,
    sessions: u64,
    contacts: u64,
    batch: u64,
    updates: u64,
    every: Duration,
    start: Instant,
}

async fn storm_task(
    mut s: Session,
    p: StormPlan,
    sh: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let own_bare = s.jid.split('/').next().unwrap_or_default().to_string();
    // Storms fall half a period after the start and every period after that, so with rows every
    // whole number of periods a storm never straddles a row boundary.
    let mut tick = tokio::time::interval_at((p.start + p.every / 2).into(), p.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut storm = 0u64;
    let mut seq = 0u64;
    let mut sending = true;
    let mut wbuf = Vec::with_capacity(512);
    loop {
        tokio::select! {
            r = s.next_element() => match r {
                Ok(range) => {
                    match answer_push(&mut s, range.clone()).await {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => {
                            sh.error("presence-session-lost", || format!("{}: {e:#}", s.jid));
                            return;
                        }
                    }
                    let el = s.get(range);
                    if name(el) != b"presence" {
                        continue;
                    }
                    if attr(el, b"type") == Some(b"error") {
                        sh.error("presence-error", || String::from_utf8_lossy(el).into_owned());
                        continue;
                    }
                    // Our own broadcast reflected to us is not a delivery to a contact.
                    let from = attr(el, b"from").unwrap_or_default();
                    if from.split(|&c| c == b'/').next() == Some(own_bare.as_bytes()) {
                        continue;
                    }
                    let Some((ts, _)) = child_text(el, b"status").and_then(decode_body) else {
                        continue;
                    };
                    sh.pres_recv.fetch_add(1, Ordering::Relaxed);
                    record(&sh.pres_lat, now_ns().saturating_sub(ts));
                }
                Err(e) => {
                    sh.error("presence-session-lost", || format!("{}: {e:#}", s.jid));
                    return;
                }
            },
            _ = tick.tick(), if sending => {
                // Storm k: sessions k*B .. k*B+B (mod S) broadcast.
                let from = (storm * p.batch) % p.sessions;
                storm += 1;
                if (p.index + p.sessions - from) % p.sessions >= p.batch {
                    continue;
                }
                wbuf.clear();
                for _ in 0..p.updates {
                    wbuf.extend_from_slice(if seq.is_multiple_of(2) {
                        b"<presence><show>away</show><status>"
                    } else {
                        b"<presence><status>"
                    });
                    encode_body(&mut wbuf, now_ns(), seq, 0);
                    wbuf.extend_from_slice(b"</status></presence>");
                    seq += 1;
                }
                if let Err(e) = s.send(&wbuf).await {
                    sh.error("presence-session-lost", || format!("{}: {e:#}", s.jid));
                    return;
                }
                sh.pres_sent.fetch_add(p.updates, Ordering::Relaxed);
                sh.pres_expected.fetch_add(p.updates * p.contacts, Ordering::Relaxed);
            }
            r = phase.changed() => {
                let ph = if r.is_ok() { *phase.borrow_and_update() } else { Phase::Close };
                sending &= ph == Phase::Run;
                if ph == Phase::Close {
                    break;
                }
            }
        }
    }
    s.close().await;
}

// --- churn ------------------------------------------------------------------------------------

async fn churn_one(
    t: Arc<Target>,
    account: u64,
    hold: Duration,
    abrupt: bool,
    timeout: Duration,
    sh: Arc<Shared>,
) {
    let start = Instant::now();
    let mut s = match tokio::time::timeout(timeout, xmpp::login(&t, account, true)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            sh.churn_err.fetch_add(1, Ordering::Relaxed);
            sh.error(&format!("churn-{}", e.stage.kind()), || e.to_string());
            return;
        }
        Err(_) => {
            sh.churn_err.fetch_add(1, Ordering::Relaxed);
            sh.error("churn-timeout", || format!("login of account {account}"));
            return;
        }
    };
    sh.churn_ok.fetch_add(1, Ordering::Relaxed);
    record(&sh.churn_lat, start.elapsed().as_nanos() as u64);
    // Reads (answering pings) for the hold; an error ends it early.
    let held = tokio::time::timeout(hold, async {
        loop {
            if let Err(e) = s.next_element().await {
                return e;
            }
        }
    })
    .await;
    if let Ok(e) = held {
        sh.error("churn-dropped", || format!("{}: {e:#}", s.jid));
        return;
    }
    if abrupt {
        drop(s);
    } else {
        s.close().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn churn_launcher(
    t: Arc<Target>,
    first: u64,
    accounts: u64,
    rate: f64,
    hold: Duration,
    abrupt_every: u64,
    timeout: Duration,
    sh: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut pacer = Pacer::new(rate, Duration::ZERO);
    let mut running = tokio::task::JoinSet::new();
    let mut k = 0u64;
    loop {
        tokio::select! {
            n = pacer.due() => {
                for _ in 0..n.min(rate.ceil() as u64) {
                    let abrupt = abrupt_every > 0 && k % abrupt_every == abrupt_every - 1;
                    running.spawn(churn_one(t.clone(), first + k % accounts, hold, abrupt, timeout, sh.clone()));
                    k += 1;
                }
                while running.try_join_next().is_some() {}
            }
            r = phase.changed() => {
                if r.is_err() || *phase.borrow_and_update() != Phase::Run {
                    break;
                }
            }
        }
    }
    while running.join_next().await.is_some() {}
}

// --- archive queries --------------------------------------------------------------------------

async fn mam_task(
    mut s: Session,
    rate: f64,
    max: u32,
    timeout: Duration,
    start: Instant,
    sh: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    use rand::seq::SliceRandom as _;
    let jitter = rand::thread_rng().gen_range(0.0..1.0) / rate.max(1e-9);
    let mut pacer = Pacer::new(
        rate,
        start.saturating_duration_since(Instant::now()) + Duration::from_secs_f64(jitter),
    );
    let mut ids: Vec<String> = Vec::new();
    let mut stamps: Vec<String> = Vec::new();
    let mut qid = 0u64;
    loop {
        tokio::select! {
            n = pacer.due() => {
                if n == 0 {
                    continue;
                }
                qid += 1;
                // Newest page, then RSM before/after a known id, then from a known time.
                let (form, rsm) = match qid % 3 {
                    1 if !ids.is_empty() => {
                        let id = ids.choose(&mut rand::thread_rng()).cloned().unwrap_or_default();
                        if qid.is_multiple_of(2) {
                            (String::new(), format!("<after>{id}</after>"))
                        } else {
                            (String::new(), format!("<before>{id}</before>"))
                        }
                    }
                    2 if !stamps.is_empty() => {
                        let st = stamps.choose(&mut rand::thread_rng()).cloned().unwrap_or_default();
                        (crate::mam::start_form(&st), String::new())
                    }
                    _ => (String::new(), "<before/>".to_string()),
                };
                let start = Instant::now();
                let r = tokio::time::timeout(
                    timeout,
                    crate::mam::query(&mut s, qid, &form, &rsm, max, true),
                )
                .await;
                match r {
                    Ok(Ok(page)) if page.ok => {
                        sh.mam_ok.fetch_add(1, Ordering::Relaxed);
                        record(&sh.mam_lat, start.elapsed().as_nanos() as u64);
                        // Keep a bounded sample of known ids and times to query from.
                        for (v, new) in [(&mut ids, page.ids), (&mut stamps, page.stamps)] {
                            for x in new {
                                if v.len() < 1000 {
                                    v.push(x);
                                } else {
                                    let i = rand::thread_rng().gen_range(0..v.len());
                                    v[i] = x;
                                }
                            }
                        }
                    }
                    Ok(Ok(_)) => {
                        sh.mam_err.fetch_add(1, Ordering::Relaxed);
                        sh.error("mam-query-error", || format!("query {qid} of {}", s.jid));
                    }
                    Ok(Err(e)) => {
                        sh.mam_err.fetch_add(1, Ordering::Relaxed);
                        sh.error("mam-session-lost", || format!("{}: {e:#}", s.jid));
                        return;
                    }
                    Err(_) => {
                        sh.mam_err.fetch_add(1, Ordering::Relaxed);
                        sh.error("mam-timeout", || format!("query {qid} of {}", s.jid));
                    }
                }
            }
            r = phase.changed() => {
                if r.is_err() || *phase.borrow_and_update() != Phase::Run {
                    break;
                }
            }
        }
    }
    until(&mut phase, Phase::Close).await;
    s.close().await;
}

// --- rows and verdict -------------------------------------------------------------------------

/// One report row (one interval).
#[derive(Clone, Debug, Default)]
struct Row {
    t_s: f64,
    rss_kib: Option<u64>,
    fds: Option<u64>,
    cpu_pct: Option<f64>,
    tool_cpu_pct: f64,
    chat_sent: u64,
    chat_recv: u64,
    chat_p50: f64,
    chat_p99: f64,
    chat_max: f64,
    chat_unacked: u64,
    churn_ok: u64,
    churn_err: u64,
    churn_p99: f64,
    pres_sent: u64,
    pres_recv: u64,
    pres_p99: f64,
    pres_max: f64,
    mam_ok: u64,
    mam_err: u64,
    mam_p99: f64,
    errors: u64,
    errors_total: u64,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "t_s": self.t_s, "server_rss_kib": self.rss_kib, "server_fds": self.fds,
            "server_cpu_pct": self.cpu_pct, "tool_cpu_pct": self.tool_cpu_pct,
            "chat_sent": self.chat_sent, "chat_received": self.chat_recv,
            "chat_p50_ms": self.chat_p50, "chat_p99_ms": self.chat_p99, "chat_max_ms": self.chat_max,
            "chat_unacked": self.chat_unacked,
            "churn_logins_ok": self.churn_ok, "churn_errors": self.churn_err,
            "churn_login_p99_ms": self.churn_p99,
            "presence_sent": self.pres_sent, "presence_received": self.pres_recv,
            "presence_p99_ms": self.pres_p99, "presence_max_ms": self.pres_max,
            "mam_ok": self.mam_ok, "mam_errors": self.mam_err, "mam_p99_ms": self.mam_p99,
            "errors": self.errors, "errors_total": self.errors_total,
        })
    }

    fn line(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        format!(
            "{:>6.0} {:>9} {:>5} {:>5} {:>4.0} | {:>6} {:>6} {:>7.2} {:>7.2} {:>7.1} {:>4} | {:>4} {:>3} {:>7.1} | {:>5} {:>6} {:>7.2} | {:>4} {:>3} {:>7.2} | {:>4}",
            self.t_s,
            opt(self.rss_kib),
            opt(self.fds),
            self.cpu_pct.map_or("-".to_string(), |c| format!("{c:.0}")),
            self.tool_cpu_pct,
            self.chat_sent,
            self.chat_recv,
            self.chat_p50,
            self.chat_p99,
            self.chat_max,
            self.chat_unacked,
            self.churn_ok,
            self.churn_err,
            self.churn_p99,
            self.pres_sent,
            self.pres_recv,
            self.pres_p99,
            self.mam_ok,
            self.mam_err,
            self.mam_p99,
            self.errors_total,
        )
    }

    fn markdown(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("–".to_string(), |v| v.to_string());
        format!(
            "| {:.0} | {} | {} | {} | {}/{} | {:.2} / {:.2} / {:.1} | {}/{} | {}/{} | {:.2} | {}/{} | {:.2} | {} |",
            self.t_s,
            self.rss_kib.map_or("–".to_string(), |k| format!("{:.1}", k as f64 / 1024.0)),
            opt(self.fds),
            self.cpu_pct.map_or("–".to_string(), |c| format!("{c:.0}")),
            self.chat_sent,
            self.chat_recv,
            self.chat_p50,
            self.chat_p99,
            self.chat_max,
            self.churn_ok,
            self.churn_err,
            self.pres_sent,
            self.pres_recv,
            self.pres_p99,
            self.mam_ok,
            self.mam_err,
            self.mam_p99,
            self.errors_total,
        )
    }
}

const HEADER: &str = "   t_s   rss_kib   fds  cpu% tool |   sent   recv  p50_ms  p99_ms  max_ms unak | chrn err p99_ms | pres  p_rcv  p99_ms |  mam err  p99_ms | errs";
const MD_HEADER: &str = "| t (s) | RSS (MiB) | fds | server CPU % | chat sent/recv | chat latency p50 / p99 / max (ms) | churn logins ok/err | presence updates/deliveries | presence p99 (ms) | MAM ok/err | MAM p99 (ms) | errors (cumulative) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

/// Latencies of the post-warm-up period split into thirds (by each row's end time).
#[derive(Default)]
struct Thirds {
    chat: [Latency; 3],
    pres: [Latency; 3],
    mam: [Latency; 3],
    errors: [u64; 3],
}

/// Least-squares slope of (x, y) points, y per unit of x; None for fewer than 2 distinct x.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Whether latency stayed stable: the last third's p99 at most 1.5 × the first third's + 1 ms
/// (sub-millisecond percentiles move by more than half on a shared machine).
fn stable(first: f64, last: f64) -> bool {
    last <= first * 1.5 + 1.0
}

struct Verdict {
    lines: Vec<String>,
    pass: bool,
    json: Value,
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    a: &SoakArgs,
    warmup: f64,
    rows: &[Row],
    th: &Thirds,
    quiet: (Option<u64>, Option<u64>),
    lost: (u64, u64),
    warm_errors: u64,
    errors: &Errors,
) -> Verdict {
    let mut lines = Vec::new();
    let mut pass = true;
    let mut j = serde_json::Map::new();
    let post: Vec<&Row> = rows.iter().filter(|r| r.t_s > warmup + 1e-6).collect();
    let base = rows
        .iter()
        .rfind(|r| r.t_s <= warmup + 1e-6)
        .or(post.first().copied());
    let last = rows.last();
    // RSS
    match (base.and_then(|r| r.rss_kib), last.and_then(|r| r.rss_kib)) {
        (Some(b), Some(e)) => {
            let pct = (e as f64 - b as f64) * 100.0 / b.max(1) as f64;
            let pts: Vec<(f64, f64)> = post
                .iter()
                .filter_map(|r| r.rss_kib.map(|k| (r.t_s / 60.0, k as f64)))
                .collect();
            let sl = slope(&pts);
            let max = post.iter().filter_map(|r| r.rss_kib).max().unwrap_or(e);
            let ok = pct <= a.rss_tolerance_pct;
            pass &= ok;
            lines.push(format!(
                "RSS: {b} KiB at the end of the warm-up ({:.0} s), {e} KiB at the end: {pct:+.1} % (max {max} KiB, trend {} KiB/min) → {}",
                base.map_or(0.0, |r| r.t_s),
                sl.map_or("n/a".into(), |s| format!("{s:+.0}")),
                if ok { "flat" } else { "GROWING" }
            ));
            // Informational: the last third alone tells a cache still filling slowly (a trend
            // that flattens) from steady growth (the same slope to the end).
            let t0 = warmup + (a.duration - warmup) * 2.0 / 3.0;
            let tail: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|p| p.0 * 60.0 >= t0 - 1e-6)
                .collect();
            if let (Some(f), Some(l)) = (tail.first(), tail.last()) {
                lines.push(format!(
                    "  RSS in the last third: {:.0} → {:.0} KiB ({:+.1} %, trend {} KiB/min)",
                    f.1,
                    l.1,
                    (l.1 - f.1) * 100.0 / f.1.max(1.0),
                    slope(&tail).map_or("n/a".into(), |s| format!("{s:+.0}"))
                ));
                j.insert(
                    "rss_last_third_trend_kib_per_min".into(),
                    json!(slope(&tail)),
                );
            }
            j.insert("rss_warm_kib".into(), json!(b));
            j.insert("rss_end_kib".into(), json!(e));
            j.insert("rss_max_kib".into(), json!(max));
            j.insert("rss_growth_pct".into(), json!(pct));
            j.insert("rss_trend_kib_per_min".into(), json!(sl));
            j.insert("rss_flat".into(), json!(ok));
        }
        _ => lines.push("RSS: n/a (no --pid)".into()),
    }
    // File descriptors
    match (base.and_then(|r| r.fds), last.and_then(|r| r.fds)) {
        (Some(b), Some(e)) => {
            let max = post.iter().filter_map(|r| r.fds).max().unwrap_or(e);
            lines.push(format!(
                "fds under load: {b} at the end of the warm-up, {e} at the end (max {max}; churn sessions in flight move it)"
            ));
            j.insert("fds_warm".into(), json!(b));
            j.insert("fds_end".into(), json!(e));
            j.insert("fds_max".into(), json!(max));
        }
        _ => lines.push("fds: n/a (no --pid)".into()),
    }
    if let (Some(q0), Some(q1)) = quiet {
        let ok = q1 <= q0 + a.fd_tolerance;
        pass &= ok;
        lines.push(format!(
            "fds quiet (steady sessions only): {q0} before the load, {q1} after it: {:+} → {}",
            q1 as i64 - q0 as i64,
            if ok { "flat" } else { "LEAK?" }
        ));
        j.insert("fds_quiet_before".into(), json!(q0));
        j.insert("fds_quiet_after".into(), json!(q1));
        j.insert("fds_flat".into(), json!(ok));
    }
    // Errors
    let total = errors.total() + lost.0 + lost.1;
    let after = total.saturating_sub(warm_errors);
    let ok = after == 0;
    pass &= ok;
    lines.push(format!(
        "errors: {warm_errors} during the warm-up, {after} after it (by third: {} / {} / {}); chat messages lost {}, presence deliveries missing {} → {}",
        th.errors[0],
        th.errors[1],
        th.errors[2],
        lost.0,
        lost.1,
        if ok { "none" } else if th.errors[2] > th.errors[0] { "GROWING" } else { "ERRORS" }
    ));
    if !errors.0.is_empty() {
        lines.push(format!("  by kind: {}", errors.line()));
    }
    j.insert("errors_warmup".into(), json!(warm_errors));
    j.insert("errors_after_warmup".into(), json!(after));
    j.insert("errors_by_third".into(), json!(th.errors));
    j.insert("errors_by_kind".into(), errors.json());
    j.insert("chat_lost".into(), json!(lost.0));
    j.insert("presence_missing".into(), json!(lost.1));
    // Latency
    for (what, h, key) in [
        ("chat delivery", &th.chat, "chat"),
        ("presence delivery", &th.pres, "presence"),
        ("MAM query", &th.mam, "mam"),
    ] {
        if h[0].count() == 0 && h[2].count() == 0 {
            continue;
        }
        let (f, l) = (h[0].quantile_ms(0.99), h[2].quantile_ms(0.99));
        let ok = stable(f, l);
        pass &= ok;
        lines.push(format!(
            "{what} p99: {f:.2} ms in the first third after warm-up, {:.2} ms in the second, {l:.2} ms in the last (p50 {:.2} / {:.2} / {:.2} ms; n = {}, {}, {}) → {}",
            h[1].quantile_ms(0.99),
            h[0].quantile_ms(0.5),
            h[1].quantile_ms(0.5),
            h[2].quantile_ms(0.5),
            h[0].count(),
            h[1].count(),
            h[2].count(),
            if ok { "stable" } else { "DEGRADING" }
        ));
        j.insert(
            format!("{key}_p50_ms_thirds"),
            json!([
                h[0].quantile_ms(0.5),
                h[1].quantile_ms(0.5),
                h[2].quantile_ms(0.5)
            ]),
        );
        j.insert(
            format!("{key}_p99_ms_thirds"),
            json!([f, h[1].quantile_ms(0.99), l]),
        );
        j.insert(format!("{key}_stable"), json!(ok));
    }
    lines.push(format!(
        "verdict: {}",
        if pass {
            "PASS (flat)"
        } else {
            "FAIL (see above)"
        }
    ));
    j.insert("pass".into(), json!(pass));
    Verdict {
        lines,
        pass,
        json: Value::Object(j),
    }
}

// --- the run ----------------------------------------------------------------------------------

pub async fn run(a: SoakArgs) -> anyhow::Result<()> {
    let c = &a.c;
    if a.duration <= 0.0 || a.interval <= 0.0 {
        bail!("--duration and --interval must be positive");
    }
    if a.mam_sessions > a.pairs {
        bail!(
            "--mam-sessions {} > --pairs {}: MAM sessions use the pairs' accounts",
            a.mam_sessions,
            a.pairs
        );
    }
    if a.roster_size < 2 && a.presence_sessions > 0 {
        bail!("--roster-size must be at least 2");
    }
    let need = 2.0 * a.churn_rate * (a.churn_hold + 1.0);
    if a.churn_rate > 0.0 && (a.churn_accounts as f64) < need {
        bail!(
            "--churn-accounts {}: at least {need:.0} for --churn-rate {} and --churn-hold {}",
            a.churn_accounts,
            a.churn_rate,
            a.churn_hold
        );
    }
    let warmup = a.warmup.unwrap_or(a.duration * 0.2).clamp(0.0, a.duration);
    let t = Arc::new(c.target()?);
    let pres_first = c.first + 2 * a.pairs;
    let churn_first = pres_first + a.presence_sessions;
    let batch = a
        .storm_batch
        .unwrap_or(a.presence_sessions)
        .min(a.presence_sessions);
    println!(
        "soak: {} s ({} s warm-up), a row every {} s, {} to {}",
        a.duration,
        warmup,
        a.interval,
        if c.tls { "STARTTLS" } else { "plain" },
        t.addr
    );
    println!(
        "  chat: {} pairs (accounts {}..{}), {} msg/s in total, body {} B",
        a.pairs,
        c.first,
        pres_first.saturating_sub(1),
        a.rate,
        a.body_bytes
    );
    println!(
        "  presence: {} sessions (accounts {}..{}) in groups of {}, storms every {} s of {} sessions × {} updates",
        a.presence_sessions,
        pres_first,
        churn_first.saturating_sub(1),
        a.roster_size,
        a.storm_every,
        batch,
        a.storm_updates
    );
    println!(
        "  churn: {} logins/s over accounts {}..{}, held {} s, every {}th dropped abruptly, {} sources",
        a.churn_rate,
        churn_first,
        (churn_first + a.churn_accounts).saturating_sub(1),
        a.churn_hold,
        a.churn_abrupt_every,
        c.sources
    );
    println!(
        "  archive: {} sessions, {} queries/s in total, pages of {}",
        a.mam_sessions, a.mam_rate, a.mam_max
    );

    // Steady sessions: chat pairs (with presence), presence accounts (presence after the
    // rosters are set up), MAM sessions.
    let (pair_sessions, lat, errs) = login_all(c, &t, 2 * a.pairs, true).await;
    println!(
        "chat logins: {} ok, errors {}; latency {}",
        lat.count(),
        errs.line(),
        lat.line()
    );
    if errs.total() > 0 {
        bail!("{} chat logins failed", errs.total());
    }
    let mut pc = c.clone();
    pc.first = pres_first;
    let (pres_sessions, lat, errs) = login_all(&pc, &t, a.presence_sessions, false).await;
    println!(
        "presence logins: {} ok, errors {}; latency {}",
        lat.count(),
        errs.line(),
        lat.line()
    );
    if errs.total() > 0 {
        bail!("{} presence logins failed", errs.total());
    }
    let pres_sessions: Vec<Session> = pres_sessions.into_iter().flatten().collect();
    let setup = Instant::now();
    let mut pres_sessions = setup_rosters(&t, pres_first, pres_sessions, a.roster_size).await?;
    println!(
        "presence: mutual subscriptions in groups of {} set up and checked in {:.1} s",
        a.roster_size,
        setup.elapsed().as_secs_f64()
    );
    for s in &mut pres_sessions {
        s.send(b"<presence/>").await.context("initial presence")?;
    }
    let mut mt = (*t).clone();
    mt.resource = "mam".into();
    let mut mam_sessions = Vec::new();
    for i in 0..a.mam_sessions {
        let s = xmpp::login(&mt, c.first + 2 * i, false)
            .await
            .map_err(|e| anyhow::anyhow!("MAM session login: {e}"))?;
        mam_sessions.push(s);
    }
    c.save_cache(&t)?;

    let sh = Arc::new(Shared::default());
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    // The load starts in 2 s: the steady sessions' tasks start now (reading; their pacers and
    // timers begin at `start`), and the server's descriptors are counted before it.
    let start = Instant::now() + Duration::from_secs(2);
    let per_sender = a.rate / (2 * a.pairs).max(1) as f64;
    let mut chat_tasks = Vec::new();
    for (k, s) in pair_sessions.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let peer = t.bare_jid(c.first + (k as u64 ^ 1));
        chat_tasks.push(tokio::spawn(chat_task(
            s,
            peer,
            per_sender,
            a.body_bytes,
            start,
            sh.clone(),
            phase_rx.clone(),
        )));
    }
    let n_pres = pres_sessions.len() as u64;
    let mut pres_tasks = Vec::new();
    for (k, s) in pres_sessions.into_iter().enumerate() {
        let k = k as u64;
        let g0 = k / a.roster_size * a.roster_size;
        let plan = StormPlan {
            index: k,
            sessions: n_pres,
            contacts: (g0 + a.roster_size).min(n_pres) - g0 - 1,
            batch,
            updates: a.storm_updates,
            every: Duration::from_secs_f64(a.storm_every.max(0.1)),
            start,
        };
        pres_tasks.push(tokio::spawn(storm_task(
            s,
            plan,
            sh.clone(),
            phase_rx.clone(),
        )));
    }
    let mut mam_tasks = Vec::new();
    let per_mam = a.mam_rate / a.mam_sessions.max(1) as f64;
    for s in mam_sessions {
        mam_tasks.push(tokio::spawn(mam_task(
            s,
            per_mam,
            a.mam_max,
            Duration::from_secs_f64(a.query_timeout),
            start,
            sh.clone(),
            phase_rx.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fds = |pid: Option<u32>| pid.and_then(|p| procfs::fd_count(&p.to_string()).ok());
    let quiet0 = fds(c.pid);
    let quiet0_rss = Sample::take(c.pid).server_rss_kib;
    println!(
        "server descriptors with the steady sessions only, before the load: {}",
        quiet0.map_or("n/a".into(), |n| n.to_string())
    );
    let mut jm = c.json("soak");
    jm.insert("kind".into(), json!("params"));
    jm.insert(
        "params".into(),
        json!({"duration_s": a.duration, "warmup_s": warmup, "interval_s": a.interval,
               "pairs": a.pairs, "rate": a.rate, "body_bytes": a.body_bytes,
               "churn_rate": a.churn_rate, "churn_accounts": a.churn_accounts,
               "churn_hold_s": a.churn_hold, "churn_abrupt_every": a.churn_abrupt_every,
               "presence_sessions": a.presence_sessions, "roster_size": a.roster_size,
               "storm_every_s": a.storm_every, "storm_batch": batch, "storm_updates": a.storm_updates,
               "mam_sessions": a.mam_sessions, "mam_rate": a.mam_rate, "mam_max": a.mam_max,
               "first": c.first}),
    );
    jm.insert("fds_quiet_before".into(), json!(quiet0));
    c.write_json(jm)?;

    tokio::time::sleep_until(start.into()).await;
    let churn = (a.churn_rate > 0.0).then(|| {
        tokio::spawn(churn_launcher(
            t.clone(),
            churn_first,
            a.churn_accounts,
            a.churn_rate,
            Duration::from_secs_f64(a.churn_hold),
            a.churn_abrupt_every,
            c.login_timeout(),
            sh.clone(),
            phase_rx.clone(),
        ))
    });
    let end = start + Duration::from_secs_f64(a.duration);
    let mut prev = Sample::take(c.pid);
    let mut prev_counts = Counts::read(&sh);
    let mut rows: Vec<Row> = Vec::new();
    let mut thirds = Thirds::default();
    let mut warm_errors = 0u64;
    let post = (a.duration - warmup).max(1e-9);
    println!("{HEADER}");
    let mut k = 1u64;
    loop {
        let at = (start + Duration::from_secs_f64(a.interval * k as f64)).min(end);
        tokio::time::sleep_until(at.into()).await;
        let now = Sample::take(c.pid);
        let fd = fds(c.pid);
        let counts = Counts::read(&sh);
        let (server_cpu, own_cpu, wall) = procfs::cpu_between(&prev, &now);
        let wall = wall.max(1e-9);
        let (chat, churn, pres, mam) = (
            take(&sh.chat_lat),
            take(&sh.churn_lat),
            take(&sh.pres_lat),
            take(&sh.mam_lat),
        );
        let d = counts.minus(&prev_counts);
        let t_s = at.saturating_duration_since(start).as_secs_f64();
        let row = Row {
            t_s,
            rss_kib: now.server_rss_kib,
            fds: fd,
            cpu_pct: server_cpu.map(|s| s * 100.0 / wall),
            tool_cpu_pct: own_cpu * 100.0 / wall,
            chat_sent: d.chat_sent,
            chat_recv: d.chat_recv,
            chat_p50: chat.quantile_ms(0.5),
            chat_p99: chat.quantile_ms(0.99),
            chat_max: chat.max_ms(),
            chat_unacked: counts.chat_sent.saturating_sub(counts.chat_recv),
            churn_ok: d.churn_ok,
            churn_err: d.churn_err,
            churn_p99: churn.quantile_ms(0.99),
            pres_sent: d.pres_sent,
            pres_recv: d.pres_recv,
            pres_p99: pres.quantile_ms(0.99),
            pres_max: pres.max_ms(),
            mam_ok: d.mam_ok,
            mam_err: d.mam_err,
            mam_p99: mam.quantile_ms(0.99),
            errors: d.errors,
            errors_total: counts.errors,
        };
        println!("{}", row.line());
        if c.json.is_some() {
            let mut m = serde_json::Map::new();
            m.insert("scenario".into(), json!("soak"));
            m.insert("kind".into(), json!("row"));
            m.insert("label".into(), json!(c.label));
            m.insert("time".into(), json!(stats::unix_secs()));
            if let Value::Object(r) = row.json() {
                m.extend(r);
            }
            if let Some(p) = &c.json {
                stats::append_json(p, &Value::Object(m))?;
            }
        }
        // The row's interval belongs to the warm-up or to one third of the rest, by its middle.
        let mid = (rows.last().map_or(0.0, |r| r.t_s) + t_s) / 2.0;
        if mid <= warmup {
            warm_errors += d.errors;
        } else {
            let i = (((mid - warmup) / post * 3.0) as usize).min(2);
            thirds.chat[i].merge(&chat);
            thirds.pres[i].merge(&pres);
            thirds.mam[i].merge(&mam);
            thirds.errors[i] += d.errors;
        }
        rows.push(row);
        prev = now;
        prev_counts = counts;
        if at >= end {
            break;
        }
        k += 1;
    }

    // Stop sending; receivers read on; churn sessions finish their hold.
    let _ = phase_tx.send(Phase::Stop);
    let drain = a.drain.max(a.churn_hold + 1.0);
    tokio::time::sleep(Duration::from_secs_f64(drain)).await;
    if let Some(h) = churn {
        let _ = tokio::time::timeout(Duration::from_secs(60), h).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet1 = fds(c.pid);
    let quiet1_rss = Sample::take(c.pid).server_rss_kib;
    let late = Counts::read(&sh);
    let after_rows = late.errors.saturating_sub(prev_counts.errors);
    if after_rows > 0 {
        thirds.errors[2] += after_rows;
    }
    let _ = phase_tx.send(Phase::Close);
    let mut outs = Vec::with_capacity(chat_tasks.len());
    for h in chat_tasks {
        outs.push(h.await.unwrap_or_default());
    }
    for h in pres_tasks.into_iter().chain(mam_tasks) {
        let _ = h.await;
    }
    // Losses per direction: what one side sent minus what its peer received (distinct).
    let mut lost = 0u64;
    for pair in outs.chunks(2) {
        if let [x, y] = pair {
            lost += x.sent.saturating_sub(y.unique) + y.sent.saturating_sub(x.unique);
        }
    }
    let pres_missing = late.pres_expected.saturating_sub(late.pres_recv);
    let errors = sh.errors.lock().map(|e| e.clone()).unwrap_or_default();
    println!(
        "totals: chat {} sent, {} received, {} duplicates, {} out of order; churn {} logins, {} failed; presence {} updates, {} deliveries of {} expected; MAM {} queries, {} failed",
        late.chat_sent,
        late.chat_recv,
        sh.chat_dups.load(Ordering::Relaxed),
        sh.chat_ooo.load(Ordering::Relaxed),
        late.churn_ok,
        late.churn_err,
        late.pres_sent,
        late.pres_recv,
        late.pres_expected,
        late.mam_ok,
        late.mam_err
    );
    if let Some(f) = sh.first_error.lock().ok().and_then(|f| f.clone()) {
        println!("first error: {f}");
    }
    let v = verdict(
        &a,
        warmup,
        &rows,
        &thirds,
        (quiet0, quiet1),
        (lost, pres_missing),
        warm_errors,
        &errors,
    );
    let mut v = v;
    if let (Some(b), Some(e)) = (quiet0_rss, quiet1_rss) {
        // Informational: memory the load left behind (caches, allocator) is expected.
        let at = v
            .lines
            .iter()
            .position(|l| l.starts_with("fds"))
            .unwrap_or(0);
        v.lines.insert(
            at,
            format!(
                "  RSS quiet (steady sessions only): {b} KiB before the load, {e} KiB after it"
            ),
        );
        if let Value::Object(m) = &mut v.json {
            m.insert("rss_quiet_before_kib".into(), json!(b));
            m.insert("rss_quiet_after_kib".into(), json!(e));
        }
    }
    for l in &v.lines {
        println!("{l}");
    }
    if c.json.is_some() {
        let mut m = c.json("soak");
        m.insert("kind".into(), json!("verdict"));
        m.insert("verdict".into(), v.json.clone());
        m.insert(
            "totals".into(),
            json!({"chat_sent": late.chat_sent, "chat_received": late.chat_recv,
                   "chat_duplicates": sh.chat_dups.load(Ordering::Relaxed),
                   "chat_out_of_order": sh.chat_ooo.load(Ordering::Relaxed),
                   "churn_logins_ok": late.churn_ok, "churn_errors": late.churn_err,
                   "presence_updates": late.pres_sent, "presence_received": late.pres_recv,
                   "presence_expected": late.pres_expected,
                   "mam_ok": late.mam_ok, "mam_errors": late.mam_err}),
        );
        c.write_json(m)?;
    }
    if let Some(p) = &a.markdown {
        let mut md = String::new();
        md.push_str(MD_HEADER);
        md.push('\n');
        for r in &rows {
            md.push_str(&r.markdown());
            md.push('\n');
        }
        md.push('\n');
        for l in &v.lines {
            md.push_str(&format!("- {}\n", l.trim_start()));
        }
        std::fs::write(p, md).with_context(|| format!("writing {}", p.display()))?;
        println!("markdown table written to {}", p.display());
    }
    if !v.pass {
        // The run itself worked: the verdict is the result, not an error of the tool.
        println!("(the soak did not stay flat)");
    }
    Ok(())
}

/// Cumulative counters at one moment.
#[derive(Clone, Copy, Default)]
struct Counts {
    chat_sent: u64,
    chat_recv: u64,
    churn_ok: u64,
    churn_err: u64,
    pres_sent: u64,
    pres_expected: u64,
    pres_recv: u64,
    mam_ok: u64,
    mam_err: u64,
    errors: u64,
}

impl Counts {
    fn read(sh: &Shared) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            chat_sent: l(&sh.chat_sent),
            chat_recv: l(&sh.chat_recv),
            churn_ok: l(&sh.churn_ok),
            churn_err: l(&sh.churn_err),
            pres_sent: l(&sh.pres_sent),
            pres_expected: l(&sh.pres_expected),
            pres_recv: l(&sh.pres_recv),
            mam_ok: l(&sh.mam_ok),
            mam_err: l(&sh.mam_err),
            errors: l(&sh.errors_total),
        }
    }

    fn minus(&self, o: &Counts) -> Counts {
        Counts {
            chat_sent: self.chat_sent - o.chat_sent,
            chat_recv: self.chat_recv - o.chat_recv,
            churn_ok: self.churn_ok - o.churn_ok,
            churn_err: self.churn_err - o.churn_err,
            pres_sent: self.pres_sent - o.pres_sent,
            pres_expected: self.pres_expected - o.pres_expected,
            pres_recv: self.pres_recv - o.pres_recv,
            mam_ok: self.mam_ok - o.mam_ok,
            mam_err: self.mam_err - o.mam_err,
            errors: self.errors - o.errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&pts).unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 3.0)]), None);
    }

    fn args(extra: &[&str]) -> SoakArgs {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: SoakArgs,
        }
        let mut argv = vec!["soak"];
        argv.extend_from_slice(extra);
        <T as clap::Parser>::parse_from(argv).a
    }

    fn rows(rss: &[u64]) -> Vec<Row> {
        rss.iter()
            .enumerate()
            .map(|(i, &k)| Row {
                t_s: 30.0 * (i + 1) as f64,
                rss_kib: Some(k),
                fds: Some(250),
                ..Row::default()
            })
            .collect()
    }

    fn thirds(p99_first_ms: u64, p99_last_ms: u64) -> Thirds {
        let mut th = Thirds::default();
        for (i, ms) in [(0, p99_first_ms), (1, p99_first_ms), (2, p99_last_ms)] {
            for _ in 0..100 {
                th.chat[i].record_ns(ms * 1_000_000);
            }
        }
        th
    }

    #[test]
    fn verdict_flat_and_not() {
        let a = args(&["--duration", "300", "--warmup", "60"]);
        let none = Errors::default();
        // Flat: +5 % RSS, same quiet descriptors, no errors, same latency.
        let r = rows(&[
            100_000, 100_000, 101_000, 102_000, 103_000, 104_000, 105_000,
        ]);
        let v = verdict(
            &a,
            60.0,
            &r,
            &thirds(2, 2),
            (Some(200), Some(200)),
            (0, 0),
            0,
            &none,
        );
        assert!(v.pass, "{:#?}", v.lines);
        assert_eq!(v.json["rss_warm_kib"], 100_000);
        // RSS +20 %.
        let r2 = rows(&[100_000, 100_000, 110_000, 120_000]);
        let v = verdict(
            &a,
            60.0,
            &r2,
            &thirds(2, 2),
            (Some(200), Some(200)),
            (0, 0),
            0,
            &none,
        );
        assert!(!v.pass);
        assert!(v.lines[0].contains("GROWING"), "{}", v.lines[0]);
        // A descriptor leak, a lost message, a slower last third: each fails alone.
        let v = verdict(
            &a,
            60.0,
            &r,
            &thirds(2, 2),
            (Some(200), Some(210)),
            (0, 0),
            0,
            &none,
        );
        assert!(!v.pass);
        let v = verdict(
            &a,
            60.0,
            &r,
            &thirds(2, 2),
            (Some(200), Some(200)),
            (1, 0),
            0,
            &none,
        );
        assert!(!v.pass);
        let v = verdict(
            &a,
            60.0,
            &r,
            &thirds(2, 5),
            (Some(200), Some(200)),
            (0, 0),
            0,
            &none,
        );
        assert!(!v.pass);
        // Errors during the warm-up only do not fail the run.
        let mut e = Errors::default();
        e.add("churn-tls");
        let v = verdict(
            &a,
            60.0,
            &r,
            &thirds(2, 2),
            (Some(200), Some(200)),
            (0, 0),
            1,
            &e,
        );
        assert!(v.pass, "{:#?}", v.lines);
    }

    #[test]
    fn stability_rule() {
        assert!(stable(2.0, 3.9));
        assert!(!stable(2.0, 4.1));
        assert!(stable(0.2, 1.2));
        assert!(!stable(0.2, 1.4));
    }
}
