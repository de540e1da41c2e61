//! XMPP over BOSH (XEP-0124 with XEP-0206) at `/http-bind`, on the HTTP and HTTPS listeners.
//!
//! Hand-written: no BOSH server crate is in good enough shape to build on. The binding is only a
//! transport: each BOSH session is an ordinary c2s session (`c2s::run`, the same negotiation,
//! binding and bound loop as TCP and WebSocket) over a [`BoshTransport`]. The HTTP handlers and
//! the session task meet in a per-sid [`Shared`] record:
//!
//! - a request's payloads are released to the session strictly in `rid` order (early ones wait
//!   in `buffered`), as `StreamEvent`s in `inbox` (plus `Open` at creation and on
//!   `xmpp:restart`, `Close` on `type='terminate'`);
//! - each request waits in `held` until the session flushes output, more than `hold` requests
//!   are held, or `wait` expires; the oldest is always answered first, with everything queued;
//! - the last `requests` (`hold + 1`) responses are kept to answer a repeated `rid` (§14.3);
//! - with nothing held for `inactivity` seconds the session's transport reports end of input:
//!   the session then ends as a lost connection (stream management may keep it resumable).
//!
//! Memory is bounded: the window bounds `buffered` and `held`, the body limit bounds each
//! request, and output beyond `OUT_CAP` makes the session's writes wait (its write timeout then
//! treats a client that stops polling as stalled).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use dashmap::DashMap;
use halyard_xep::ns;
use halyard_xep::stanza::{escape as esc, n};
use minidom::{Element, Node};
use rand::Rng;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::c2s::{self, Transport, TransportError};
use crate::http::{HttpState, Peer};
use crate::sasl::scram::ChannelBindings;
use crate::server::Server;
use crate::stream::reader::{parse_element, Limits};
use crate::stream::{writer, StreamError, StreamErrorKind, StreamEvent};

pub const NS_HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
pub const NS_XBOSH: &str = "urn:xmpp:xbosh";
/// The BOSH version implemented (XEP-0124 1.11).
const VERSION: (u64, u64) = (1, 11);
/// Room for the `<body/>` wrapper on top of the stanza limit.
const WRAPPER_SLACK: usize = 2048;
const CONTENT_TYPE: &str = "text/xml; charset=utf-8";
/// Output queued for one session beyond which its writes wait for the client to collect it.
const OUT_CAP: usize = 512 * 1024;
/// A client's `ack` lagging behind a response sent this long ago gets a `report` (§9.2).
const REPORT_AFTER: Duration = Duration::from_secs(2);

/// `/http-bind`: POST for the binding, OPTIONS for CORS preflight.
pub fn routes() -> Router<HttpState> {
    Router::new().route("/http-bind", post(handle).options(preflight))
}

/// Live BOSH sessions by sid, for every server in the process (tests run several); each record
/// says which server it belongs to.
static SESSIONS: LazyLock<DashMap<String, Arc<Shared>>> = LazyLock::new(DashMap::new);
static RECORD_IDS: AtomicU64 = AtomicU64::new(1);

fn cors(h: &mut HeaderMap) {
    crate::http::cors(h, "POST, OPTIONS");
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

async fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(r.headers_mut());
    r
}

/// What one request gets: the HTTP status (200 but for legacy clients' errors) and the body.
#[derive(Clone, Debug)]
struct Reply {
    status: StatusCode,
    body: Bytes,
}

impl Reply {
    fn ok(body: Bytes) -> Reply {
        Reply {
            status: StatusCode::OK,
            body,
        }
    }
}

fn http_response(reply: Reply, content_type: HeaderValue) -> Response {
    let mut r = (reply.status, reply.body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, content_type);
    cors(r.headers_mut());
    r
}

fn wrap(attrs: &str, payload: &[u8]) -> Bytes {
    let head = format!(
        "<body xmlns='{NS_HTTPBIND}' xmlns:stream='{}'{attrs}",
        ns::STREAM
    );
    let mut out = Vec::with_capacity(head.len() + payload.len() + 8);
    out.extend_from_slice(head.as_bytes());
    if payload.is_empty() {
        out.extend_from_slice(b"/>");
    } else {
        out.push(b'>');
        out.extend_from_slice(payload);
        out.extend_from_slice(b"</body>");
    }
    Bytes::from(out)
}

/// A terminal binding condition (§17.2); legacy clients (no `ver` in their session request)
/// get the HTTP error that condition superseded instead of 200.
fn terminal(legacy: bool, condition: Option<&str>, payload: &[u8]) -> Reply {
    let status = match condition {
        Some("bad-request") if legacy => StatusCode::BAD_REQUEST,
        Some("policy-violation") if legacy => StatusCode::FORBIDDEN,
        Some("item-not-found") if legacy => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    };
    let attrs = match condition {
        Some(c) => format!(" type='terminate' condition='{c}'"),
        None => " type='terminate'".to_string(),
    };
    Reply {
        status,
        body: wrap(&attrs, payload),
    }
}

/// A recoverable binding condition (§17.3): the client resends what has no answer yet.
fn recoverable() -> Reply {
    Reply::ok(wrap(" type='error'", b""))
}

/// An answer outside any session: for an unknown sid, or a request we cannot read. Whether the
/// client is a legacy one is unknown here, so it gets both forms: the superseded HTTP status
/// (which legacy clients act on) and the terminal condition in the body (which current clients
/// read); either way the client learns that there is no session.
fn sessionless(status: StatusCode, condition: &str) -> Response {
    let mut r = terminal(false, Some(condition), b"");
    r.status = status;
    http_response(r, HeaderValue::from_static(CONTENT_TYPE))
}

/// What a request carries, once parsed.
#[derive(Debug, Default)]
struct Incoming {
    payloads: Vec<Element>,
    bytes: usize,
    restart: bool,
    terminate: bool,
    pause: Option<u64>,
    ack: Option<u64>,
    to: Option<String>,
}

fn incoming(body: &Element, bytes: usize) -> Incoming {
    let flag = |v: Option<&str>| matches!(v, Some("true") | Some("1"));
    Incoming {
        payloads: body.children().map(to_client_ns).collect(),
        bytes,
        restart: flag(body.attr_ns(NS_XBOSH, "restart")),
        terminate: body.attr("type") == Some("terminate"),
        pause: body.attr("pause").and_then(|p| p.parse().ok()),
        ack: body.attr("ack").and_then(|a| a.parse().ok()),
        to: body.attr("to").map(|t| t.trim().to_ascii_lowercase()),
    }
}

/// Stanzas sent without `xmlns='jabber:client'` inherit the wrapper's namespace (XEP-0206 §2
/// notes that many clients do this): they, and descendants that inherited it too, are moved to
/// `jabber:client`.
fn to_client_ns(el: &Element) -> Element {
    let own = if el.ns() == NS_HTTPBIND {
        ns::CLIENT.to_string()
    } else {
        el.ns()
    };
    let mut out = Element::bare(el.name(), own);
    *out.attrs_mut() = el.attrs().clone();
    for node in el.nodes() {
        match node {
            Node::Element(c) => {
                out.append_child(to_client_ns(c));
            }
            Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

/// The stream header the session sees for a creation or restart request.
fn header(to: &str, version: &str, from: Option<&str>) -> Element {
    let mut b = Element::builder("stream", ns::STREAM)
        .attr(n("to"), to)
        .attr(n("version"), version);
    if let Some(f) = from {
        b = b.attr(n("from"), f);
    }
    b.build()
}

/// The session's parameters, fixed at creation.
#[derive(Debug, Clone, Copy)]
struct Params {
    wait: Duration,
    hold: usize,
    requests: u64,
    inactivity: Duration,
    max_pause: u64,
    /// The client asked for acknowledgements: every response carries `ack`.
    ack: bool,
    /// The client gave no `ver`: errors are HTTP status codes.
    legacy: bool,
}

struct Held {
    gen: u64,
    tx: oneshot::Sender<Reply>,
}

struct Cached {
    rid: u64,
    body: Bytes,
    sent: Instant,
}

struct SessionState {
    /// Every request below this rid has been received and its payloads released.
    next_rid: u64,
    /// Requests received ahead of a missing one.
    buffered: BTreeMap<u64, Incoming>,
    /// Requests waiting for their response, by rid.
    held: BTreeMap<u64, Held>,
    gen: u64,
    /// The last responses sent, for a repeated rid.
    cache: VecDeque<Cached>,
    /// Input for the session task.
    inbox: VecDeque<StreamEvent>,
    /// Output for the next response.
    out: Vec<u8>,
    bytes_in: u64,
    /// The last request or response; inactivity counts from here when nothing is held.
    last_activity: Instant,
    /// A pause in force until the next request (§10).
    pause: Option<Duration>,
    /// `report` and `time` for the next response (§9.2).
    report: Option<(u64, u64)>,
    /// The attributes of the session creation response, until it is sent.
    creation: Option<(u64, String)>,
    /// The domain the stream is for.
    to: String,
    /// The rid of a `type='terminate'` request: it waits for the session's end.
    terminating: Option<u64>,
    ended: bool,
    /// The terminal response for the next request, when the session ended with none held.
    terminal: Option<Reply>,
}

/// One BOSH session: what the HTTP handlers and the session task share.
pub struct Shared {
    id: u64,
    sid: String,
    server: Weak<Server>,
    /// Created over HTTPS or from a trusted address: only such requests may continue it.
    secure: bool,
    params: Params,
    content_type: HeaderValue,
    state: Mutex<SessionState>,
    /// Wakes the session task: input, the end, or nothing held any more.
    wake: Notify,
    /// Wakes the session task's writes: output was collected.
    drained: Notify,
}

enum Accepted {
    Now(Reply),
    Wait {
        rid: u64,
        gen: u64,
        rx: oneshot::Receiver<Reply>,
    },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        // A panic elsewhere while holding the lock leaves consistent enough state to end with.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn belongs_to(&self, server: &Arc<Server>) -> bool {
        std::ptr::eq(self.server.as_ptr(), Arc::as_ptr(server))
    }

    /// Takes a request with a valid sid (§14): replays, buffers, releases in order.
    fn accept(&self, rid: u64, inc: Incoming) -> Accepted {
        let mut st = self.lock();
        if st.ended {
            let r = st
                .terminal
                .take()
                .unwrap_or_else(|| terminal(self.params.legacy, Some("item-not-found"), b""));
            self.unregister();
            return Accepted::Now(r);
        }
        st.last_activity = Instant::now();
        st.pause = None;
        if rid < st.next_rid {
            if let Some(c) = st.cache.iter().find(|c| c.rid == rid) {
                return Accepted::Now(Reply::ok(c.body.clone()));
            }
            if st.held.contains_key(&rid) {
                return self.hold(&mut st, rid);
            }
            return Accepted::Now(self.fail(&mut st, "item-not-found"));
        }
        if rid - st.next_rid >= self.params.requests {
            return Accepted::Now(self.fail(&mut st, "item-not-found"));
        }
        if st.buffered.contains_key(&rid) {
            // The same early request again: it takes the place of the first.
            return self.hold(&mut st, rid);
        }
        let acc = self.hold(&mut st, rid);
        st.buffered.insert(rid, inc);
        loop {
            let next = st.next_rid;
            let Some(inc) = st.buffered.remove(&next) else {
                break;
            };
            st.next_rid += 1;
            self.release(&mut st, next, inc);
        }
        self.pump(&mut st);
        acc
    }

    /// Registers a waiting request; one already waiting with that rid gets a recoverable error
    /// (its sender is dropped) and this one gets the answer (§14.3).
    fn hold(&self, st: &mut SessionState, rid: u64) -> Accepted {
        st.gen += 1;
        let (tx, rx) = oneshot::channel();
        st.held.insert(rid, Held { gen: st.gen, tx });
        Accepted::Wait {
            rid,
            gen: st.gen,
            rx,
        }
    }

    /// Hands one in-order request's content to the session.
    fn release(&self, st: &mut SessionState, rid: u64, inc: Incoming) {
        st.bytes_in += inc.bytes as u64;
        if let (true, Some(a)) = (self.params.ack, inc.ack) {
            // The client has every response up to `a`; one sent after it long ago is likely
            // lost: report it so the client can ask again.
            if let Some(c) = st
                .cache
                .iter()
                .find(|c| c.rid == a.wrapping_add(1) && c.sent.elapsed() >= REPORT_AFTER)
            {
                st.report = Some((c.rid, c.sent.elapsed().as_millis() as u64));
            }
        }
        if inc.restart {
            // XEP-0206 §5: a restart request's payloads are ignored.
            if let Some(to) = inc.to.filter(|t| !t.is_empty()) {
                st.to = to;
            }
            let h = header(&st.to, "1.0", None);
            st.inbox.push_back(StreamEvent::Open(h));
        } else {
            st.inbox
                .extend(inc.payloads.into_iter().map(StreamEvent::Element));
        }
        if inc.terminate {
            st.inbox.push_back(StreamEvent::Close);
            st.terminating = Some(rid);
        }
        if let Some(p) = inc.pause {
            if self.params.max_pause > 0 && p <= self.params.max_pause && !inc.terminate {
                st.pause = Some(Duration::from_secs(p));
            }
        }
        self.wake.notify_one();
    }

    /// The oldest held request that can be answered: its payloads were released, and it is not
    /// a terminate request (that one is answered by the session's end, §11).
    fn oldest_ready(&self, st: &SessionState) -> Option<u64> {
        st.held
            .keys()
            .next()
            .copied()
            .filter(|rid| *rid < st.next_rid && Some(*rid) != st.terminating)
    }

    /// Answers what can be answered now: everything when pausing; otherwise the oldest
    /// requests while more than `hold` are held or there is something to say.
    fn pump(&self, st: &mut SessionState) {
        if st.pause.is_some() {
            // §10: a pause answers every pending request at once, without payloads.
            while let Some(rid) = self.oldest_ready(st) {
                self.respond(st, rid, false);
            }
            return;
        }
        while let Some(rid) = self.oldest_ready(st) {
            let ready = st.held.range(..st.next_rid).count();
            if ready > self.params.hold || !st.out.is_empty() || st.report.is_some() {
                self.respond(st, rid, true);
            } else {
                break;
            }
        }
    }

    /// Sends the response to `rid`, with the queued output if `with_output`.
    fn respond(&self, st: &mut SessionState, rid: u64, with_output: bool) {
        let Some(h) = st.held.remove(&rid) else {
            return;
        };
        let payload = if with_output {
            std::mem::take(&mut st.out)
        } else {
            Vec::new()
        };
        let mut attrs = String::new();
        if st.creation.as_ref().is_some_and(|(r, _)| *r == rid) {
            if let Some((_, a)) = st.creation.take() {
                attrs = a;
            }
        } else if self.params.ack {
            // §9.1: the highest rid received with all below it, unless it is this one.
            let hi = st.next_rid - 1;
            if hi != rid {
                attrs.push_str(&format!(" ack='{hi}'"));
            }
        }
        if let Some((report, time)) = st.report.take() {
            attrs.push_str(&format!(" report='{report}' time='{time}'"));
        }
        let body = wrap(&attrs, &payload);
        let now = Instant::now();
        st.cache.push_back(Cached {
            rid,
            body: body.clone(),
            sent: now,
        });
        while st.cache.len() as u64 > self.params.requests {
            st.cache.pop_front();
        }
        st.last_activity = now;
        // A client that went away misses it; the cache still has it for a retry.
        let _ = h.tx.send(Reply::ok(body));
        self.drained.notify_one();
        if st.held.is_empty() {
            self.wake.notify_one();
        }
    }

    /// A request's `wait` ran out: answer it (and older ones) now, or, if it still waits for an
    /// earlier rid, give it a recoverable error. `None` when it was answered meanwhile.
    fn expire(&self, rid: u64, gen: u64) -> Option<Reply> {
        let mut st = self.lock();
        if st.held.get(&rid).is_none_or(|h| h.gen != gen) {
            return None;
        }
        if rid < st.next_rid {
            let older: Vec<u64> = st.held.range(..rid).map(|(r, _)| *r).collect();
            for r in older {
                self.respond(&mut st, r, true);
            }
            self.respond(&mut st, rid, true);
            None
        } else {
            st.held.remove(&rid);
            if st.held.is_empty() {
                self.wake.notify_one();
            }
            Some(recoverable())
        }
    }

    /// Ends the session over a binding error in a request: the session task sees the
    /// connection lost.
    fn fail(&self, st: &mut SessionState, condition: &str) -> Reply {
        tracing::debug!(condition, "BOSH session terminated");
        let r = terminal(self.params.legacy, Some(condition), b"");
        self.end(st, r.clone(), false);
        r
    }

    /// Ends the session: every held request gets `reply`; with none held, the next request
    /// gets it (if `keep`), for a while.
    fn end(&self, st: &mut SessionState, reply: Reply, keep: bool) {
        st.ended = true;
        st.inbox.clear();
        st.buffered.clear();
        st.out = Vec::new();
        st.cache.clear();
        let held = std::mem::take(&mut st.held);
        let none_held = held.is_empty();
        for (_, h) in held {
            let _ = h.tx.send(reply.clone());
        }
        if none_held && keep {
            st.terminal = Some(reply);
            let (sid, id, grace) = (self.sid.clone(), self.id, self.params.inactivity);
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        tokio::time::sleep(grace).await;
                        SESSIONS.remove_if(&sid, |_, v| v.id == id);
                    });
                }
                // The runtime is going away (shutdown): nobody will ask again.
                Err(_) => self.unregister(),
            }
        } else {
            self.unregister();
        }
        self.wake.notify_one();
        self.drained.notify_one();
    }

    fn unregister(&self) {
        SESSIONS.remove_if(&self.sid, |_, v| v.id == self.id);
    }

    /// Answers held requests whose client went away (their answer is cached for a retry), so
    /// that they do not keep the session from timing out.
    fn sweep(&self, st: &mut SessionState) {
        let gone: Vec<u64> = st
            .held
            .iter()
            .filter(|(_, h)| h.tx.is_closed())
            .map(|(r, _)| *r)
            .collect();
        for rid in gone {
            if rid < st.next_rid && self.oldest_ready(st) == Some(rid) {
                self.respond(st, rid, true);
            } else {
                st.held.remove(&rid);
            }
        }
    }
}

/// Waits for the response to an accepted request.
async fn reply_to(shared: &Shared, acc: Accepted) -> Reply {
    match acc {
        Accepted::Now(r) => r,
        Accepted::Wait { rid, gen, mut rx } => {
            match tokio::time::timeout(shared.params.wait, &mut rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => recoverable(),
                Err(_) => match shared.expire(rid, gen) {
                    Some(r) => r,
                    None => rx.await.unwrap_or_else(|_| recoverable()),
                },
            }
        }
    }
}

async fn handle(
    State(st): State<HttpState>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    body: Body,
) -> Response {
    let server = st.server.clone();
    if !server.config.bosh.enabled {
        return StatusCode::NOT_FOUND.into_response();
    }
    let c2s = &server.config.c2s;
    let limit = c2s.max_stanza_bytes + WRAPPER_SLACK;
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        tracing::debug!(ip = %peer.ip(), "BOSH request body too large or cut short");
        return sessionless(StatusCode::FORBIDDEN, "policy-violation");
    };
    let limits = Limits {
        max_stanza_bytes: limit,
        max_depth: c2s.max_depth + 1,
        max_attributes: c2s.max_attributes,
        max_attribute_bytes: c2s.max_attribute_bytes,
    };
    let (el, rid) = match parse_request(&bytes, limits) {
        Ok(r) => r,
        Err(e) => {
            if let Some(e) = e {
                tracing::debug!(ip = %peer.ip(), error = %e, "unreadable BOSH request");
            }
            return sessionless(StatusCode::BAD_REQUEST, "bad-request");
        }
    };
    let trusted = st.secure || crate::http::is_trusted(&server, peer.ip());
    let inc = incoming(&el, bytes.len());
    let Some(sid) = el.attr("sid") else {
        return create(&st, peer, trusted, rid, &el, inc).await;
    };
    let shared = SESSIONS
        .get(sid)
        .map(|e| e.value().clone())
        .filter(|s| s.belongs_to(&server));
    let Some(shared) = shared else {
        return sessionless(StatusCode::NOT_FOUND, "item-not-found");
    };
    if shared.secure && !trusted {
        // A session that began over HTTPS does not continue in the clear.
        return sessionless(StatusCode::FORBIDDEN, "policy-violation");
    }
    let acc = shared.accept(rid, inc);
    let reply = reply_to(&shared, acc).await;
    http_response(reply, shared.content_type.clone())
}

/// A request body: the `<body/>` wrapper and its `rid`. The error is None when the XML is fine
/// but not a BOSH request.
fn parse_request(bytes: &[u8], limits: Limits) -> Result<(Element, u64), Option<StreamError>> {
    let el = parse_element(bytes, limits).map_err(Some)?;
    if !el.is("body", NS_HTTPBIND) {
        return Err(None);
    }
    let rid = el
        .attr("rid")
        .and_then(|r| r.trim().parse::<u64>().ok())
        .ok_or(None)?;
    Ok((el, rid))
}

/// What [`handle`] and [`create`] read from a request, without a server: for the fuzzer
/// ([`crate::fuzzing::framing`]).
pub(crate) fn fuzz_request(bytes: &[u8], limits: Limits) {
    let Ok((el, rid)) = parse_request(bytes, limits) else {
        return;
    };
    let inc = incoming(&el, bytes.len());
    let _ = rid.saturating_add(1);
    let _ = el
        .attr("content")
        .and_then(|c| HeaderValue::from_str(c).ok());
    let num = |a: &str| el.attr(a).and_then(|v| v.trim().parse::<u64>().ok());
    let _ = (num("wait"), num("hold"));
    let ver = negotiate_version(el.attr("ver"));
    if let Some(to) = inc.to.as_deref().filter(|t| !t.is_empty()) {
        let version = el.attr_ns(NS_XBOSH, "version").unwrap_or("1.0");
        let _ = String::from(&header(to, version, el.attr("from")));
        let attrs = format!(" ver='{ver}' from='{}'", esc(to));
        let _ = wrap(&attrs, b"");
    }
    for p in &inc.payloads {
        assert!(
            p.ns() != NS_HTTPBIND,
            "a payload kept the wrapper's namespace"
        );
        let _ = writer::to_bytes(p);
    }
}

/// The lower of the client's version and ours, as "major.minor".
fn negotiate_version(client: Option<&str>) -> String {
    let parsed = client.and_then(|v| {
        let (a, b) = v.trim().split_once('.')?;
        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
    });
    let (a, b) = match parsed {
        Some(v) if v < VERSION => v,
        _ => VERSION,
    };
    format!("{a}.{b}")
}

/// A session creation request (§7, XEP-0206 §4).
async fn create(
    st: &HttpState,
    peer: SocketAddr,
    trusted: bool,
    rid: u64,
    el: &Element,
    inc: Incoming,
) -> Response {
    let server = &st.server;
    let cfg = &server.config.bosh;
    let legacy = el.attr("ver").is_none();
    let content_type = el
        .attr("content")
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or(HeaderValue::from_static(CONTENT_TYPE));
    let early = |condition: &str| {
        http_response(terminal(legacy, Some(condition), b""), content_type.clone())
    };
    let Some(to) = inc.to.clone().filter(|t| !t.is_empty()) else {
        return early("improper-addressing");
    };
    if !server.config.domains.contains(&to) {
        return early("host-unknown");
    }
    if SESSIONS.iter().filter(|e| e.belongs_to(server)).count() >= cfg.max_sessions {
        tracing::warn!(
            max = cfg.max_sessions,
            "BOSH session refused: bosh.max_sessions reached"
        );
        return early("internal-server-error");
    }
    let num = |a: &str| el.attr(a).and_then(|v| v.trim().parse::<u64>().ok());
    let wait = num("wait").map_or(cfg.max_wait_secs, |w| w.min(cfg.max_wait_secs));
    let hold = num("hold").map_or(1, |h| h.min(u64::from(cfg.max_hold)));
    let params = Params {
        wait: Duration::from_secs(wait),
        hold: hold as usize,
        requests: hold + 1,
        inactivity: Duration::from_secs(cfg.inactivity_secs),
        max_pause: cfg.max_pause_secs,
        ack: el.attr("ack") == Some("1"),
        legacy,
    };
    let sid: String = rand::thread_rng()
        .sample_iter(&rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let domain = to.clone();
    let mut attrs = format!(
        " sid='{sid}' wait='{wait}' hold='{hold}' requests='{}' inactivity='{}' polling='{}' ver='{}' from='{}' xmpp:version='1.0' xmpp:restartlogic='true' xmlns:xmpp='{NS_XBOSH}'",
        params.requests,
        cfg.inactivity_secs,
        cfg.polling_secs,
        negotiate_version(el.attr("ver")),
        esc(&domain),
    );
    if cfg.max_pause_secs > 0 {
        attrs.push_str(&format!(" maxpause='{}'", cfg.max_pause_secs));
    }
    if params.ack {
        attrs.push_str(&format!(" ack='{rid}'"));
    }
    let version = el.attr_ns(NS_XBOSH, "version").unwrap_or("1.0");
    let mut inbox = VecDeque::new();
    inbox.push_back(StreamEvent::Open(header(&to, version, el.attr("from"))));
    let (tx, rx) = oneshot::channel();
    let mut held = BTreeMap::new();
    held.insert(rid, Held { gen: 1, tx });
    let shared = Arc::new(Shared {
        id: RECORD_IDS.fetch_add(1, Ordering::Relaxed),
        sid: sid.clone(),
        server: Arc::downgrade(server),
        secure: trusted,
        params,
        content_type,
        state: Mutex::new(SessionState {
            next_rid: rid.saturating_add(1),
            buffered: BTreeMap::new(),
            held,
            gen: 1,
            cache: VecDeque::new(),
            inbox,
            out: Vec::new(),
            bytes_in: inc.bytes as u64,
            last_activity: Instant::now(),
            pause: None,
            report: None,
            creation: Some((rid, attrs)),
            to,
            terminating: None,
            ended: false,
            terminal: None,
        }),
        wake: Notify::new(),
        drained: Notify::new(),
    });
    SESSIONS.insert(sid, shared.clone());
    tracing::debug!(ip = %peer.ip(), wait, hold, legacy, "BOSH session created");
    let t = BoshTransport {
        shared: shared.clone(),
        peer,
        secure: st.secure,
        auth_allowed: trusted,
        read_limit: None,
    };
    tokio::spawn(c2s::run(server.clone(), t, None));
    let reply = reply_to(&shared, Accepted::Wait { rid, gen: 1, rx }).await;
    http_response(reply, shared.content_type.clone())
}

/// The session task's side of a BOSH session.
pub struct BoshTransport {
    shared: Arc<Shared>,
    peer: SocketAddr,
    secure: bool,
    auth_allowed: bool,
    read_limit: Option<u64>,
}

impl Transport for BoshTransport {
    async fn next_event(&mut self) -> Result<Option<StreamEvent>, TransportError> {
        loop {
            let deadline = {
                let shared = &self.shared;
                let mut st = shared.lock();
                if let Some(ev) = st.inbox.pop_front() {
                    c2s::transport::check_read_limit(st.bytes_in, self.read_limit)?;
                    return Ok(Some(ev));
                }
                if st.ended {
                    return Ok(None);
                }
                shared.sweep(&mut st);
                if st.held.is_empty() {
                    let at = st.last_activity + st.pause.unwrap_or(shared.params.inactivity);
                    if Instant::now() >= at {
                        tracing::info!("BOSH client inactive: connection lost");
                        st.ended = true;
                        st.out = Vec::new();
                        shared.unregister();
                        return Ok(None);
                    }
                    at
                } else {
                    // Held requests end within `wait`; look again then.
                    Instant::now() + shared.params.wait
                }
            };
            let _ = tokio::time::timeout_at(deadline, self.shared.wake.notified()).await;
        }
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        loop {
            {
                let mut st = self.shared.lock();
                if st.ended {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if st.out.is_empty() || st.out.len() + data.len() <= OUT_CAP {
                    st.out.extend_from_slice(data);
                    return Ok(());
                }
            }
            self.shared.drained.notified().await;
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        let mut st = self.shared.lock();
        if st.ended {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.shared.pump(&mut st);
        Ok(())
    }

    async fn open(&mut self, _id: &str, _from: &str, _to: Option<&str>) -> io::Result<()> {
        // The creation response carries what a stream header would (§7, XEP-0206 §4); a
        // restart's response carries only the features that follow.
        Ok(())
    }

    async fn close(&mut self, err: Option<&StreamError>) {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.ended {
            return;
        }
        let mut payload = std::mem::take(&mut st.out);
        let condition = match err.map(|e| e.kind) {
            None => None,
            Some(StreamErrorKind::HostUnknown) => Some("host-unknown"),
            Some(StreamErrorKind::SystemShutdown) => Some("system-shutdown"),
            Some(_) => Some("remote-stream-error"),
        };
        if let (Some("remote-stream-error"), Some(e)) = (condition, err) {
            // XEP-0206 §7: the stream error itself goes in the body.
            payload.extend_from_slice(writer::stream_error(e).as_bytes());
        }
        let reply = terminal(shared.params.legacy, condition, &payload);
        shared.end(&mut st, reply, true);
    }

    fn restart(&mut self) {}

    fn bytes_in(&self) -> u64 {
        self.shared.lock().bytes_in
    }

    fn set_read_limit(&mut self, limit: Option<u64>) {
        self.read_limit = limit;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn is_secure(&self) -> bool {
        self.secure || self.auth_allowed
    }

    fn auth_allowed(&self) -> bool {
        self.auth_allowed
    }

    fn can_starttls(&self) -> bool {
        false
    }

    async fn starttls(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Stream(StreamError::new(
            StreamErrorKind::PolicyViolation,
            "no STARTTLS over BOSH",
        )))
    }

    fn bindings(&self) -> ChannelBindings {
        // The TLS session (ours or a proxy's) is not visible at this layer: no -PLUS here.
        ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: None,
            tls: self.is_secure(),
        }
    }

    fn idle(&mut self) {
        let mut st = self.shared.lock();
        if st.inbox.is_empty() {
            st.inbox.shrink_to_fit();
        }
    }

    fn transport_name(&self) -> &'static str {
        "bosh"
    }
}

impl Drop for BoshTransport {
    fn drop(&mut self) {
        // The session let go of its connection without closing it (it waits to be resumed):
        // to the client the session is over.
        let shared = &self.shared;
        let mut st = shared.lock();
        if !st.ended {
            let r = terminal(shared.params.legacy, Some("remote-connection-failed"), b"");
            shared.end(&mut st, r, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(next_rid: u64, hold: usize) -> Arc<Shared> {
        Arc::new(Shared {
            id: RECORD_IDS.fetch_add(1, Ordering::Relaxed),
            sid: format!("test-{next_rid}-{hold}"),
            server: Weak::new(),
            secure: true,
            params: Params {
                wait: Duration::from_secs(60),
                hold,
                requests: hold as u64 + 1,
                inactivity: Duration::from_secs(60),
                max_pause: 120,
                ack: false,
                legacy: false,
            },
            content_type: HeaderValue::from_static(CONTENT_TYPE),
            state: Mutex::new(SessionState {
                next_rid,
                buffered: BTreeMap::new(),
                held: BTreeMap::new(),
                gen: 0,
                cache: VecDeque::new(),
                inbox: VecDeque::new(),
                out: Vec::new(),
                bytes_in: 0,
                last_activity: Instant::now(),
                pause: None,
                report: None,
                creation: None,
                to: "localhost".into(),
                terminating: None,
                ended: false,
                terminal: None,
            }),
            wake: Notify::new(),
            drained: Notify::new(),
        })
    }

    fn msg(text: &str) -> Incoming {
        Incoming {
            payloads: vec![Element::builder("message", ns::CLIENT)
                .append(text.to_string())
                .build()],
            bytes: 10,
            ..Incoming::default()
        }
    }

    fn inbox_texts(s: &Shared) -> Vec<String> {
        s.lock()
            .inbox
            .drain(..)
            .filter_map(|e| match e {
                StreamEvent::Element(el) => Some(el.text()),
                _ => None,
            })
            .collect()
    }

    fn body_of(r: &Reply) -> String {
        String::from_utf8_lossy(&r.body).into_owned()
    }

    #[tokio::test]
    async fn early_requests_wait_for_the_missing_rid() {
        let s = shared(10, 1);
        let _w11 = s.accept(11, msg("second"));
        assert!(inbox_texts(&s).is_empty(), "rid 11 waits for rid 10");
        let _w10 = s.accept(10, msg("first"));
        assert_eq!(inbox_texts(&s), vec!["first", "second"]);
        assert_eq!(s.lock().next_rid, 12);
    }

    #[tokio::test]
    async fn more_than_hold_answers_the_oldest_and_a_repeat_gets_the_same_bytes() {
        let s = shared(10, 1);
        let Accepted::Wait { rx: rx10, .. } = s.accept(10, Incoming::default()) else {
            panic!("held")
        };
        s.lock()
            .out
            .extend_from_slice(b"<message xmlns='jabber:client'/>");
        let _w11 = s.accept(11, Incoming::default());
        let r10 = rx10.await.expect("answered");
        assert!(body_of(&r10).contains("<message"), "{}", body_of(&r10));
        match s.accept(10, Incoming::default()) {
            Accepted::Now(again) => assert_eq!(again.body, r10.body),
            Accepted::Wait { .. } => panic!("a repeat of an answered rid is answered at once"),
        }
    }

    #[tokio::test]
    async fn a_rid_beyond_the_window_or_forgotten_ends_the_session() {
        let s = shared(10, 1);
        let _w10 = s.accept(10, Incoming::default());
        match s.accept(13, Incoming::default()) {
            Accepted::Now(r) => {
                assert!(body_of(&r).contains("condition='item-not-found'"));
                assert_eq!(r.status, StatusCode::OK);
            }
            Accepted::Wait { .. } => panic!("refused"),
        }
        assert!(s.lock().ended);

        let s = shared(10, 1);
        match s.accept(3, Incoming::default()) {
            Accepted::Now(r) => assert!(body_of(&r).contains("item-not-found")),
            Accepted::Wait { .. } => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn a_terminate_request_waits_for_the_end() {
        let s = shared(10, 1);
        let Accepted::Wait { rx, .. } = s.accept(
            10,
            Incoming {
                terminate: true,
                ..msg("bye")
            },
        ) else {
            panic!("held")
        };
        {
            let mut st = s.lock();
            st.out
                .extend_from_slice(b"<presence xmlns='jabber:client'/>");
            s.pump(&mut st);
            assert!(st.held.contains_key(&10), "not answered by output");
            let r = terminal(false, None, &std::mem::take(&mut st.out));
            s.end(&mut st, r, true);
        }
        let r = rx.await.expect("answered");
        let b = body_of(&r);
        assert!(
            b.contains("type='terminate'") && b.contains("<presence"),
            "{b}"
        );
    }

    #[tokio::test]
    async fn responses_carry_ack_and_a_pause_answers_everything_at_once() {
        let mut s = shared(10, 1);
        Arc::get_mut(&mut s).expect("sole owner").params.ack = true;
        let Accepted::Wait { rx: rx10, .. } = s.accept(10, Incoming::default()) else {
            panic!("held")
        };
        let Accepted::Wait { rx: rx11, .. } = s.accept(11, Incoming::default()) else {
            panic!("held")
        };
        // rid 10 is answered when rid 11 arrives: ack reports 11 as received.
        assert!(body_of(&rx10.await.expect("answered")).contains("ack='11'"));
        // A pause answers the held rid 11 and itself, without payloads.
        s.lock()
            .out
            .extend_from_slice(b"<message xmlns='jabber:client'/>");
        let Accepted::Wait { rx: rx12, .. } = s.accept(
            12,
            Incoming {
                pause: Some(30),
                ..Incoming::default()
            },
        ) else {
            panic!("held")
        };
        let r11 = body_of(&rx11.await.expect("answered"));
        let r12 = body_of(&rx12.await.expect("answered"));
        assert!(
            !r11.contains("<message") && !r12.contains("<message"),
            "{r11} {r12}"
        );
        assert_eq!(s.lock().pause, Some(Duration::from_secs(30)));
        // A request still waiting when its rid is sent again gets a recoverable error.
        let _w14 = s.accept(14, Incoming::default());
        let Accepted::Wait { rx: first, .. } = s.accept(14, Incoming::default()) else {
            panic!("held")
        };
        let Accepted::Wait { .. } = s.accept(14, Incoming::default()) else {
            panic!("held")
        };
        assert!(first.await.is_err(), "the earlier copy is let go");
    }

    #[test]
    fn legacy_clients_get_http_codes() {
        assert_eq!(
            terminal(true, Some("item-not-found"), b"").status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            terminal(true, Some("bad-request"), b"").status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            terminal(false, Some("item-not-found"), b"").status,
            StatusCode::OK
        );
    }

    #[test]
    fn version_is_the_lower_of_the_two() {
        assert_eq!(negotiate_version(Some("1.6")), "1.6");
        assert_eq!(negotiate_version(Some("1.20")), "1.11");
        assert_eq!(negotiate_version(Some("junk")), "1.11");
        assert_eq!(negotiate_version(None), "1.11");
    }

    #[test]
    fn stanzas_in_the_wrapper_namespace_become_jabber_client() {
        let body: Element = format!(
            "<body xmlns='{NS_HTTPBIND}'><message to='a@b'><body>hi</body><x xmlns='urn:x'><y/></x></message></body>"
        )
        .parse()
        .expect("xml");
        let inc = incoming(&body, 0);
        let m = &inc.payloads[0];
        assert!(m.is("message", ns::CLIENT));
        assert_eq!(m.attr("to"), Some("a@b"));
        assert!(m.get_child("body", ns::CLIENT).is_some());
        assert!(m
            .get_child("x", "urn:x")
            .is_some_and(|x| x.has_child("y", "urn:x")));
    }
}
