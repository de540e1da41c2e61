//! Stream negotiation (RFC 6120 §4–7): stream headers and their errors, STARTTLS, what SASL
//! offers where, stream features after authentication (XEP-0478 limits, XEP-0115 caps, roster
//! versioning), resource binding, the closing handshake, keepalives, idle pings, the
//! pre-authentication deadline and graceful shutdown. Direct TLS per XEP-0368.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use halyard::stream::StreamEvent;
use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::*;

const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_SASL_CB: &str = "urn:xmpp:sasl-cb:0";
const NS_LIMITS: &str = "urn:xmpp:stream-limits:0";
const NS_CAPS: &str = "http://jabber.org/protocol/caps";
const NS_ROSTERVER: &str = "urn:xmpp:features:rosterver";
const NS_PING: &str = "urn:xmpp:ping";

/// The `<mechanism/>` names offered in `features`, in order.
fn mechanisms(features: &Element) -> Vec<String> {
    features
        .get_child("mechanisms", NS_SASL)
        .map(|m| {
            m.children()
                .filter(|c| c.is("mechanism", NS_SASL))
                .map(|c| c.text())
                .collect()
        })
        .unwrap_or_default()
}

/// The XEP-0440 channel-binding types offered in `features`.
fn binding_types(features: &Element) -> Vec<String> {
    features
        .get_child("sasl-channel-binding", NS_SASL_CB)
        .map(|b| {
            b.children()
                .filter(|c| c.is("channel-binding", NS_SASL_CB))
                .filter_map(|c| c.attr("type").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the server's stream header: an id, our domain, version 1.0 (RFC 6120 §4.7).
fn assert_header(c: &RawClient) {
    let h = c.header.as_ref().expect("a stream header");
    let id = h.attr("id").unwrap_or("");
    assert!(!id.is_empty(), "stream header has an id: {}", xml(h));
    assert_eq!(h.attr("from"), Some(DOMAIN), "header from: {}", xml(h));
    assert_eq!(h.attr("version"), Some("1.0"), "header version: {}", xml(h));
}

/// Connects over plain TCP, writes `data`, and reads everything until the server closes.
async fn raw_exchange(addr: SocketAddr, data: &str) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(data.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    // A reset after the server's last bytes is fine: what arrived stays in `out`.
    let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut out))
        .await
        .expect("the server closes the connection");
    out
}

/// Parses what a server sent in answer to a bad stream header: it must be a stream header
/// (RFC 6120 §4.9.1.1: sent even when the error is about the client's header), a stream error,
/// and the closing tag. Returns the header and the error condition.
fn header_then_error(bytes: &[u8]) -> (Element, String) {
    let shown = String::from_utf8_lossy(bytes).into_owned();
    let header_at = shown.find("<stream:stream");
    let error_at = shown.find("<stream:error");
    assert!(
        header_at.is_some() && (error_at.is_none() || header_at < error_at),
        "the server must send its stream header before the stream error (RFC 6120 §4.9.1.1), got: {shown}"
    );
    let mut r = reader();
    let mut input = bytes;
    let mut events = Vec::new();
    loop {
        match r.next(&mut input) {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => break,
            Err(e) => panic!("server output does not parse as a stream ({e}): {shown}"),
        }
    }
    let mut it = events.into_iter();
    let header = match it.next() {
        Some(StreamEvent::Open(h)) => h,
        other => panic!("expected the server's stream header first, got {other:?}: {shown}"),
    };
    let cond = it
        .find_map(|ev| match ev {
            StreamEvent::Element(el) if el.is("error", NS_STREAM) => el
                .children()
                .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
                .map(|c| c.name().to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no stream error in: {shown}"));
    assert!(
        shown.trim_end().ends_with("</stream:stream>"),
        "the stream is closed after the error: {shown}"
    );
    (header, cond)
}

/// Reads until the connection ends, failing if a stanza or error arrives on the way.
async fn expect_close_then_eof(c: &mut RawClient) {
    let mut saw_close = false;
    loop {
        match c.next_event().await {
            Some(StreamEvent::Close) => saw_close = true,
            None => break,
            Some(StreamEvent::Element(el)) => {
                panic!("expected the closing tag, got {}", xml(&el))
            }
            Some(StreamEvent::Open(h)) => panic!("unexpected header {}", xml(&h)),
        }
    }
    assert!(saw_close, "the server answers with </stream:stream>");
}

/// A ping to the server and its result, proving the session is alive and in order.
async fn ping_ok(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' to='localhost' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let r = c.recv_until(|e| e.attr("id") == Some(id)).await;
    assert_eq!(r.attr("type"), Some("result"), "ping answer: {}", xml(&r));
}

/// Connects, STARTTLS, PLAIN: an authenticated stream that has received its new features.
async fn authenticated(s: &TestServer, user: &str, password: &str) -> RawClient {
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let mut c = c.starttls().await;
    c.open().await;
    let r = c.auth_plain(user, password).await;
    assert!(r.is("success", NS_SASL), "auth: {}", xml(&r));
    c.open().await;
    c
}

#[tokio::test]
async fn plain_tcp_requires_starttls_and_offers_no_sasl_before_it() {
    let s = TestServer::start().await;
    let mut c = RawClient::connect(s.c2s).await;
    let f = c.open().await;
    assert_header(&c);
    let st = f
        .get_child("starttls", NS_TLS)
        .unwrap_or_else(|| panic!("starttls offered: {}", xml(&f)));
    assert!(
        st.get_child("required", NS_TLS).is_some(),
        "STARTTLS is mandatory: {}",
        xml(&f)
    );
    assert!(
        f.get_child("mechanisms", NS_SASL).is_none(),
        "no SASL mechanisms before TLS: {}",
        xml(&f)
    );
    assert!(
        f.get_child("sasl-channel-binding", NS_SASL_CB).is_none(),
        "{}",
        xml(&f)
    );
}

#[tokio::test]
async fn after_starttls_all_mechanisms_and_channel_binding_types_are_offered() {
    let s = TestServer::start().await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let mut c = c.starttls().await;
    let f = c.open().await;
    assert_header(&c);
    let mechs = mechanisms(&f);
    for m in [
        "SCRAM-SHA-512-PLUS",
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-512",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "PLAIN",
    ] {
        assert!(
            mechs.iter().any(|x| x == m),
            "{m} offered after STARTTLS: {mechs:?}"
        );
    }
    let types = binding_types(&f);
    for t in ["tls-exporter", "tls-server-end-point"] {
        assert!(
            types.iter().any(|x| x == t),
            "{t} advertised (XEP-0440): {}",
            xml(&f)
        );
    }
    assert!(
        f.get_child("starttls", NS_TLS).is_none(),
        "no STARTTLS once TLS is up: {}",
        xml(&f)
    );
}

#[tokio::test]
async fn features_after_auth_have_bind_session_limits_caps_and_rosterver() {
    let s = TestServer::start_with(|cfg| {
        cfg.c2s.max_stanza_bytes = 123_456;
    })
    .await;
    s.add_user("alice", "pw-alice").await;
    let c = authenticated(&s, "alice", "pw-alice").await;
    let f = c.features.clone().expect("features");
    assert_header(&c);
    assert!(f.get_child("bind", NS_BIND).is_some(), "bind: {}", xml(&f));
    let session = f
        .get_child("session", NS_SESSION)
        .unwrap_or_else(|| panic!("session feature: {}", xml(&f)));
    assert!(
        session.get_child("optional", NS_SESSION).is_some(),
        "session is optional: {}",
        xml(&f)
    );
    let max_bytes = f
        .get_child("limits", NS_LIMITS)
        .and_then(|l| l.get_child("max-bytes", NS_LIMITS))
        .map(|m| m.text())
        .unwrap_or_else(|| panic!("XEP-0478 limits: {}", xml(&f)));
    assert_eq!(
        max_bytes.trim(),
        "123456",
        "max-bytes is the configured limit"
    );
    let caps = f
        .get_child("c", NS_CAPS)
        .unwrap_or_else(|| panic!("XEP-0115 caps: {}", xml(&f)));
    assert_eq!(caps.attr("hash"), Some("sha-1"), "{}", xml(caps));
    assert!(
        caps.attr("node").is_some_and(|n| !n.is_empty()),
        "{}",
        xml(caps)
    );
    assert!(
        caps.attr("ver").is_some_and(|v| !v.is_empty()),
        "{}",
        xml(caps)
    );
    // xep/src/roster.rs registers the rosterver feature.
    assert!(
        f.get_child("ver", NS_ROSTERVER).is_some(),
        "roster versioning: {}",
        xml(&f)
    );
    assert!(
        f.get_child("mechanisms", NS_SASL).is_none(),
        "no SASL after authentication: {}",
        xml(&f)
    );
}

#[tokio::test]
async fn without_require_tls_scram_is_offered_on_plain_tcp_but_not_plain_or_plus() {
    let s = TestServer::start_with(|cfg| cfg.c2s.require_tls = false).await;
    let mut c = RawClient::connect(s.c2s).await;
    let f = c.open().await;
    let mechs = mechanisms(&f);
    for m in ["SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1"] {
        assert!(mechs.iter().any(|x| x == m), "{m} offered: {mechs:?}");
    }
    assert!(
        !mechs.iter().any(|m| m == "PLAIN"),
        "PLAIN never in the clear: {mechs:?}"
    );
    assert!(
        !mechs.iter().any(|m| m.ends_with("-PLUS")),
        "no channel binding without TLS: {mechs:?}"
    );
    assert!(binding_types(&f).is_empty(), "{}", xml(&f));
    let st = f
        .get_child("starttls", NS_TLS)
        .unwrap_or_else(|| panic!("STARTTLS still offered: {}", xml(&f)));
    assert!(
        st.get_child("required", NS_TLS).is_none(),
        "STARTTLS is optional here: {}",
        xml(&f)
    );
}

#[tokio::test]
async fn auth_before_starttls_fails_with_encryption_required() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let r = c.auth_plain("alice", "pw-alice").await;
    assert!(r.is("failure", NS_SASL), "{}", xml(&r));
    assert!(
        r.get_child("encryption-required", NS_SASL).is_some(),
        "{}",
        xml(&r)
    );
    // And SCRAM, which needs no TLS by itself, is refused as well.
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>biwsbj1hbGljZSxyPWFiY2RlZmdoaWprbG1ub3A=</auth>").await;
    let r = c.recv().await;
    assert!(
        r.is("failure", NS_SASL) && r.get_child("encryption-required", NS_SASL).is_some(),
        "{}",
        xml(&r)
    );
}

#[tokio::test]
async fn direct_tls_offers_mechanisms_without_starttls() {
    let s = TestServer::start().await;
    let mut c = RawClient::connect_direct_tls(s.c2s_tls).await;
    let f = c.open().await;
    assert_header(&c);
    assert!(
        f.get_child("starttls", NS_TLS).is_none(),
        "no STARTTLS on Direct TLS: {}",
        xml(&f)
    );
    let mechs = mechanisms(&f);
    for m in ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"] {
        assert!(mechs.iter().any(|x| x == m), "{m} offered: {mechs:?}");
    }
    assert!(
        binding_types(&f).iter().any(|t| t == "tls-exporter"),
        "{}",
        xml(&f)
    );
}

#[tokio::test]
async fn unknown_host_gets_a_header_then_host_unknown() {
    let s = TestServer::start().await;
    let out = raw_exchange(s.c2s, &stream_open("other.example")).await;
    let (h, cond) = header_then_error(&out);
    assert_eq!(cond, "host-unknown");
    assert!(h.attr("id").is_some(), "{}", xml(&h));
}

#[tokio::test]
async fn missing_version_is_unsupported_version() {
    let s = TestServer::start().await;
    let out = raw_exchange(
        s.c2s,
        "<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    )
    .await;
    let (_, cond) = header_then_error(&out);
    assert_eq!(cond, "unsupported-version");
}

#[tokio::test]
async fn wrong_stream_namespace_is_invalid_namespace() {
    let s = TestServer::start().await;
    let out = raw_exchange(
        s.c2s,
        "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:client' xmlns:stream='urn:wrong'>",
    )
    .await;
    let (_, cond) = header_then_error(&out);
    assert_eq!(cond, "invalid-namespace");
}

#[tokio::test]
async fn wrong_default_namespace_is_invalid_namespace() {
    let s = TestServer::start().await;
    let out = raw_exchange(
        s.c2s,
        "<?xml version='1.0'?><stream:stream to='localhost' version='1.0' xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>",
    )
    .await;
    let (_, cond) = header_then_error(&out);
    assert_eq!(cond, "invalid-namespace");
}

#[tokio::test]
async fn stanza_before_auth_is_not_authorized() {
    let s = TestServer::start().await;
    s.add_user("bob", "pw-bob").await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let mut c = c.starttls().await;
    c.open().await;
    c.send("<message to='bob@localhost' type='chat'><body>sneaky</body></message>")
        .await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");
    expect_close_then_eof(&mut c).await;
}

#[tokio::test]
async fn unknown_element_after_auth_is_unsupported_stanza_type() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = authenticated(&s, "alice", "pw-alice").await;
    c.send("<foo xmlns='urn:x'/>").await;
    assert_eq!(c.expect_stream_error().await, "unsupported-stanza-type");
}

#[tokio::test]
async fn bind_uses_the_resource_the_client_asks_for() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = authenticated(&s, "alice", "pw-alice").await;
    let jid = c.bind("phone").await;
    assert_eq!(jid, "alice@localhost/phone");
    ping_ok(&mut c, "p1").await;
}

#[tokio::test]
async fn empty_bind_gets_a_generated_resource() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut jids = Vec::new();
    let mut clients = Vec::new();
    for i in 0..2 {
        let mut c = authenticated(&s, "alice", "pw-alice").await;
        let id = format!("b{i}");
        c.send(&format!(
            "<iq type='set' id='{id}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
        ))
        .await;
        let r = c.recv().await;
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
        assert_eq!(r.attr("id"), Some(id.as_str()), "{}", xml(&r));
        let jid = r
            .get_child("bind", NS_BIND)
            .and_then(|b| b.get_child("jid", NS_BIND))
            .map(|j| j.text())
            .unwrap_or_else(|| panic!("bound jid: {}", xml(&r)));
        let resource = jid
            .strip_prefix("alice@localhost/")
            .unwrap_or_else(|| panic!("a full JID of alice: {jid}"));
        assert!(!resource.is_empty(), "{jid}");
        jids.push(jid);
        clients.push(c);
    }
    assert_ne!(jids[0], jids[1], "generated resources are unique");
    for (i, c) in clients.iter_mut().enumerate() {
        ping_ok(c, &format!("p{i}")).await;
    }
}

#[tokio::test]
async fn same_full_jid_replaces_the_old_session_with_conflict() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut first = RawClient::login(&s, "alice", "pw-alice", "desk").await;
    let mut second = RawClient::login(&s, "alice", "pw-alice", "desk").await;
    assert_eq!(first.expect_stream_error().await, "conflict");
    ping_ok(&mut second, "p").await;
}

#[tokio::test]
async fn legacy_session_establishment_gets_a_result() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "old").await;
    c.send("<iq type='set' id='sess1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        .await;
    let r = c.recv_until(|e| e.attr("id") == Some("sess1")).await;
    assert!(r.is("iq", NS_CLIENT), "{}", xml(&r));
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    ping_ok(&mut c, "p").await;
}

#[tokio::test]
async fn closing_handshake_is_answered_and_the_connection_closed() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "r").await;
    c.send("</stream:stream>").await;
    expect_close_then_eof(&mut c).await;
}

#[tokio::test]
async fn whitespace_keepalives_are_accepted() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "r").await;
    c.send(" ").await;
    c.send("\n\t \r\n").await;
    ping_ok(&mut c, "p1").await;
    c.send("  \n").await;
    ping_ok(&mut c, "p2").await;
}

/// Waits for the server's XEP-0199 ping to an idle client; returns its id.
async fn expect_server_ping(c: &mut RawClient, full: &str) -> String {
    let p = c.recv().await;
    assert!(p.is("iq", NS_CLIENT), "a ping iq: {}", xml(&p));
    assert_eq!(p.attr("type"), Some("get"), "{}", xml(&p));
    assert!(p.get_child("ping", NS_PING).is_some(), "{}", xml(&p));
    assert_eq!(p.attr("to"), Some(full), "{}", xml(&p));
    p.attr("id").expect("the ping has an id").to_owned()
}

#[tokio::test]
async fn idle_client_is_pinged_and_closed_when_it_does_not_answer() {
    let s = TestServer::start_with(|cfg| {
        cfg.c2s.idle_timeout_secs = 1;
        cfg.c2s.ping_timeout_secs = 1;
    })
    .await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "r").await;
    let start = Instant::now();
    expect_server_ping(&mut c, "alice@localhost/r").await;
    assert_eq!(c.expect_stream_error().await, "connection-timeout");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed only after the ping timeout: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn idle_client_that_answers_the_ping_stays_connected() {
    let s = TestServer::start_with(|cfg| {
        cfg.c2s.idle_timeout_secs = 1;
        cfg.c2s.ping_timeout_secs = 1;
    })
    .await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "r").await;
    // Answer two pings in a row: more than the idle and ping timeouts together pass.
    for _ in 0..2 {
        let id = expect_server_ping(&mut c, "alice@localhost/r").await;
        c.send(&format!("<iq type='result' id='{id}' to='localhost'/>"))
            .await;
    }
    ping_ok(&mut c, "mine").await;
}

#[tokio::test]
async fn preauth_timeout_closes_with_connection_timeout() {
    let s = TestServer::start_with(|cfg| cfg.c2s.preauth_timeout_secs = 1).await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let start = Instant::now();
    assert_eq!(c.expect_stream_error().await, "connection-timeout");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    expect_close_then_eof(&mut c).await;
}

#[tokio::test]
async fn graceful_shutdown_sends_system_shutdown() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    let mut c = RawClient::login(&s, "alice", "pw-alice", "r").await;
    ping_ok(&mut c, "p").await;
    let start = Instant::now();
    let ((), cond) = tokio::join!(s.stop(), c.expect_stream_error());
    let took = start.elapsed();
    assert_eq!(cond, "system-shutdown");
    assert!(took < Duration::from_millis(2500), "stop took {took:?}");
}
