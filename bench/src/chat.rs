//! `chat`: P pairs of sessions exchanging one-to-one messages.
//!
//! Pair i is accounts first+2i (A) and first+2i+1 (B). A sends to B's bare JID and, unless
//! `--oneway`, B sends to A's: each direction has its own sequence numbers. Every body carries
//! the send time (monotonic ns since the tool started; sender and receiver share the process
//! clock) and the sequence number, so the receiver computes delivery latency, duplicates and
//! reordering, and after a drain period the losses (sent − distinct received per direction).
//!
//! Timeline: all sessions log in and send presence; sending starts together, runs `--warmup`
//! seconds (not measured) then `--duration` seconds (the window); receivers keep reading for
//! `--drain` seconds after sending stops. Latency and throughput count messages sent inside the
//! window; the server's CPU is read at the window's edges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use serde_json::json;
use tokio::sync::Notify;

use crate::procfs::Sample;
use crate::stats::{now_ns, ns_at, Errors, Latency, Pacer};
use crate::xmpp::{attr, child_text, name, Session};
use crate::{cpu_line, login_all, procfs, Common};

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    c: Common,
    /// Pairs of sessions: account first+2i sends to first+2i+1 and back (2P accounts).
    #[arg(long, default_value_t = 10)]
    pairs: u64,
    /// Messages per second over all senders together; 0 = as fast as possible, bounded by
    /// --inflight.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// With --rate 0: messages sent but not yet received, per direction of each pair.
    #[arg(long, default_value_t = 16)]
    inflight: u64,
    /// Only A sends to B (P senders instead of 2P).
    #[arg(long)]
    oneway: bool,
    /// Seconds of sending before the measured window (excluded from the figures).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds receivers keep reading after sending stops, before losses are counted.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Body length in bytes (timestamp and sequence number, padded with 'x').
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
}

/// Appends `n` in decimal (no formatting machinery, no allocation beyond `out`'s growth).
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A message body: `t<send ns>s<sequence>` padded with 'x' to `len` bytes.
pub fn encode_body(out: &mut Vec<u8>, ts_ns: u64, seq: u64, len: usize) {
    let start = out.len();
    out.push(b't');
    push_u64(out, ts_ns);
    out.push(b's');
    push_u64(out, seq);
    let written = out.len() - start;
    if written < len {
        out.resize(start + len, b'x');
    }
}

/// Reads (send ns, sequence) back from a body; `None` for a body this tool did not write.
pub fn decode_body(body: &[u8]) -> Option<(u64, u64)> {
    fn number(b: &[u8]) -> Option<(u64, &[u8])> {
        let end = b
            .iter()
            .position(|c| !c.is_ascii_digit())
            .unwrap_or(b.len());
        if end == 0 || end > 19 {
            return None;
        }
        let mut n = 0u64;
        for &c in &b[..end] {
            n = n * 10 + u64::from(c - b'0');
        }
        Some((n, &b[end..]))
    }
    let (ts, rest) = number(body.strip_prefix(b"t")?)?;
    let (seq, rest) = number(rest.strip_prefix(b"s")?)?;
    if rest.iter().any(|&c| c != b'x') {
        return None;
    }
    Some((ts, seq))
}

/// One direction of a pair: how many of its messages the receiver has seen (the sender's
/// in-flight window with --rate 0).
#[derive(Default)]
struct Dir {
    received: AtomicU64,
    notify: Notify,
}

#[derive(Clone, Copy)]
struct Timeline {
    start: Instant,
    warm_end: Instant,
    send_end: Instant,
    recv_end: Instant,
}

struct Plan {
    /// (peer's bare JID, direction state) when this session sends.
    send: Option<(String, Arc<Dir>)>,
    /// The direction this session receives, when its peer sends.
    recv: Option<Arc<Dir>>,
    per_sender_rate: f64,
    inflight: u64,
    body_bytes: usize,
    tl: Timeline,
}

#[derive(Default)]
struct Outcome {
    sent: u64,
    sent_window: u64,
    lat: Latency,
    unique: u64,
    window: u64,
    dups: u64,
    ooo: u64,
    errors: Errors,
    failure: Option<String>,
}

/// Received sequence numbers (a growable bitset) for duplicate detection.
#[derive(Default)]
pub(crate) struct Seen(Vec<u64>);

impl Seen {
    /// Marks `n`; false when it was already marked.
    pub(crate) fn insert(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let had = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        !had
    }
}

async fn drive(mut s: Session, p: Plan) -> Outcome {
    let mut o = Outcome::default();
    let tl = p.tl;
    let (win_lo, win_hi) = (ns_at(tl.warm_end), ns_at(tl.send_end));
    let mut seen = Seen::default();
    let mut max_seq: Option<u64> = None;
    // The pre-formatted head of every message; only the id, timestamp and sequence change.
    let head = p
        .send
        .as_ref()
        .map(|(peer, _)| format!("<message type='chat' to='{peer}' id='m").into_bytes())
        .unwrap_or_default();
    let mut wbuf: Vec<u8> = Vec::with_capacity(4096);
    let phase = if p.per_sender_rate > 0.0 {
        Duration::from_secs_f64(rand::thread_rng().gen_range(0.0..1.0) / p.per_sender_rate)
    } else {
        Duration::ZERO
    };
    let mut pacer = Pacer::new(
        p.per_sender_rate,
        tl.start.saturating_duration_since(Instant::now()) + phase,
    );
    let unpaced = pacer.unpaced();
    let never = Arc::new(Dir::default());
    let send_dir = p.send.as_ref().map(|(_, d)| d.clone()).unwrap_or(never);
    let mut done_sending = p.send.is_none();
    loop {
        let now = Instant::now();
        if now >= tl.recv_end {
            break;
        }
        if !done_sending && now >= tl.send_end {
            done_sending = true;
        }
        let sending = !done_sending && now >= tl.start;
        let mut batch = 0;
        if sending && unpaced {
            let acked = send_dir.received.load(Ordering::Acquire);
            batch = p.inflight.saturating_sub(o.sent.saturating_sub(acked));
        }
        if batch > 0 {
            if let Err(e) =
                send_batch(&mut s, &mut o, &mut wbuf, &head, batch, &p, win_lo, win_hi).await
            {
                o.failure = Some(format!("{e:#}"));
                break;
            }
            continue;
        }
        let deadline = if !done_sending && now < tl.start {
            tl.start
        } else if !done_sending {
            tl.send_end
        } else {
            tl.recv_end
        };
        tokio::select! {
            r = s.next_element() => match r {
                Ok(range) => {
                    let el = s.get(range);
                    if name(el) != b"message" {
                        continue;
                    }
                    if attr(el, b"type") == Some(b"error") {
                        o.errors.add("message-error");
                        continue;
                    }
                    let Some((ts, seq)) = child_text(el, b"body").and_then(decode_body) else {
                        continue;
                    };
                    let now = now_ns();
                    if !seen.insert(seq) {
                        o.dups += 1;
                        continue;
                    }
                    o.unique += 1;
                    if max_seq.is_some_and(|m| seq < m) {
                        o.ooo += 1;
                    }
                    max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
                    if ts >= win_lo && ts < win_hi {
                        o.window += 1;
                        o.lat.record_ns(now.saturating_sub(ts));
                    }
                    if let Some(d) = &p.recv {
                        d.received.fetch_add(1, Ordering::Release);
                        d.notify.notify_one();
                    }
                }
                Err(e) => {
                    o.failure = Some(format!("{e:#}"));
                    break;
                }
            },
            n = pacer.due(), if sending && !unpaced => {
                // A tick late by more than a second does not turn into an unbounded burst.
                let n = n.min((p.per_sender_rate as u64).max(1));
                if n > 0 {
                    if let Err(e) = send_batch(&mut s, &mut o, &mut wbuf, &head, n, &p, win_lo, win_hi).await {
                        o.failure = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            _ = send_dir.notify.notified(), if sending && unpaced => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
    if o.failure.is_none() {
        s.close().await;
    }
    o
}

#[allow(clippy::too_many_arguments)]
async fn send_batch(
    s: &mut Session,
    o: &mut Outcome,
    wbuf: &mut Vec<u8>,
    head: &[u8],
    n: u64,
    p: &Plan,
    win_lo: u64,
    win_hi: u64,
) -> anyhow::Result<()> {
    wbuf.clear();
    let ts = now_ns();
    for _ in 0..n {
        let seq = o.sent;
        wbuf.extend_from_slice(head);
        push_u64(wbuf, seq);
        wbuf.extend_from_slice(b"'><body>");
        encode_body(wbuf, ts, seq, p.body_bytes);
        wbuf.extend_from_slice(b"</body></message>");
        o.sent += 1;
        if ts >= win_lo && ts < win_hi {
            o.sent_window += 1;
        }
    }
    s.send(wbuf).await
}

pub async fn run(a: ChatArgs) -> anyhow::Result<()> {
    let c = &a.c;
    let t = Arc::new(c.target()?);
    let n = a.pairs * 2;
    let senders = if a.oneway { a.pairs } else { n };
    println!(
        "chat: {} pairs ({}), {}, {} s warm-up + {} s measured + {} s drain, body {} B, {}",
        a.pairs,
        if a.oneway { "one way" } else { "both ways" },
        if a.rate > 0.0 {
            format!(
                "{} msg/s aggregate ({:.2}/s per sender)",
                a.rate,
                a.rate / senders as f64
            )
        } else {
            format!("unpaced, {} in flight per direction", a.inflight)
        },
        a.warmup,
        a.duration,
        a.drain,
        a.body_bytes,
        if c.tls { "STARTTLS" } else { "plain" }
    );
    let (sessions, login_lat, login_errors) = login_all(c, &t, n, true).await;
    c.save_cache(&t)?;
    println!(
        "logins: {} ok, errors {}; latency {}",
        login_lat.count(),
        login_errors.line(),
        login_lat.line()
    );
    if login_errors.total() > 0 {
        anyhow::bail!(
            "{} of {n} logins failed: not starting the exchange",
            login_errors.total()
        );
    }
    // Presence has been sent; give the server a moment to make every session available.
    let start = Instant::now() + Duration::from_millis(500);
    let tl = Timeline {
        start,
        warm_end: start + Duration::from_secs_f64(a.warmup),
        send_end: start + Duration::from_secs_f64(a.warmup + a.duration),
        recv_end: start + Duration::from_secs_f64(a.warmup + a.duration + a.drain),
    };
    let dirs: Vec<[Arc<Dir>; 2]> = (0..a.pairs).map(|_| Default::default()).collect();
    let mut tasks = Vec::with_capacity(n as usize);
    for (k, s) in sessions.into_iter().enumerate() {
        let Some(s) = s else { continue };
        let (pair, is_b) = (k as u64 / 2, k % 2 == 1);
        let peer = t.bare_jid(c.first + if is_b { 2 * pair } else { 2 * pair + 1 });
        let d = &dirs[pair as usize];
        // dirs[pair][0]: A → B; [1]: B → A.
        let (send, recv) = if is_b {
            (
                (!a.oneway).then(|| (peer, d[1].clone())),
                Some(d[0].clone()),
            )
        } else {
            (
                Some((peer, d[0].clone())),
                (!a.oneway).then(|| d[1].clone()),
            )
        };
        let plan = Plan {
            send,
            recv,
            per_sender_rate: a.rate / senders as f64,
            inflight: a.inflight.max(1),
            body_bytes: a.body_bytes,
            tl,
        };
        tasks.push(tokio::spawn(drive(s, plan)));
    }
    tokio::time::sleep_until(tl.warm_end.into()).await;
    let s1 = Sample::take(c.pid);
    tokio::time::sleep_until(tl.send_end.into()).await;
    let s2 = Sample::take(c.pid);
    let mut outs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outs.push(task.await.unwrap_or_else(|e| Outcome {
            failure: Some(format!("task: {e}")),
            ..Default::default()
        }));
    }

    let mut lat = Latency::new();
    let mut errors = Errors::default();
    let (mut sent, mut sent_window, mut recv, mut window, mut dups, mut ooo) = (0, 0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    for o in &outs {
        lat.merge(&o.lat);
        errors.merge(&o.errors);
        sent += o.sent;
        sent_window += o.sent_window;
        recv += o.unique;
        window += o.window;
        dups += o.dups;
        ooo += o.ooo;
        if let Some(f) = &o.failure {
            errors.add("session-lost");
            failures.push(f.clone());
        }
    }
    // Losses per direction: what the sender sent minus what its peer received (distinct).
    let (mut lost, mut lossy_dirs) = (0u64, 0u64);
    for pair in outs.chunks(2) {
        if let [a_out, b_out] = pair {
            let mut dir = |from: &Outcome, to: &Outcome| {
                let l = from.sent.saturating_sub(to.unique);
                lost += l;
                lossy_dirs += u64::from(l > 0);
            };
            dir(a_out, b_out);
            if !a.oneway {
                dir(b_out, a_out);
            }
        }
    }
    let (server_cpu, own_cpu, wall) = procfs::cpu_between(&s1, &s2);
    let throughput = window as f64 / a.duration.max(1e-9);
    println!(
        "sent: {sent} ({sent_window} in the window: {:.1} msg/s offered); received: {recv} distinct",
        sent_window as f64 / a.duration.max(1e-9)
    );
    println!("delivered in the window: {window} messages, {throughput:.1} msg/s");
    println!("delivery latency: {}", lat.line());
    println!(
        "losses: {lost} (in {lossy_dirs} directions) after {} s drain; duplicates: {dups}; out of order: {ooo}",
        a.drain
    );
    println!("errors: {}", errors.line());
    if let Some(f) = failures.first() {
        println!("  first session failure: {f}");
    }
    println!("window {}", cpu_line(&s1, &s2));
    let per_msg = server_cpu
        .filter(|_| window > 0)
        .map(|c| c * 1e6 / window as f64);
    if let Some(us) = per_msg {
        println!(
            "  server CPU per message: {us:.1} µs (tool: {:.1} µs)",
            own_cpu * 1e6 / window.max(1) as f64
        );
    }
    let mut m = c.json("chat");
    m.insert(
        "params".into(),
        json!({"pairs": a.pairs, "oneway": a.oneway, "rate": a.rate, "inflight": a.inflight,
               "warmup_s": a.warmup, "duration_s": a.duration, "drain_s": a.drain,
               "body_bytes": a.body_bytes, "first": c.first}),
    );
    m.insert("login_latency".into(), login_lat.json());
    m.insert("sent".into(), json!(sent));
    m.insert("sent_window".into(), json!(sent_window));
    m.insert("received".into(), json!(recv));
    m.insert("delivered_window".into(), json!(window));
    m.insert("throughput_msg_s".into(), json!(throughput));
    m.insert("latency".into(), lat.json());
    m.insert("lost".into(), json!(lost));
    m.insert("lossy_directions".into(), json!(lossy_dirs));
    m.insert("duplicates".into(), json!(dups));
    m.insert("out_of_order".into(), json!(ooo));
    m.insert("errors".into(), errors.json());
    m.insert("window_wall_s".into(), json!(wall));
    m.insert("server_cpu_s".into(), json!(server_cpu));
    m.insert("server_cpu_us_per_msg".into(), json!(per_msg));
    m.insert("tool_cpu_s".into(), json!(own_cpu));
    m.insert("server_rss_kib".into(), json!(s2.server_rss_kib));
    m.insert("tool_rss_kib".into(), json!(s2.own_rss_kib));
    c.write_json(m)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip() {
        for (ts, seq, len) in [(0, 0, 0), (123_456_789_012, 42, 100), (u64::MAX / 10, 7, 5)] {
            let mut b = Vec::new();
            encode_body(&mut b, ts, seq, len);
            assert!(b.len() >= len);
            assert_eq!(
                decode_body(&b),
                Some((ts, seq)),
                "{}",
                String::from_utf8_lossy(&b)
            );
        }
        let mut b = b"prefix".to_vec();
        encode_body(&mut b, 5, 6, 20);
        assert_eq!(&b[..], &b"prefixt5s6xxxxxxxxxxxxxxxx"[..]);
        assert_eq!(decode_body(&b[6..]), Some((5, 6)));
    }

    #[test]
    fn foreign_bodies_are_ignored() {
        for b in [
            &b""[..],
            b"hello",
            b"t12",
            b"t12s",
            b"ts1",
            b"t1s2y",
            b"t99999999999999999999s1",
        ] {
            assert_eq!(decode_body(b), None, "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn decimal() {
        let mut v = Vec::new();
        for n in [0, 9, 10, 1234567890, u64::MAX] {
            v.clear();
            push_u64(&mut v, n);
            assert_eq!(v, n.to_string().into_bytes());
        }
    }

    #[test]
    fn seen_detects_duplicates() {
        let mut s = Seen::default();
        assert!(s.insert(0));
        assert!(s.insert(1000));
        assert!(!s.insert(1000));
        assert!(s.insert(63));
        assert!(!s.insert(0));
    }
}
