//! XEP-0124/XEP-0206 BOSH at `/http-bind` and XEP-0156 host-meta: session creation, SASL,
//! restart and binding over BOSH, chat with TCP and WebSocket clients through the same session
//! code, rid ordering and replay, terminal conditions, inactivity, long polling, CORS.
//!
//! The HTTP client is raw HTTP/1.1 over a socket (one connection per request, as a browser with
//! `hold='1'` behaves), so what is asserted is exactly what goes over the wire.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::common::*;

const HTTPBIND: &str = "http://jabber.org/protocol/httpbind";
const XBOSH: &str = "urn:xmpp:xbosh";

#[derive(Debug)]
struct HttpResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl HttpResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn xml(&self) -> Element {
        self.body
            .parse()
            .unwrap_or_else(|e| panic!("response is XML ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a fresh connection (TLS when `tls`), read to the end.
async fn http(
    addr: SocketAddr,
    tls: bool,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResp {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut io: Box<dyn Io> = if tls {
        Box::new(
            tokio_rustls::TlsConnector::from(client_tls())
                .connect(
                    rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
                    tcp,
                )
                .await
                .expect("tls handshake"),
        )
    } else {
        Box::new(tcp)
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {DOMAIN}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    io.write_all(req.as_bytes()).await.expect("write request");
    io.flush().await.expect("flush");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(90), io.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .ok();
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpResp {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn post(addr: SocketAddr, tls: bool, body: &str) -> HttpResp {
    http(
        addr,
        tls,
        "POST",
        "/http-bind",
        &[("Content-Type", "text/xml; charset=utf-8")],
        body,
    )
    .await
}

/// A BOSH client: the session's sid, the next rid, and elements received but not yet taken.
struct Bosh {
    addr: SocketAddr,
    tls: bool,
    sid: String,
    rid: u64,
    pending: VecDeque<Element>,
}

fn children(body: &Element) -> Vec<Element> {
    body.children().cloned().collect()
}

impl Bosh {
    /// Creates a session; returns the client and the creation response's `<body/>`.
    async fn create(addr: SocketAddr, tls: bool, attrs: &str) -> (Bosh, Element) {
        let rid = 1_000_000u64;
        let r = post(
            addr,
            tls,
            &format!("<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='{rid}' to='{DOMAIN}' xml:lang='en' xmpp:version='1.0' ver='1.11' {attrs}/>"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let body = r.xml();
        assert!(body.is("body", HTTPBIND), "{}", r.body);
        let sid = body.attr("sid").expect("sid").to_string();
        let mut b = Bosh {
            addr,
            tls,
            sid,
            rid: rid + 1,
            pending: VecDeque::new(),
        };
        b.pending.extend(children(&body));
        (b, body)
    }

    /// The next request's `<body/>`, using up a rid.
    fn body(&mut self, attrs: &str, payload: &str) -> String {
        let rid = self.rid;
        self.rid += 1;
        format!(
            "<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='{rid}' sid='{}' {attrs}>{payload}</body>",
            self.sid
        )
    }

    async fn send_raw(&self, body: &str) -> HttpResp {
        post(self.addr, self.tls, body).await
    }

    /// Sends a request and returns the response's `<body/>`; its payloads are also queued.
    async fn send(&mut self, attrs: &str, payload: &str) -> Element {
        let b = self.body(attrs, payload);
        let r = self.send_raw(&b).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let el = r.xml();
        assert_ne!(el.attr("type"), Some("terminate"), "{}", r.body);
        self.pending.extend(children(&el));
        el
    }

    /// Polls until an element matching `pred` arrives; others stay queued.
    async fn recv_until(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(i) = self.pending.iter().position(&pred) {
                return self.pending.remove(i).expect("present");
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.send("", "").await;
        }
    }

    /// SASL PLAIN, restart, bind: returns the bound JID.
    async fn login(&mut self, user: &str, password: &str, resource: &str) -> String {
        self.authenticate(user, password).await;
        self.send("", &format!("<iq xmlns='jabber:client' type='set' id='bind1'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>")).await;
        let r = self
            .recv_until("bind result", |e| e.attr("id") == Some("bind1"))
            .await;
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
        r.get_child("bind", NS_BIND)
            .and_then(|b| b.get_child("jid", NS_BIND))
            .map(|j| j.text())
            .expect("bound jid")
    }

    /// SASL PLAIN and the restart: returns the features of the restarted stream.
    async fn authenticate(&mut self, user: &str, password: &str) -> Element {
        let features = self
            .recv_until("features", |e| e.is("features", NS_STREAM))
            .await;
        let mechs: Vec<String> = features
            .get_child("mechanisms", NS_SASL)
            .expect("SASL offered")
            .children()
            .map(|m| m.text())
            .collect();
        assert!(mechs.iter().any(|m| m == "PLAIN"), "{mechs:?}");
        let b = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.send(
            "",
            &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{b}</auth>"),
        )
        .await;
        let r = self.recv_until("SASL result", |e| e.ns() == NS_SASL).await;
        assert!(r.is("success", NS_SASL), "{}", xml(&r));
        self.send(&format!("to='{DOMAIN}' xmpp:restart='true'"), "")
            .await;
        let f = self
            .recv_until("features after restart", |e| e.is("features", NS_STREAM))
            .await;
        assert!(f.get_child("bind", NS_BIND).is_some(), "{}", xml(&f));
        f
    }
}

fn is_message_with_body(e: &Element, text: &str) -> bool {
    e.name() == "message" && body(e).as_deref() == Some(text)
}

fn is_unavailable_from(e: &Element, jid: &str) -> bool {
    e.name() == "presence" && e.attr("type") == Some("unavailable") && e.attr("from") == Some(jid)
}

/// A BOSH user `web` logged in as web@localhost/browser (available), and a TCP user `tcp` at
/// tcp@localhost/desk (available) who has received the BOSH user's directed presence.
async fn pair(s: &TestServer, tls: bool, attrs: &str) -> (Bosh, RawClient) {
    s.add_user("web", "pw").await;
    s.add_user("tcp", "pw").await;
    let mut tcp = RawClient::login(s, "tcp", "pw", "desk").await;
    tcp.online().await;
    let addr = if tls { s.https } else { s.http };
    let (mut b, _) = Bosh::create(addr, tls, attrs).await;
    let jid = b.login("web", "pw", "browser").await;
    assert_eq!(jid, "web@localhost/browser");
    b.send(
        "",
        "<presence xmlns='jabber:client'/><presence xmlns='jabber:client' to='tcp@localhost/desk'/>",
    )
    .await;
    tcp.recv_until(|e| e.name() == "presence" && e.attr("from") == Some("web@localhost/browser"))
        .await;
    (b, tcp)
}

#[tokio::test]
async fn bosh_session_creation_reports_the_chosen_attributes() {
    let s = TestServer::start().await;
    let rid = 4_000_000u64;
    let r = post(
        s.http,
        false,
        &format!("<body xmlns='{HTTPBIND}' xmlns:xmpp='{XBOSH}' rid='{rid}' to='localhost' wait='600' hold='5' ver='1.6' ack='1' xmpp:version='1.0'/>"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/xml; charset=utf-8"));
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let b = r.xml();
    assert!(b.is("body", HTTPBIND));
    assert!(b.attr("sid").is_some_and(|s| s.len() >= 16), "{}", r.body);
    // Clamped to the server's limits and reported.
    assert_eq!(b.attr("wait"), Some("60"));
    assert_eq!(b.attr("hold"), Some("1"));
    assert_eq!(b.attr("requests"), Some("2"));
    assert_eq!(b.attr("inactivity"), Some("60"));
    assert_eq!(b.attr("polling"), Some("2"));
    assert_eq!(b.attr("maxpause"), Some("120"));
    // The lower of the two versions; acknowledgements as asked.
    assert_eq!(b.attr("ver"), Some("1.6"));
    assert_eq!(b.attr("ack"), Some(rid.to_string().as_str()));
    assert_eq!(b.attr("from"), Some("localhost"));
    assert_eq!(b.attr_ns(XBOSH, "version"), Some("1.0"), "{}", r.body);
    assert_eq!(b.attr_ns(XBOSH, "restartlogic"), Some("true"));
    // XEP-0206: the stream features come in the creation response.
    let f = b
        .get_child("features", NS_STREAM)
        .unwrap_or_else(|| panic!("features in the creation response: {}", r.body));
    assert!(f.get_child("mechanisms", NS_SASL).is_some());
    assert!(
        f.get_child("starttls", NS_TLS).is_none(),
        "no STARTTLS over BOSH"
    );

    // A smaller wait and hold are kept as asked.
    let (_, b) = Bosh::create(s.http, false, "wait='5' hold='1'").await;
    assert_eq!(b.attr("wait"), Some("5"));
    assert_eq!(b.attr("hold"), Some("1"));

    // No 'to': improper-addressing; a domain not served: host-unknown.
    let r = post(
        s.http,
        false,
        &format!("<body xmlns='{HTTPBIND}' rid='5' ver='1.11' wait='5' hold='1'/>"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.xml().attr("type"), Some("terminate"));
    assert_eq!(r.xml().attr("condition"), Some("improper-addressing"));
    let r = post(
        s.http,
        false,
        &format!(
            "<body xmlns='{HTTPBIND}' rid='5' ver='1.11' to='elsewhere.example' wait='5' hold='1'/>"
        ),
    )
    .await;
    assert_eq!(r.xml().attr("type"), Some("terminate"));
    assert_eq!(r.xml().attr("condition"), Some("host-unknown"));
}

#[tokio::test]
async fn bosh_client_logs_in_and_chats_with_tcp_and_websocket_clients() {
    let s = TestServer::start().await;
    s.add_user("ws", "pw").await;
    let (mut b, mut tcp) = pair(&s, false, "wait='5' hold='1'").await;

    // BOSH -> TCP
    b.send("", "<message xmlns='jabber:client' to='tcp@localhost/desk' type='chat' id='b1'><body>from bosh</body></message>").await;
    let m = tcp.recv_until(|e| e.name() == "message").await;
    assert_eq!(m.attr("from"), Some("web@localhost/browser"));
    assert_eq!(body(&m).as_deref(), Some("from bosh"));

    // TCP -> BOSH
    tcp.send(
        "<message to='web@localhost/browser' type='chat' id='t1'><body>from tcp</body></message>",
    )
    .await;
    let m = b
        .recv_until("the TCP client's message", |e| {
            is_message_with_body(e, "from tcp")
        })
        .await;
    assert_eq!(m.attr("from"), Some("tcp@localhost/desk"));

    // WebSocket <-> BOSH
    let mut ws = super::websocket::ws_connect(&s).await;
    super::websocket::login(&mut ws, "ws", "pw", "tab").await;
    super::websocket::send(&mut ws, "<message xmlns='jabber:client' to='web@localhost/browser' type='chat'><body>from ws</body></message>").await;
    let m = b
        .recv_until("the WebSocket client's message", |e| {
            is_message_with_body(e, "from ws")
        })
        .await;
    assert_eq!(m.attr("from"), Some("ws@localhost/tab"));
    b.send("", "<message xmlns='jabber:client' to='ws@localhost/tab' type='chat'><body>to ws</body></message>").await;
    let m = loop {
        let e = super::websocket::recv(&mut ws).await;
        if e.name() == "message" {
            break e;
        }
    };
    assert_eq!(m.attr("from"), Some("web@localhost/browser"));
    assert_eq!(body(&m).as_deref(), Some("to ws"));

    // Stanzas without xmlns='jabber:client' (XEP-0206 §2 note) are taken as jabber:client.
    b.send(
        "",
        "<message to='tcp@localhost/desk' type='chat'><body>no xmlns</body></message>",
    )
    .await;
    let m = tcp.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("no xmlns"));
}

#[tokio::test]
async fn bosh_over_https_and_long_polling() {
    let s = TestServer::start().await;
    let (mut b, mut tcp) = pair(&s, true, "wait='2' hold='1'").await;
    // Drain whatever is queued (presence echoes) so the next poll waits.
    while b.send("", "").await.children().next().is_some() {}
    b.pending.clear();

    // A held request is answered as soon as a message arrives.
    let req = b.body("", "");
    let (addr, tls) = (b.addr, b.tls);
    let started = Instant::now();
    let poll = tokio::spawn(async move { post(addr, tls, &req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "the request is held while nothing is to be sent"
    );
    tcp.send("<message to='web@localhost/browser' type='chat'><body>wake up</body></message>")
        .await;
    let r = poll.await.expect("poll task");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1900),
        "answered at once, took {took:?}"
    );
    let m = r.xml();
    assert!(
        m.children().any(|e| is_message_with_body(e, "wake up")),
        "{}",
        r.body
    );

    // With nothing to send, the request is answered empty when `wait` (2 s) expires.
    let started = Instant::now();
    let e = b.send("", "").await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "held for wait, took {took:?}"
    );
    assert_eq!(e.children().count(), 0, "{}", xml(&e));
    assert_eq!(e.attr("type"), None);
}

#[tokio::test]
async fn bosh_repeated_rid_gets_the_identical_response() {
    let s = TestServer::start().await;
    let (mut b, _tcp) = pair(&s, false, "wait='2' hold='1'").await;
    while b.send("", "").await.children().next().is_some() {}
    let req = b.body(
        "",
        "<iq xmlns='jabber:client' type='get' id='ping1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>",
    );
    let first = b.send_raw(&req).await;
    assert_eq!(first.status, 200);
    assert!(
        first
            .xml()
            .children()
            .any(|e| e.attr("id") == Some("ping1") && e.attr("type") == Some("result")),
        "{}",
        first.body
    );
    // The client lost the response and sends the same request again.
    let again = b.send_raw(&req).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the buffered copy, byte for byte");
    // The iq was not processed twice: the next poll has no second result.
    let next = b.send("", "").await;
    assert!(
        !next.children().any(|e| e.attr("id") == Some("ping1")),
        "{}",
        xml(&next)
    );
}

#[tokio::test]
async fn bosh_out_of_order_requests_are_processed_in_rid_order() {
    let s = TestServer::start().await;
    let (mut b, mut tcp) = pair(&s, false, "wait='2' hold='1'").await;
    let first = b.body(
        "",
        "<message xmlns='jabber:client' to='tcp@localhost/desk' type='chat'><body>one</body></message>",
    );
    let second = b.body(
        "",
        "<message xmlns='jabber:client' to='tcp@localhost/desk' type='chat'><body>two</body></message>",
    );
    let (addr, tls) = (b.addr, b.tls);
    // The second request overtakes the first.
    let late = tokio::spawn(async move { post(addr, tls, &second).await });
    assert_nothing(&mut tcp, "a request that arrived before an earlier rid").await;
    let r1 = b.send_raw(&first).await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let m1 = tcp.recv_until(|e| e.name() == "message").await;
    let m2 = tcp.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m1).as_deref(), Some("one"));
    assert_eq!(body(&m2).as_deref(), Some("two"));
    let r2 = late.await.expect("task");
    assert_eq!(r2.status, 200, "{}", r2.body);
    assert_ne!(r2.xml().attr("type"), Some("terminate"));
}

#[tokio::test]
async fn bosh_rid_outside_the_window_terminates_with_item_not_found() {
    let s = TestServer::start().await;
    let (mut b, mut tcp) = pair(&s, false, "wait='2' hold='1'").await;
    b.rid += 10;
    let req = b.body("", "");
    let r = b.send_raw(&req).await;
    assert_eq!(
        r.status, 200,
        "not a legacy client: a terminal binding condition"
    );
    let el = r.xml();
    assert_eq!(el.attr("type"), Some("terminate"), "{}", r.body);
    assert_eq!(el.attr("condition"), Some("item-not-found"));
    // The session is gone: its contact sees it leave, and the sid is unknown now.
    tcp.recv_until(|e| is_unavailable_from(e, "web@localhost/browser"))
        .await;
    let req = b.body("", "");
    let r = b.send_raw(&req).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.xml().attr("condition"), Some("item-not-found"));
}

#[tokio::test]
async fn bosh_unknown_sid_and_bad_requests() {
    let s = TestServer::start().await;
    let r = post(
        s.http,
        false,
        &format!("<body xmlns='{HTTPBIND}' rid='10' sid='no-such-session'/>"),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let el = r.xml();
    assert_eq!(el.attr("type"), Some("terminate"));
    assert_eq!(el.attr("condition"), Some("item-not-found"));

    for bad in [
        "not xml at all".to_string(),
        "<body xmlns='urn:other'/>".to_string(),
        format!("<body xmlns='{HTTPBIND}' to='localhost'/>"),
    ] {
        let r = post(s.http, false, &bad).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.xml().attr("condition"), Some("bad-request"), "{bad}");
    }
    // A body beyond the stanza limit is refused before it is parsed.
    let big = format!(
        "<body xmlns='{HTTPBIND}' rid='10' sid='x'><message xmlns='jabber:client'><body>{}</body></message></body>",
        "a".repeat(300 * 1024)
    );
    let r = post(s.http, false, &big).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.xml().attr("condition"), Some("policy-violation"));
}

#[tokio::test]
async fn bosh_terminate_ends_the_session() {
    let s = TestServer::start().await;
    let (mut b, mut tcp) = pair(&s, false, "wait='2' hold='1'").await;
    let req = b.body(
        "type='terminate'",
        "<presence xmlns='jabber:client' type='unavailable'><status>bye</status></presence>",
    );
    let r = b.send_raw(&req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.xml().attr("type"), Some("terminate"), "{}", r.body);
    let p = tcp
        .recv_until(|e| is_unavailable_from(e, "web@localhost/browser"))
        .await;
    assert_eq!(
        p.get_child("status", NS_CLIENT)
            .map(|s| s.text())
            .as_deref(),
        Some("bye"),
        "the payloads of the terminate request are processed"
    );
    let req = b.body("", "");
    let r = b.send_raw(&req).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn bosh_inactivity_ends_the_session() {
    let s = TestServer::start_with(|c| {
        c.bosh.inactivity_secs = 1;
        c.bosh.max_wait_secs = 1;
    })
    .await;
    let (mut b, mut tcp) = pair(&s, false, "wait='1' hold='1'").await;
    // The client stops polling.
    let started = Instant::now();
    tcp.recv_until(|e| is_unavailable_from(e, "web@localhost/browser"))
        .await;
    assert!(started.elapsed() < Duration::from_secs(6));
    let req = b.body("", "");
    let r = b.send_raw(&req).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.xml().attr("condition"), Some("item-not-found"));
}

#[tokio::test]
async fn bosh_cors_preflight_and_headers() {
    let s = TestServer::start().await;
    let r = http(
        s.http,
        false,
        "OPTIONS",
        "/http-bind",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type"),
        ],
        "",
    )
    .await;
    assert!((200..300).contains(&r.status), "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("POST")));
    assert!(r
        .header("access-control-allow-headers")
        .is_some_and(|h| h.to_ascii_lowercase().contains("content-type")));
}

#[tokio::test]
async fn host_meta_advertises_websocket_and_bosh() {
    let s = TestServer::start().await;
    let port = s.https.port();
    let ws = format!("wss://localhost:{port}/xmpp-websocket");
    let bosh = format!("https://localhost:{port}/http-bind");

    let r = http(s.https, true, "GET", "/.well-known/host-meta", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/xrd+xml")));
    let xrd = r.xml();
    assert!(xrd.is("XRD", "http://docs.oasis-open.org/ns/xri/xrd-1.0"));
    let links: Vec<(String, String)> = xrd
        .children()
        .filter(|l| l.name() == "Link")
        .map(|l| {
            (
                l.attr("rel").unwrap_or("").to_string(),
                l.attr("href").unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(links.contains(&("urn:xmpp:alt-connections:websocket".into(), ws.clone())));
    assert!(links.contains(&("urn:xmpp:alt-connections:xbosh".into(), bosh.clone())));

    let r = http(s.http, false, "GET", "/.well-known/host-meta.json", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let j: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    let links = j["links"].as_array().expect("links");
    let has = |rel: &str, href: &str| links.iter().any(|l| l["rel"] == rel && l["href"] == href);
    assert!(has("urn:xmpp:alt-connections:websocket", &ws), "{}", r.body);
    assert!(has("urn:xmpp:alt-connections:xbosh", &bosh), "{}", r.body);
}

#[tokio::test]
async fn bosh_inactivity_with_stream_management_lets_the_session_be_resumed() {
    const SM: &str = "urn:xmpp:sm:3";
    let s = TestServer::start_with(|c| {
        c.bosh.inactivity_secs = 1;
        c.bosh.max_wait_secs = 1;
    })
    .await;
    let (mut b, mut tcp) = pair(&s, false, "wait='1' hold='1'").await;
    b.send("", &format!("<enable xmlns='{SM}' resume='true'/>"))
        .await;
    let enabled = b.recv_until("<enabled/>", |e| e.is("enabled", SM)).await;
    let id = enabled.attr("id").expect("resumption id").to_string();
    // The client stops polling: a lost connection, so the session waits to be resumed (still
    // online: no unavailable presence, and messages queue for it).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let gone = b.body("", "");
    assert_eq!(
        b.send_raw(&gone).await.status,
        404,
        "the BOSH session is over"
    );
    tcp.send("<message to='web@localhost/browser' type='chat'><body>while away</body></message>")
        .await;
    assert!(
        tcp.recv_quiet(QUIET)
            .await
            .is_none_or(|e| !is_unavailable_from(&e, "web@localhost/browser")),
        "a hibernating session is still online"
    );

    // A new BOSH session resumes it and gets what it missed.
    let (mut b2, _) = Bosh::create(s.http, false, "wait='1' hold='1'").await;
    b2.authenticate("web", "pw").await;
    b2.send("", &format!("<resume xmlns='{SM}' previd='{id}' h='0'/>"))
        .await;
    let r = b2
        .recv_until("<resumed/>", |e| e.ns() == SM && e.name() != "r")
        .await;
    assert!(r.is("resumed", SM), "{}", xml(&r));
    b2.recv_until("the message sent while away", |e| {
        is_message_with_body(e, "while away")
    })
    .await;
}
