//! Crash safety under load: the real `halyard serve` binary is killed with SIGKILL at random
//! points while several clients drive mixed traffic, restarted on the same data folder, and its
//! state checked against a model of what it acknowledged.
//!
//! Each cycle: restart the server (the store must open without repair), log every user in (the
//! accounts must be intact), check them (below), then keep 2–4 users online with XEP-0198
//! enabled and have them send, in random batches each followed by `<r/>` (one batch always in
//! flight: a session waits for the previous batch's ack, not its own): chat messages to the
//! other users (online ones get them live, offline ones in offline storage), roster sets and
//! removes (of contacts on another domain), and XEP-0357 enable/disable; meanwhile a fifth
//! user uploads files (XEP-0363 slot, then an HTTP PUT on the plain HTTP listener) one after
//! another (one cycle in four has the uploads alone). After a random delay (20–1500 ms by default) the server gets SIGKILL wherever it
//! is.
//!
//! What is asserted, and why (the server's promises: config.toml `[storage]`, and the ack in
//! `c2s::sm_nonza`, which waits for the group commit before it answers `<r/>`):
//!
//! - **Acknowledged means durable.** A stanza is acknowledged when the sender's `<a h>` covers
//!   it, or (a roster change, flushed before its answer) when its result arrived; nothing else
//!   is inferred from a result. An acknowledged message is in the recipient's archive
//!   and in the sender's archive exactly once after the restart; one sent to a user who was
//!   offline for the whole cycle also arrives from offline storage at that user's next login.
//!   An acknowledged roster change is in the roster after the restart.
//! - **Live delivery.** A message a live recipient received at least [`LIVE_GRACE`] before the
//!   kill but whose sender was not acknowledged yet must be in the recipient's archive too: its
//!   archive copy goes to disk with the next group commit (2 ms window), which the router asks
//!   for after every message. Received less than that before the kill, nothing is promised.
//! - **Never twice.** Whether or not acknowledged, a message is never twice in one archive and
//!   never received twice by its recipient (live and from offline storage together, over all
//!   cycles). Unacknowledged messages may be lost or kept. Archives are read from shortly
//!   before the last cycle's traffic (a message is appended once, when routed, so a duplicate
//!   would be there), and whole after the last cycle.
//!
//! The test has teeth: with the ack answered without waiting for the group commit (the wait in
//! `sm_nonza` removed by hand), a 10-cycle run reported 10 acknowledged messages missing; with
//! the flush after an upload's completion removed, an upload answered `201` was gone after the
//! fifth kill.
//! - **Rosters** equal the model: a contact's state is the one after its last acknowledged
//!   change, or after one of the unacknowledged changes that followed it (sent in order on one
//!   stream, so only a prefix of them can have been applied).
//! - **Uploads**: one whose PUT was answered `201` is served whole (same bytes) after the
//!   restart; one the kill cut is never served in part (`404`, or whole when only the answer
//!   was lost).
//! - Push registrations are driven (their writes are part of the crashed store) but not read
//!   back: XEP-0357 has no query for them.
//!
//! Not covered: a kill while a user logs in (between offline delivery and the flush of the
//! removal of what was delivered, a message would be delivered again at the next login: offline
//! delivery is at least once), stream resumption, and the push queue's contents. SIGKILL ends
//! the process, not the machine: what the kernel had been handed survives it whether or not it
//! was fsynced, so this proves the write path's order (nothing acknowledged that was still in
//! the process's buffers), not power-loss durability.
//!
//! `HALYARD_CRASH_CYCLES` sets the number of kills (default 8), `HALYARD_CRASH_SEED` replays a
//! run (the seed is printed), `HALYARD_CRASH_MAX_DELAY_MS` the longest delay before a kill.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use minidom::Element;

use super::cli::{login_at, parse_listening, Env};
use super::common::*;
use halyard::stream::StreamEvent;

const SM: &str = "urn:xmpp:sm:3";
const MAM: &str = "urn:xmpp:mam:2";
const RSM: &str = "http://jabber.org/protocol/rsm";
const ROSTER: &str = "jabber:iq:roster";
const PUSH: &str = "urn:xmpp:push:0";
const DELAY: &str = "urn:xmpp:delay";
const USERS: usize = 4;
const CONTACTS: usize = 5;
/// A live message received this long before the kill must be archived (see the module doc).
const LIVE_GRACE: Duration = Duration::from_millis(1000);

fn user(i: usize) -> String {
    format!("u{i}")
}

fn contact(k: usize) -> String {
    format!("c{k}@example.net")
}

/// xorshift64*: enough for picking operations, and replayable from the printed seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// A contact's roster state: `None` absent, `Some(name)` present with that name.
type ItemState = Option<String>;

/// What one user's roster must hold for one contact.
#[derive(Default, Clone)]
struct ItemModel {
    /// After the last acknowledged change.
    confirmed: ItemState,
    /// After each unacknowledged change sent since, in order.
    pending: Vec<ItemState>,
}

struct Msg {
    from: usize,
    to: usize,
    cycle: usize,
    /// The recipient was offline for the whole cycle: it goes to offline storage.
    to_offline: bool,
    /// Covered by the sender's `<a h>`.
    acked: bool,
    /// Received live long enough before the kill for its archive copy to be flushed.
    live_durable: bool,
}

/// What a session sent, in order (the `h` of XEP-0198 counts these).
enum Sent {
    Msg(String),
    Roster { contact: usize, state: ItemState },
    Other,
}

/// What one traffic session saw, handed back when its connection ends.
#[derive(Default)]
struct Log {
    user: usize,
    sent: Vec<Sent>,
    /// How many of `sent` the server acknowledged (last `<a h>`; iq results count too).
    acked: usize,
    /// Roster iqs answered with a result, by index in `sent`.
    roster_results: Vec<usize>,
    /// Live messages received: body, when.
    received: Vec<(String, Instant)>,
    errors: Vec<String>,
}

/// A session with XEP-0198 on, counting what it receives so it can acknowledge it.
struct Session {
    c: RawClient,
    user: usize,
    h_recv: u32,
    /// Stanzas sent, as the server's `h` counts them.
    h_sent: usize,
}

impl Session {
    async fn open(addr: std::net::SocketAddr, user: usize, resource: &str) -> Session {
        let mut c = login_at(addr, &self::user(user), "pw", resource).await;
        c.send(&format!("<enable xmlns='{SM}'/>")).await;
        let e = c.recv().await;
        assert!(e.is("enabled", SM), "stream management: {}", xml(&e));
        Session {
            c,
            user,
            h_recv: 0,
            h_sent: 0,
        }
    }

    /// The next element; answers the server's `<r/>` and counts stanzas. `None` at the end.
    async fn next(&mut self) -> Option<Element> {
        loop {
            match self.c.next_event().await {
                Some(StreamEvent::Element(el)) => {
                    if el.is("r", SM) {
                        let a = format!("<a xmlns='{SM}' h='{}'/>", self.h_recv);
                        if !self.c.try_send(a.as_bytes()).await {
                            return None;
                        }
                        continue;
                    }
                    if matches!(el.name(), "message" | "presence" | "iq") {
                        self.h_recv = self.h_recv.wrapping_add(1);
                    }
                    return Some(el);
                }
                Some(StreamEvent::Open(_)) => continue,
                Some(StreamEvent::Close) | None => return None,
            }
        }
    }

    /// Sends `n` stanzas (as counted by XEP-0198) in `xml`.
    async fn stanzas(&mut self, xml: &str, n: usize) {
        self.c.send(xml).await;
        self.h_sent += n;
    }

    async fn expect(&mut self, pred: impl Fn(&Element) -> bool, what: &str) -> Element {
        loop {
            match self.next().await {
                Some(e) if pred(&e) => return e,
                Some(_) => continue,
                None => panic!("u{}: stream ended waiting for {what}", self.user),
            }
        }
    }

    /// Acknowledges everything received and closes, waiting until the server has unbound the
    /// session (so nothing is rerouted to offline storage as unacknowledged).
    async fn leave(mut self) {
        let a = format!("<a xmlns='{SM}' h='{}'/></stream:stream>", self.h_recv);
        self.c.send(&a).await;
        while let Some(ev) = self.c.next_event().await {
            if matches!(ev, StreamEvent::Close) {
                break;
            }
        }
    }
}

/// The roster as the server holds it: contact → name.
async fn roster(s: &mut Session) -> BTreeMap<String, String> {
    s.stanzas(
        &format!("<iq type='get' id='rg'><query xmlns='{ROSTER}'/></iq>"),
        1,
    )
    .await;
    let r = s.expect(|e| e.attr("id") == Some("rg"), "roster").await;
    assert_eq!(r.attr("type"), Some("result"), "roster get: {}", xml(&r));
    r.get_child("query", ROSTER)
        .map(|q| {
            q.children()
                .filter(|i| i.is("item", ROSTER))
                .map(|i| {
                    (
                        i.attr("jid").unwrap_or_default().to_string(),
                        i.attr("name").unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every body in the user's archive (archived since `since`, microseconds since the epoch,
/// when given) with how often it is there (pages of 250).
async fn archive(s: &mut Session, since: Option<u64>) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    let form = since.map_or(String::new(), |t| {
        format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field><field var='start'><value>{}</value></field></x>",
            halyard_xep::datetime::format_datetime(t)
        )
    });
    for page in 0.. {
        let qid = format!("mq{page}");
        let set = match &after {
            Some(a) => format!("<set xmlns='{RSM}'><max>250</max><after>{a}</after></set>"),
            None => format!("<set xmlns='{RSM}'><max>250</max></set>"),
        };
        s.stanzas(
            &format!(
                "<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'>{form}{set}</query></iq>"
            ),
            1,
        )
        .await;
        loop {
            let el = s.expect(|_| true, "archive results").await;
            if let Some(r) = el.get_child("result", MAM) {
                let m = r
                    .get_child("forwarded", "urn:xmpp:forward:0")
                    .and_then(|f| f.get_child("message", NS_CLIENT))
                    .expect("forwarded message");
                *out.entry(body(m).unwrap_or_default()).or_insert(0) += 1;
            } else if el.attr("id") == Some(qid.as_str()) {
                assert_eq!(el.attr("type"), Some("result"), "{}", xml(&el));
                let fin = el.get_child("fin", MAM).expect("fin");
                if fin.attr("complete") == Some("true") {
                    return out;
                }
                after = fin
                    .get_child("set", RSM)
                    .and_then(|s| s.get_child("last", RSM))
                    .map(|l| l.text());
                break;
            }
        }
    }
    out
}

/// One user's traffic until the connection ends (the kill).
async fn traffic(mut s: Session, mut rng: Rng, cycle: usize, next_id: Arc<AtomicUsize>) -> Log {
    let mut log = Log {
        user: s.user,
        ..Log::default()
    };
    // What the server's `h` counts from before the traffic (roster get, presence, queries).
    let base = s.h_sent;
    let me = s.user;
    let mut ids: HashMap<String, usize> = HashMap::new();
    // One batch stays in flight: after sending a batch, wait only for the previous one's ack,
    // so that a kill finds unacknowledged stanzas in every stage of handling.
    let mut wait_for = 0;
    'run: loop {
        let batch = rng.range(1, 6);
        let mut out = String::new();
        for _ in 0..batch {
            let op = rng.below(100);
            if op < 70 {
                let mut to = rng.below(USERS as u64 - 1) as usize;
                if to >= me {
                    to += 1;
                }
                let n = next_id.fetch_add(1, Ordering::Relaxed);
                let b = format!("c{cycle}-m{n}-u{me}-u{to}");
                out.push_str(&format!(
                    "<message to='{}@localhost' type='chat' id='{b}'><body>{b}</body></message>",
                    user(to)
                ));
                log.sent.push(Sent::Msg(b));
            } else if op < 88 {
                let k = rng.below(CONTACTS as u64) as usize;
                let id = format!("r{}", log.sent.len());
                let state = if rng.below(3) == 0 {
                    out.push_str(&format!(
                        "<iq type='set' id='{id}'><query xmlns='{ROSTER}'><item jid='{}' subscription='remove'/></query></iq>",
                        contact(k)
                    ));
                    None
                } else {
                    let name = format!("n{cycle}x{}", rng.below(1000));
                    out.push_str(&format!(
                        "<iq type='set' id='{id}'><query xmlns='{ROSTER}'><item jid='{}' name='{name}'/></query></iq>",
                        contact(k)
                    ));
                    Some(name)
                };
                ids.insert(id, log.sent.len());
                log.sent.push(Sent::Roster { contact: k, state });
            } else {
                let node = format!("n{}", rng.below(3));
                let id = format!("p{}", log.sent.len());
                let what = if rng.below(2) == 0 {
                    format!("<enable xmlns='{PUSH}' jid='push.example.net' node='{node}'/>")
                } else {
                    format!("<disable xmlns='{PUSH}' jid='push.example.net' node='{node}'/>")
                };
                out.push_str(&format!("<iq type='set' id='{id}'>{what}</iq>"));
                log.sent.push(Sent::Other);
            }
        }
        out.push_str(&format!("<r xmlns='{SM}'/>"));
        if !s.c.try_send(out.as_bytes()).await {
            break;
        }
        while log.acked < wait_for {
            let Some(el) = s.next().await else {
                break 'run;
            };
            if el.is("a", SM) {
                let h: usize = el.attr("h").and_then(|h| h.parse().ok()).unwrap_or(0);
                log.acked = log.acked.max(h.saturating_sub(base));
                continue;
            }
            match el.name() {
                "message" => {
                    if el.attr("type") == Some("error") {
                        log.errors.push(xml(&el));
                    } else if let Some(b) = body(&el) {
                        log.received.push((b, Instant::now()));
                    }
                }
                "iq" => {
                    let id = el.attr("id").unwrap_or_default();
                    match el.attr("type") {
                        Some("result") => {
                            if let Some(&i) = ids.get(id) {
                                log.roster_results.push(i);
                            }
                        }
                        // Removing an absent contact: answered, and the contact is absent.
                        Some("error")
                            if stanza_error(&el).as_deref() == Some("item-not-found")
                                && ids.get(id).is_some_and(|&i| {
                                    matches!(log.sent[i], Sent::Roster { state: None, .. })
                                }) =>
                        {
                            log.roster_results.push(ids[id]);
                        }
                        Some("error") => log.errors.push(xml(&el)),
                        // Roster pushes: answered as a client does (a stanza `h` counts).
                        Some("set") => {
                            let r = format!("<iq type='result' id='{id}'/>");
                            log.sent.push(Sent::Other);
                            if !s.c.try_send(r.as_bytes()).await {
                                break 'run;
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        wait_for = log.sent.len();
        tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
    }
    log
}

/// A `halyard serve` child with a STARTTLS listener and a plain HTTP one (upload slots' PUT and
/// GET); killed when dropped.
struct Child {
    child: std::process::Child,
    c2s: std::net::SocketAddr,
    http: std::net::SocketAddr,
}

impl Child {
    fn start(env: &Env) -> Child {
        use std::io::BufRead;
        let mut cmd = env.cmd(&[
            "--log",
            "info",
            "serve",
            "--c2s",
            "127.0.0.1:0",
            "--c2s-tls",
            "none",
            "--http",
            "127.0.0.1:0",
            "--https",
            "none",
        ]);
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn halyard serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Drains the child's log for its whole life, so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let (Some(c2s), Some(http)) = (parse_listening(&line), http_addr(&line)) {
                        return Child { child, c2s, http };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let st = child.wait();
                    panic!(
                        "the server did not start on the crashed store ({st:?}):\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
    }

    fn kill(mut self) {
        let st = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(st.success(), "kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP address from the `listening c2s=... http=ADDR https=...` line.
fn http_addr(line: &str) -> Option<std::net::SocketAddr> {
    let rest = &line[line.find(" http=")? + " http=".len()..];
    rest.split([',', ' ']).next()?.parse().ok()
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`): status and body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    url: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = url
        .find("://")
        .and_then(|i| url[i + 3..].find('/').map(|j| &url[i + 3 + j..]))
        .unwrap_or(url);
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body).await?;
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no complete HTTP head"))?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let body = out[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        return Err(std::io::Error::other("chunked answers are not read here"));
    }
    Ok((status, body))
}

/// The bytes of upload `n` (its size and content follow from `n`).
fn upload_bytes(n: usize, size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 31 + n * 7) as u8).collect()
}

/// One upload: where to fetch it, what it holds, and whether its PUT was answered `201`.
struct UploadRec {
    get: String,
    n: usize,
    size: usize,
    created: bool,
    cycle: usize,
}

/// The uploader's traffic: slot after slot, each PUT right away, until the kill.
async fn uploads(
    mut c: RawClient,
    http_at: std::net::SocketAddr,
    mut rng: Rng,
    cycle: usize,
    next_id: Arc<AtomicUsize>,
) -> Vec<UploadRec> {
    let mut out = Vec::new();
    for k in 0.. {
        let n = next_id.fetch_add(1, Ordering::Relaxed);
        let size = rng.range(1, 32 * 1024) as usize;
        let id = format!("up{k}");
        if !c
            .try_send(
                format!(
                    "<iq type='get' id='{id}' to='upload.localhost'><request xmlns='urn:xmpp:http:upload:0' filename='f{n}.bin' size='{size}' content-type='application/octet-stream'/></iq>"
                )
                .as_bytes(),
            )
            .await
        {
            break;
        }
        let slot = loop {
            match c.next_event().await {
                Some(StreamEvent::Element(el)) if el.attr("id") == Some(id.as_str()) => {
                    break Some(el)
                }
                Some(_) => continue,
                None => break None,
            }
        };
        let Some(slot) = slot else { break };
        assert_eq!(slot.attr("type"), Some("result"), "slot: {}", xml(&slot));
        let s = slot
            .get_child("slot", "urn:xmpp:http:upload:0")
            .expect("slot");
        let url = |what| {
            s.get_child(what, "urn:xmpp:http:upload:0")
                .and_then(|e| e.attr("url"))
                .expect("url")
                .to_string()
        };
        let (put, get) = (url("put"), url("get"));
        let mut rec = UploadRec {
            get,
            n,
            size,
            created: false,
            cycle,
        };
        let r = http(http_at, "PUT", &put, &upload_bytes(n, size)).await;
        match r {
            Ok((201, _)) => rec.created = true,
            Ok((status, body)) => {
                panic!("PUT answered {status}: {}", String::from_utf8_lossy(&body))
            }
            Err(_) => {
                out.push(rec);
                break;
            }
        }
        out.push(rec);
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
    }
    out
}

#[derive(Default, Debug)]
struct Figures {
    /// Kills survived.
    cycles: usize,
    /// Chat messages sent.
    sent: usize,
    /// Covered by the sender's `<a h>`.
    acked: usize,
    /// Not acknowledged but received live long enough before the kill.
    live_promised: usize,
    /// Promised archive copies found after the restart (sender's and recipient's).
    found: usize,
    /// Promised ones missing (archive copies, offline deliveries).
    lost: usize,
    /// Bodies found twice in one archive or received twice.
    duplicated: usize,
    /// Unacknowledged messages the recipient's archive kept, and those it lost.
    unacked_kept: usize,
    unacked_lost: usize,
    /// Acknowledged messages to offline users, and how many arrived at their next login.
    offline_promised: usize,
    offline_delivered: usize,
    roster_ops: usize,
    roster_acked: usize,
    /// Uploads answered `201` (each fetched whole after the restart), and those the kill cut.
    uploads_created: usize,
    uploads_cut: usize,
}

/// See the module doc.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_points_loses_nothing_acknowledged() {
    let started = Instant::now();
    let cycles = env_u64("HALYARD_CRASH_CYCLES").unwrap_or(8) as usize;
    let max_delay = env_u64("HALYARD_CRASH_MAX_DELAY_MS")
        .unwrap_or(1500)
        .max(21);
    let seed = env_u64("HALYARD_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    eprintln!("crash: seed {seed} (HALYARD_CRASH_SEED={seed} replays), {cycles} cycles");
    let mut rng = Rng::new(seed);

    let env = Env::with_test_cert().await;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(env.cfg())
            .expect("config");
        writeln!(f, "\n[upload]\nslots_per_minute = 1000000").expect("write config");
    }
    env.run(&["user", "add", "uploader@localhost", "--password", "pw"])
        .ok("add uploader");
    let mut upload_recs: Vec<UploadRec> = Vec::new();
    for u in 0..USERS {
        env.run(&[
            "user",
            "add",
            &format!("{}@localhost", user(u)),
            "--password",
            "pw",
        ])
        .ok("add user");
    }
    let mut msgs: HashMap<String, Msg> = HashMap::new();
    let mut rosters: Vec<Vec<ItemModel>> = vec![vec![ItemModel::default(); CONTACTS]; USERS];
    // Per user: body → times received (live and from offline storage, over all cycles).
    let mut received: Vec<HashMap<String, u32>> = vec![HashMap::new(); USERS];
    let mut fig = Figures::default();
    let next_id = Arc::new(AtomicUsize::new(0));
    let mut last_traffic_micros: u64 = 0;

    for cycle in 0..=cycles {
        // The store must open as the kill left it.
        let server = Child::start(&env);
        let mut failures = Vec::new();

        // Uploads: one answered `201` is served whole; one the kill cut is never served in
        // part (404, or whole when only the answer was lost).
        for r in upload_recs.iter().filter(|r| r.cycle + 1 == cycle) {
            let (status, body) = http(server.http, "GET", &r.get, &[])
                .await
                .expect("GET an upload");
            let whole = status == 200 && body == upload_bytes(r.n, r.size);
            if r.created && !whole {
                failures.push(format!(
                    "upload {} ({} bytes, answered 201) is served as {status} with {} bytes",
                    r.get,
                    r.size,
                    body.len()
                ));
            } else if !r.created && !whole && status != 404 {
                failures.push(format!(
                    "cut upload {} is served as {status} with {} of {} bytes",
                    r.get,
                    body.len(),
                    r.size
                ));
            }
        }

        // Every user logs in (the accounts are intact) and is checked against the model.
        let mut sessions = Vec::new();
        for u in 0..USERS {
            let mut s = Session::open(server.c2s, u, &format!("r{cycle}")).await;
            let got = roster(&mut s).await;
            for (k, m) in rosters[u].iter_mut().enumerate() {
                let observed: ItemState = got.get(&contact(k)).cloned();
                let allowed: Vec<&ItemState> = std::iter::once(&m.confirmed)
                    .chain(m.pending.iter())
                    .collect();
                if !allowed.contains(&&observed) {
                    failures.push(format!(
                        "u{u}'s roster has {observed:?} for {}, expected one of {allowed:?}",
                        contact(k)
                    ));
                }
                m.confirmed = observed;
                m.pending.clear();
            }
            // Initial presence: offline storage is delivered before the ping's answer.
            let ping = format!("v{cycle}");
            s.stanzas(
                &format!(
                    "<presence/><iq type='get' id='{ping}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
                ),
                2,
            )
            .await;
            loop {
                let el = s.expect(|_| true, "offline delivery").await;
                if el.attr("id") == Some(ping.as_str()) {
                    break;
                }
                if el.name() == "message" && el.get_child("delay", DELAY).is_some() {
                    let b = body(&el).unwrap_or_default();
                    fig.offline_delivered += 1;
                    *received[u].entry(b).or_insert(0) += 1;
                }
            }
            // The last cycle's writes (all of them at the end): a message is appended once,
            // when it is routed, so a duplicate would be there.
            let since = (cycle < cycles).then_some(last_traffic_micros.saturating_sub(2_000_000));
            let arch = archive(&mut s, since).await;
            for (b, n) in &arch {
                if *n > 1 {
                    fig.duplicated += 1;
                    failures.push(format!("{b} is {n} times in u{u}'s archive"));
                }
            }
            for (b, m) in msgs.iter().filter(|(_, m)| m.cycle + 1 == cycle) {
                let here = arch.contains_key(b);
                let promised = if m.to == u {
                    m.acked || m.live_durable
                } else if m.from == u {
                    m.acked
                } else {
                    continue;
                };
                if promised {
                    if here {
                        fig.found += 1;
                    } else {
                        fig.lost += 1;
                        failures.push(format!(
                            "{} {b} is missing from u{u}'s archive",
                            if m.acked {
                                "acknowledged"
                            } else {
                                "received live"
                            }
                        ));
                    }
                } else if m.to == u {
                    if here {
                        fig.unacked_kept += 1;
                    } else {
                        fig.unacked_lost += 1;
                    }
                }
                if m.to == u && m.acked && m.to_offline {
                    fig.offline_promised += 1;
                    if !received[u].contains_key(b) {
                        fig.lost += 1;
                        failures.push(format!(
                            "acknowledged {b} to offline u{u} was not delivered at login"
                        ));
                    }
                }
            }
            for (b, n) in &received[u] {
                if *n > 1 {
                    fig.duplicated += 1;
                    failures.push(format!("u{u} received {b} {n} times"));
                }
            }
            sessions.push(s);
        }
        fig.cycles = cycle;
        if !failures.is_empty() {
            eprintln!("crash: {fig:?}");
            panic!(
                "cycle {cycle} (seed {seed}): {} violations:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }
        if cycle == cycles {
            for s in sessions {
                s.leave().await;
            }
            break;
        }

        // Traffic: 2 to 4 users online, the others offline for the whole cycle (they leave
        // before anyone sends). One cycle in four has uploads alone, so that no chat traffic's
        // flushes cover an upload's own.
        let n_online = if rng.below(4) == 0 {
            0
        } else {
            rng.range(2, USERS as u64) as usize
        };
        let mut order: Vec<usize> = (0..USERS).collect();
        for i in (1..USERS).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut online = [false; USERS];
        for &u in &order[..n_online] {
            online[u] = true;
        }
        let (stay, go): (Vec<Session>, Vec<Session>) =
            sessions.into_iter().partition(|s| online[s.user]);
        for s in go {
            s.leave().await;
        }
        let mut tasks = Vec::new();
        for s in stay {
            let r = Rng::new(rng.next());
            tasks.push(tokio::spawn(traffic(s, r, cycle, next_id.clone())));
        }
        let up = login_at(server.c2s, "uploader", "pw", &format!("u{cycle}")).await;
        let uploader = tokio::spawn(uploads(
            up,
            server.http,
            Rng::new(rng.next()),
            cycle,
            next_id.clone(),
        ));
        last_traffic_micros = now_micros();
        let delay = Duration::from_millis(rng.range(20, max_delay));
        tokio::time::sleep(delay).await;
        let killed_at = Instant::now();
        server.kill();
        for r in uploader.await.expect("upload task") {
            if r.created {
                fig.uploads_created += 1;
            } else {
                fig.uploads_cut += 1;
            }
            upload_recs.push(r);
        }

        // Fold what the sessions saw into the model.
        let mut live: Vec<(String, Instant)> = Vec::new();
        for t in tasks {
            let log = t.await.expect("traffic task");
            let me = log.user;
            assert!(
                log.errors.is_empty(),
                "cycle {cycle} (seed {seed}): unexpected errors: {:?}",
                log.errors
            );
            let mut acked = vec![false; log.sent.len()];
            for a in acked.iter_mut().take(log.acked) {
                *a = true;
            }
            // A roster change's result acknowledges that change (it is flushed before the
            // answer); nothing is inferred for what came before it.
            for &i in &log.roster_results {
                acked[i] = true;
            }
            for (i, sent) in log.sent.iter().enumerate() {
                match sent {
                    Sent::Msg(b) => {
                        let (from, to) = parties(b);
                        assert_eq!(from, me);
                        fig.sent += 1;
                        fig.acked += usize::from(acked[i]);
                        msgs.insert(
                            b.clone(),
                            Msg {
                                from,
                                to,
                                cycle,
                                to_offline: !online[to],
                                acked: acked[i],
                                live_durable: false,
                            },
                        );
                    }
                    Sent::Roster { contact, state } => {
                        fig.roster_ops += 1;
                        let m = &mut rosters[me][*contact];
                        if acked[i] {
                            fig.roster_acked += 1;
                            m.confirmed = state.clone();
                            m.pending.clear();
                        } else {
                            m.pending.push(state.clone());
                        }
                    }
                    Sent::Other => {}
                }
            }
            live.extend(log.received);
        }
        for (b, at) in live {
            let to = parties(&b).1;
            *received[to].entry(b.clone()).or_insert(0) += 1;
            if killed_at.saturating_duration_since(at) >= LIVE_GRACE {
                if let Some(m) = msgs.get_mut(&b) {
                    if !m.acked {
                        fig.live_promised += 1;
                        m.live_durable = true;
                    }
                }
            }
        }
        eprintln!(
            "crash: cycle {cycle}: killed after {delay:?}; {} messages so far, {} acknowledged",
            fig.sent, fig.acked
        );
    }
    eprintln!(
        "crash: done in {:.1} s (seed {seed}): {fig:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(fig.acked > 0, "some traffic was acknowledged");
}

/// Sender and recipient from a body `c{cycle}-m{n}-u{from}-u{to}`.
fn parties(b: &str) -> (usize, usize) {
    let mut it = b.rsplit('-');
    let to = it.next().and_then(|t| t.strip_prefix('u')?.parse().ok());
    let from = it.next().and_then(|t| t.strip_prefix('u')?.parse().ok());
    (from.expect("sender"), to.expect("recipient"))
}
