//! Abuse limits (`[limits]`, `auth`, `archive`, `roster`): connections per address and in
//! total, new connections per second, read rates in bytes and stanzas, login guessing per
//! account, archive queries per minute, roster size. Each test sets a limit low, goes over it,
//! and checks the error names the limit, and that everyone else is unaffected.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use halyard::stream::StreamEvent;
use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

async fn users(s: &TestServer) {
    for (u, p) in [("alice", "pw-alice"), ("bob", "pw-bob"), ("eve", "pw-eve")] {
        s.add_user(u, p).await;
    }
}

/// STARTTLS, PLAIN, bind from source address `src`.
async fn login_from(s: &TestServer, src: IpAddr, user: &str, pw: &str, res: &str) -> RawClient {
    let mut c = RawClient::connect_from(s.c2s, src).await;
    c.open().await;
    let mut c = c.starttls().await;
    c.open().await;
    let r = c.auth_plain(user, pw).await;
    assert!(r.is("success", NS_SASL), "auth failed: {}", xml(&r));
    c.open().await;
    c.bind(res).await;
    c
}

/// An iq ping to the server, answered.
async fn ping(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let r = c
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

fn error_text(el: &Element) -> String {
    el.get_child("error", NS_CLIENT)
        .and_then(|e| e.get_child("text", NS_STANZAS))
        .map(|t| t.text())
        .unwrap_or_default()
}

#[tokio::test]
async fn connections_per_ip_refuse_with_policy_violation_and_spare_other_addresses() {
    let s = TestServer::start_with(|c| c.limits.connections_per_ip = 3).await;
    users(&s).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect_from(s.c2s, ip(5)).await;
        c.open().await;
        held.push(c);
    }
    let mut alice = login_from(&s, ip(5), "alice", "pw-alice", "a").await;
    let mut over = RawClient::connect_from(s.c2s, ip(5)).await;
    let (cond, text) = over.open_refused().await;
    assert_eq!(cond, "policy-violation");
    assert!(text.contains("limits.connections_per_ip"), "{text}");
    // Direct TLS counts under the same address.
    let mut over_tls = RawClient::connect_direct_tls_from(s.c2s_tls, ip(5)).await;
    let (cond, _) = over_tls.open_refused().await;
    assert_eq!(cond, "policy-violation");
    // HTTP too: the connection is closed without a word.
    let http = tokio::net::TcpSocket::new_v4().expect("socket");
    http.bind(std::net::SocketAddr::new(ip(5), 0))
        .expect("bind");
    let mut http = http.connect(s.http).await.expect("connect");
    let _ = http
        .write_all(b"GET /.well-known/host-meta HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(TIMEOUT, http.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer over the limit");

    // The session that holds a slot still works; another address is not affected.
    ping(&mut alice, "still").await;
    let mut bob = login_from(&s, ip(6), "bob", "pw-bob", "b").await;
    ping(&mut bob, "other").await;
    // A freed slot can be taken again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = login_from(&s, ip(5), "eve", "pw-eve", "e").await;
    ping(&mut again, "again").await;
}

#[tokio::test]
async fn max_connections_refuse_with_resource_constraint() {
    let s = TestServer::start_with(|c| c.limits.max_connections = 2).await;
    users(&s).await;
    let mut alice = login_from(&s, ip(7), "alice", "pw-alice", "a").await;
    let mut other = RawClient::connect_from(s.c2s, ip(8)).await;
    other.open().await;
    let mut over = RawClient::connect_from(s.c2s, ip(9)).await;
    let (cond, text) = over.open_refused().await;
    assert_eq!(cond, "resource-constraint");
    assert!(text.contains("limits.max_connections"), "{text}");
    ping(&mut alice, "p").await;
    drop(other);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut bob = login_from(&s, ip(9), "bob", "pw-bob", "b").await;
    ping(&mut bob, "p").await;
}

#[tokio::test]
async fn new_connections_per_second_refuse_after_the_burst() {
    let s = TestServer::start_with(|c| {
        c.limits.new_connections_per_ip_per_sec = 1;
        c.limits.new_connections_burst = 3;
    })
    .await;
    users(&s).await;
    for _ in 0..3 {
        let mut c = RawClient::connect_from(s.c2s, ip(10)).await;
        c.open().await;
    }
    let mut over = RawClient::connect_from(s.c2s, ip(10)).await;
    let (cond, text) = over.open_refused().await;
    assert_eq!(cond, "policy-violation");
    assert!(text.contains("new_connections_per_ip_per_sec"), "{text}");
    // Other addresses connect as usual...
    let mut bob = login_from(&s, ip(11), "bob", "pw-bob", "b").await;
    ping(&mut bob, "p").await;
    // ...and the address gets a connection again once the bucket refills.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut alice = login_from(&s, ip(10), "alice", "pw-alice", "a").await;
    ping(&mut alice, "p").await;
}

/// The defaults allow what a load test from one address does: many quick connections.
#[tokio::test]
async fn defaults_allow_a_burst_of_connections_from_one_address() {
    let s = TestServer::start().await;
    users(&s).await;
    for i in 0..300 {
        let mut c = RawClient::connect_from(s.c2s, ip(12)).await;
        let f = c.open().await;
        assert!(f.is("features", NS_STREAM), "connection {i}");
    }
    let mut alice = login_from(&s, ip(12), "alice", "pw-alice", "a").await;
    ping(&mut alice, "p").await;
}

/// A sender over `read_bytes_per_sec` is read more slowly, not cut off: every message arrives,
/// in order, later than the link allows; other sessions are served meanwhile.
#[tokio::test]
async fn read_rate_slows_a_fast_sender_without_losing_anything() {
    let s = TestServer::start_with(|c| {
        c.c2s.max_stanza_bytes = 10_000;
        c.limits.read_bytes_per_sec = 20_000;
        c.limits.read_burst_bytes = 10_000;
    })
    .await;
    users(&s).await;
    let mut alice = login_from(&s, ip(13), "alice", "pw-alice", "a").await;
    let mut bob = login_from(&s, ip(14), "bob", "pw-bob", "b").await;
    let filler = "x".repeat(5000);
    let start = Instant::now();
    let mut all = String::new();
    for i in 0..10 {
        all.push_str(&format!(
            "<message to='bob@localhost/b' type='chat' id='m{i}'><body>{i} {filler}</body></message>"
        ));
    }
    // ~50 KB: 10 KB of burst, then 20 KB/s: about two seconds.
    alice.send(&all).await;
    let mut got = Vec::new();
    let mut pong_before = None;
    while got.len() < 10 {
        let m = bob
            .recv_until(|e| e.name() == "message" || e.attr("id") == Some("mid"))
            .await;
        if m.name() == "iq" {
            pong_before = Some(got.len());
            continue;
        }
        got.push(m.attr("id").unwrap_or_default().to_string());
        if got.len() == 3 {
            bob.send("<iq type='get' id='mid' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
                .await;
        }
    }
    let took = start.elapsed();
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message, once, in order");
    assert!(
        took >= Duration::from_millis(1500),
        "50 KB at 20 KB/s after a 10 KB burst took only {took:?}"
    );
    assert!(
        pong_before.is_some_and(|n| n < 10),
        "bob was answered while alice was being held back"
    );
    ping(&mut alice, "after").await;
}

#[tokio::test]
async fn stanza_rate_slows_a_flood_without_losing_anything() {
    let s = TestServer::start_with(|c| {
        c.limits.stanzas_per_sec = 20;
        c.limits.stanza_burst = 10;
    })
    .await;
    users(&s).await;
    let mut alice = login_from(&s, ip(15), "alice", "pw-alice", "a").await;
    let start = Instant::now();
    let mut all = String::new();
    for i in 0..50 {
        all.push_str(&format!(
            "<iq type='get' id='f{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
    }
    alice.send(&all).await;
    for i in 0..50 {
        let r = alice.recv_until(|e| e.name() == "iq").await;
        assert_eq!(r.attr("id"), Some(format!("f{i}").as_str()));
        assert_eq!(r.attr("type"), Some("result"));
    }
    let took = start.elapsed();
    // 10 at once, then 20 a second: about two seconds.
    assert!(
        took >= Duration::from_millis(1500),
        "50 stanzas at 20/s after a burst of 10 took only {took:?}"
    );
}

/// Times one failed PLAIN login from `src`.
async fn failed_login(s: &TestServer, src: IpAddr, user: &str) -> Duration {
    let mut c = RawClient::connect_from(s.c2s, src).await;
    c.open().await;
    let mut c = c.starttls().await;
    c.open().await;
    let start = Instant::now();
    let r = c.auth_plain(user, "wrong guess").await;
    let took = start.elapsed();
    assert!(r.is("failure", NS_SASL), "{}", xml(&r));
    assert!(
        r.get_child("not-authorized", NS_SASL).is_some(),
        "{}",
        xml(&r)
    );
    took
}

/// Guessing one account's password from many addresses is slowed per account (the per-address
/// window is off here, so only the account's can explain the delay); another account and the
/// right password are unaffected (no lockout).
#[tokio::test]
async fn failed_logins_for_one_account_are_answered_later_and_later() {
    let s = TestServer::start_with(|c| {
        c.auth.failures_per_minute_per_ip = 0;
        c.auth.failures_per_hour_per_account = 2;
        c.auth.max_failures_per_connection = 10;
    })
    .await;
    users(&s).await;
    let mut times = Vec::new();
    for i in 0..5 {
        times.push(failed_login(&s, ip(20 + i), "alice").await);
    }
    // Failures 3, 4, 5 wait 200, 400, 800 ms.
    assert!(
        times[4] >= Duration::from_millis(700) && times[4] > times[0] + Duration::from_millis(500),
        "{times:?}"
    );
    assert!(times[3] >= Duration::from_millis(350), "{times:?}");
    let bob = failed_login(&s, ip(30), "bob").await;
    assert!(
        bob + Duration::from_millis(500) < times[4],
        "bob {bob:?} vs {times:?}"
    );
    let mut alice = login_from(&s, ip(31), "alice", "pw-alice", "a").await;
    ping(&mut alice, "p").await;
}

#[tokio::test]
async fn archive_queries_per_minute_get_resource_constraint() {
    let s = TestServer::start_with(|c| c.archive.max_queries_per_minute = 2).await;
    users(&s).await;
    let mut alice = login_from(&s, ip(40), "alice", "pw-alice", "a").await;
    let query = |id: &str| {
        format!("<iq type='set' id='{id}'><query xmlns='urn:xmpp:mam:2' queryid='{id}'/></iq>")
    };
    for id in ["q1", "q2"] {
        alice.send(&query(id)).await;
        let r = alice
            .recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
            .await;
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    }
    alice.send(&query("q3")).await;
    let r = alice
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some("q3"))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("resource-constraint"));
    assert!(
        error_text(&r).contains("archive.max_queries_per_minute"),
        "{}",
        xml(&r)
    );
    // Bob has his own budget.
    let mut bob = login_from(&s, ip(41), "bob", "pw-bob", "b").await;
    bob.send(&query("b1")).await;
    let r = bob
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some("b1"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

#[tokio::test]
async fn a_full_roster_refuses_another_contact_with_not_allowed() {
    let s = TestServer::start_with(|c| c.roster.max_items = 1).await;
    users(&s).await;
    let mut alice = login_from(&s, ip(42), "alice", "pw-alice", "a").await;
    let set = |id: &str, jid: &str| {
        format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:roster'><item jid='{jid}'/></query></iq>")
    };
    alice.send(&set("r1", "bob@localhost")).await;
    let r = alice
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some("r1"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    alice.send(&set("r2", "eve@localhost")).await;
    let r = alice
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some("r2"))
        .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("not-allowed"));
    assert!(error_text(&r).contains("roster.max_items"), "{}", xml(&r));
    alice
        .send("<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let r = alice
        .recv_until(|e| e.name() == "iq" && e.attr("id") == Some("g"))
        .await;
    let q = r.get_child("query", "jabber:iq:roster").expect("roster");
    assert_eq!(q.children().count(), 1, "{}", xml(&r));
}

/// Too many attributes on one element, or one too long, closes that stream only.
#[tokio::test]
async fn attribute_count_and_length_are_policy_violation() {
    let s = TestServer::start().await;
    users(&s).await;
    let mut bob = login_from(&s, ip(43), "bob", "pw-bob", "b").await;
    let many: String = (0..65).map(|i| format!(" a{i}='v'")).collect();
    let long = "v".repeat(5000);
    for (stanza, limit) in [
        (
            format!("<message to='bob@localhost'{many}><body>x</body></message>"),
            "c2s.max_attributes",
        ),
        (
            format!("<message to='bob@localhost' id='{long}'><body>x</body></message>"),
            "c2s.max_attribute_bytes",
        ),
    ] {
        let mut eve = login_from(&s, ip(44), "eve", "pw-eve", "e").await;
        let _ = eve.try_send(stanza.as_bytes()).await;
        let (cond, text) = loop {
            match eve.next_event().await {
                Some(StreamEvent::Element(el)) if el.is("error", NS_STREAM) => {
                    let cond = el
                        .children()
                        .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
                        .map(|c| c.name().to_string())
                        .unwrap_or_default();
                    let text = el
                        .get_child("text", NS_STREAMS)
                        .map(|t| t.text())
                        .unwrap_or_default();
                    break (cond, text);
                }
                Some(StreamEvent::Element(_)) => continue,
                other => panic!("expected a stream error, got {other:?}"),
            }
        };
        assert_eq!(cond, "policy-violation");
        assert!(text.contains(limit), "{text}");
        ping(&mut bob, "still").await;
    }
    assert_nothing(&mut bob, "no part of the refused stanzas").await;
}

/// Reads until the server closes; how long that took.
async fn closed_after(mut tcp: tokio::net::TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(TIMEOUT, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept a stalled connection open"),
        }
    }
}

/// A peer that stops mid-TLS-handshake (Direct TLS, HTTPS, after STARTTLS's proceed) is cut off
/// at the pre-authentication timeout, and its place under the connection limits is given back.
#[tokio::test]
async fn stalled_tls_handshakes_are_timed_out_and_their_slots_freed() {
    let s = TestServer::start_with(|c| {
        c.c2s.preauth_timeout_secs = 2;
        c.limits.connections_per_ip = 3;
    })
    .await;
    users(&s).await;
    let connect = |addr| async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(std::net::SocketAddr::new(ip(50), 0))
            .expect("bind");
        sock.connect(addr).await.expect("connect")
    };
    // The start of a ClientHello record, and then nothing.
    let partial: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    let mut direct = connect(s.c2s_tls).await;
    direct.write_all(partial).await.expect("write");
    let mut https = connect(s.https).await;
    https.write_all(partial).await.expect("write");
    let mut starttls = connect(s.c2s).await;
    starttls
        .write_all(stream_open(DOMAIN).as_bytes())
        .await
        .expect("write");
    starttls
        .write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .expect("write");
    // Only after <proceed/>: bytes pipelined after <starttls/> are refused at once.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("<proceed") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(TIMEOUT, starttls.read(&mut buf))
            .await
            .expect("proceed in time")
            .expect("read");
        assert!(n > 0, "closed before <proceed/>");
        seen.extend_from_slice(&buf[..n]);
    }
    starttls.write_all(partial).await.expect("write");

    // All three hold the address's slots.
    let mut over = RawClient::connect_from(s.c2s, ip(50)).await;
    let (cond, _) = over.open_refused().await;
    assert_eq!(cond, "policy-violation");

    let (a, b, c) = tokio::join!(
        closed_after(direct),
        closed_after(https),
        closed_after(starttls)
    );
    for (what, took) in [("direct TLS", a), ("HTTPS", b), ("STARTTLS", c)] {
        assert!(
            took >= Duration::from_millis(1500),
            "{what} closed before the timeout: {took:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut alice = login_from(&s, ip(50), "alice", "pw-alice", "a").await;
    ping(&mut alice, "p").await;
}
