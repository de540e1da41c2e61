//! Limits and bad input: malformed and restricted XML (RFC 6120 §11.1), oversized and deeply
//! nested stanzas, connection storms, slow readers and spoofed addresses. After each attack the
//! sessions that were already online still chat, and a new login still works.

use std::time::{Duration, Instant};

use halyard::stream::StreamEvent;
use minidom::Element;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::common::*;

async fn add_users(s: &TestServer) {
    for (u, p) in [("alice", "pw-alice"), ("bob", "pw-bob"), ("eve", "pw-eve")] {
        s.add_user(u, p).await;
    }
}

/// Alice and Bob, online, with resources tagged so several pairs can coexist.
struct Pair {
    alice: RawClient,
    bob: RawClient,
    tag: String,
    sent: u32,
}

impl Pair {
    async fn login(s: &TestServer, tag: &str) -> Pair {
        let mut alice = RawClient::login(s, "alice", "pw-alice", &format!("a-{tag}")).await;
        alice.online().await;
        let mut bob = RawClient::login(s, "bob", "pw-bob", &format!("b-{tag}")).await;
        bob.online().await;
        Pair {
            alice,
            bob,
            tag: tag.to_owned(),
            sent: 0,
        }
    }

    fn alice_jid(&self) -> String {
        format!("alice@localhost/a-{}", self.tag)
    }

    fn bob_jid(&self) -> String {
        format!("bob@localhost/b-{}", self.tag)
    }

    /// Alice → Bob chat: delivered, with Alice's full JID stamped as sender. The next message Bob
    /// receives must be this one (presence is skipped).
    async fn check(&mut self) {
        self.sent += 1;
        let id = format!("chk-{}-{}", self.tag, self.sent);
        let body = format!("still here {}", self.sent);
        self.alice
            .send(&format!(
                "<message to='{}' type='chat' id='{id}'><body>{body}</body></message>",
                self.bob_jid()
            ))
            .await;
        let got = self.bob.recv_until(|e| e.name() == "message").await;
        assert_eq!(got.attr("id"), Some(id.as_str()), "{}", xml(&got));
        assert_eq!(
            got.attr("from"),
            Some(self.alice_jid().as_str()),
            "{}",
            xml(&got)
        );
        assert_eq!(
            got.get_child("body", NS_CLIENT).map(|b| b.text()),
            Some(body),
            "{}",
            xml(&got)
        );
    }
}

/// The pair that was online during the attack still chats, and a new login works and chats.
async fn server_still_fine(s: &TestServer, pair: &mut Pair) {
    pair.check().await;
    let mut fresh = Pair::login(s, &format!("{}-new", pair.tag)).await;
    fresh.check().await;
    pair.check().await;
}

/// A stream error, then nothing but the closing tag and the end of the connection.
async fn expect_error_and_close(c: &mut RawClient) -> String {
    let cond = c.expect_stream_error().await;
    loop {
        match c.next_event().await {
            Some(StreamEvent::Close) => continue,
            None => break,
            Some(other) => panic!("nothing but the end after a stream error: {other:?}"),
        }
    }
    cond
}

/// The defined condition of a `<stream:error/>`.
fn stream_condition(el: &Element) -> String {
    el.children()
        .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| panic!("a defined condition in {}", xml(el)))
}

async fn attack_setup(s: &TestServer, tag: &str) -> (Pair, RawClient) {
    add_users(s).await;
    let pair = Pair::login(s, tag).await;
    let eve = RawClient::login(s, "eve", "pw-eve", tag).await;
    (pair, eve)
}

#[tokio::test]
async fn malformed_xml_closes_only_that_stream() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "mal").await;
    eve.send("<message><body>x</mess>").await;
    let cond = expect_error_and_close(&mut eve).await;
    assert!(
        ["not-well-formed", "invalid-xml"].contains(&cond.as_str()),
        "{cond}"
    );
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn oversized_stanza_is_refused_before_it_is_complete() {
    let s = TestServer::start_with(|cfg| cfg.c2s.max_stanza_bytes = 20_000).await;
    let (mut pair, mut eve) = attack_setup(&s, "big").await;
    let head = format!(
        "<message to='{}' type='chat' id='big'><body>",
        pair.bob_jid()
    );
    let mut written = 0usize;
    let mut cond = None;
    if eve.try_send(head.as_bytes()).await {
        written += head.len();
    }
    let chunk = vec![b'a'; 1024];
    for _ in 0..30 {
        if !eve.try_send(&chunk).await {
            break;
        }
        written += chunk.len();
        match tokio::time::timeout(Duration::from_millis(25), eve.next_event()).await {
            Err(_) => continue,
            Ok(Some(StreamEvent::Element(el))) if el.is("error", NS_STREAM) => {
                cond = Some(stream_condition(&el));
                break;
            }
            Ok(other) => panic!("expected a stream error, got {other:?}"),
        }
    }
    let cond = match cond {
        Some(c) => c,
        None => eve.expect_stream_error().await,
    };
    assert_eq!(cond, "policy-violation");
    assert!(
        written < 30 * 1024,
        "refused before the whole 30 KiB stanza was sent (wrote {written} bytes)"
    );
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn entity_expansion_bomb_is_refused_quickly() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "lol").await;
    let mut dtd = String::from("<!DOCTYPE lolz [<!ENTITY lol \"lol\">");
    for i in 1..=9 {
        let prev = if i == 1 {
            "lol".to_string()
        } else {
            format!("lol{}", i - 1)
        };
        dtd.push_str(&format!(
            "<!ENTITY lol{i} \"{}\">",
            format!("&{prev};").repeat(10)
        ));
    }
    dtd.push_str("]>");
    let start = Instant::now();
    eve.send(&format!(
        "{dtd}<message to='{}' type='chat'><body>&lol9;</body></message>",
        pair.bob_jid()
    ))
    .await;
    let cond = expect_error_and_close(&mut eve).await;
    assert!(
        ["restricted-xml", "not-well-formed"].contains(&cond.as_str()),
        "{cond}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn undeclared_entity_reference_is_a_stream_error() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "ent").await;
    eve.send(&format!(
        "<message to='{}' type='chat'><body>&lol;</body></message>",
        pair.bob_jid()
    ))
    .await;
    let cond = expect_error_and_close(&mut eve).await;
    assert!(
        ["restricted-xml", "not-well-formed", "invalid-xml"].contains(&cond.as_str()),
        "{cond}"
    );
    // Bob got nothing from Eve: his next message is the check.
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn processing_instruction_is_restricted_xml() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "pi").await;
    eve.send("<?evil payload?>").await;
    let cond = expect_error_and_close(&mut eve).await;
    assert_eq!(cond, "restricted-xml", "RFC 6120 §11.1");
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn comment_is_restricted_xml() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "cmt").await;
    eve.send(&format!(
        "<message to='{}' type='chat'><body>hi<!-- sneaky --></body></message>",
        pair.bob_jid()
    ))
    .await;
    let cond = expect_error_and_close(&mut eve).await;
    assert_eq!(cond, "restricted-xml", "RFC 6120 §11.1");
    server_still_fine(&s, &mut pair).await;
}

fn nested(depth: usize) -> String {
    let mut s = String::new();
    for _ in 0..depth {
        s.push_str("<x xmlns='urn:test:nest'>");
    }
    for _ in 0..depth {
        s.push_str("</x>");
    }
    s
}

#[tokio::test]
async fn nesting_beyond_max_depth_is_policy_violation() {
    let s = TestServer::start_with(|cfg| cfg.c2s.max_depth = 16).await;
    let (mut pair, mut eve) = attack_setup(&s, "deep").await;
    // Within the limit: delivered.
    eve.send(&format!(
        "<message to='{}' type='chat' id='ok-depth'>{}</message>",
        pair.bob_jid(),
        nested(8)
    ))
    .await;
    let got = pair.bob.recv_until(|e| e.name() == "message").await;
    assert_eq!(got.attr("id"), Some("ok-depth"), "{}", xml(&got));
    // Beyond it: the stream is closed.
    eve.send(&format!(
        "<message to='{}' type='chat' id='too-deep'>{}</message>",
        pair.bob_jid(),
        nested(40)
    ))
    .await;
    assert_eq!(expect_error_and_close(&mut eve).await, "policy-violation");
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn unknown_top_level_element_is_unsupported_stanza_type() {
    let s = TestServer::start().await;
    let (mut pair, mut eve) = attack_setup(&s, "unk").await;
    eve.send("<foo xmlns='urn:x'/>").await;
    assert_eq!(
        expect_error_and_close(&mut eve).await,
        "unsupported-stanza-type"
    );
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn preauth_byte_budget_stops_a_large_element() {
    let s = TestServer::start_with(|cfg| cfg.c2s.preauth_max_bytes = 8192).await;
    add_users(&s).await;
    let mut pair = Pair::login(&s, "pre").await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    // Under max_stanza_bytes, over the pre-authentication budget.
    let big = format!(
        "<iq type='get' id='x'><query xmlns='urn:x'>{}</query></iq>",
        "q".repeat(12 * 1024)
    );
    let _ = c.try_send(big.as_bytes()).await;
    assert_eq!(c.expect_stream_error().await, "policy-violation");
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn preauth_byte_budget_counts_whitespace() {
    let s = TestServer::start_with(|cfg| cfg.c2s.preauth_max_bytes = 8192).await;
    add_users(&s).await;
    let mut pair = Pair::login(&s, "prews").await;
    let mut c = RawClient::connect(s.c2s).await;
    c.open().await;
    let junk = " ".repeat(1024);
    for _ in 0..64 {
        if !c.try_send(junk.as_bytes()).await {
            break;
        }
    }
    assert_eq!(c.expect_stream_error().await, "policy-violation");
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn a_thousand_rapid_connections_do_not_hurt() {
    let s = TestServer::start().await;
    add_users(&s).await;
    let mut pair = Pair::login(&s, "storm").await;
    let header = stream_open(DOMAIN);
    let start = Instant::now();
    for i in 0..1000 {
        let mut tcp = TcpStream::connect(s.c2s)
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let _ = tcp.write_all(header.as_bytes()).await;
        drop(tcp);
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "storm took {took:?}");
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn slow_reader_is_disconnected_without_unbounded_buffering() {
    let s = TestServer::start_with(|cfg| {
        cfg.c2s.outbound_queue = 16;
        cfg.archive.max_page = 8;
        cfg.archive.default_page = 8;
        cfg.c2s.write_timeout_secs = 2;
        // Nothing goes to offline storage: every refused message must come back as an error.
        cfg.offline.quota = 0;
    })
    .await;
    add_users(&s).await;
    s.add_user("slow", "pw-slow").await;
    let mut pair = Pair::login(&s, "sl").await;
    // Slow logs in, goes online, and then never reads again.
    let mut slow = RawClient::login(&s, "slow", "pw-slow", "r").await;
    slow.online().await;

    const TOTAL: usize = 5000;
    const BATCH: usize = 10;
    let body = "z".repeat(2000);
    let mut errors = 0usize;
    let mut other_conditions = Vec::new();
    for b in 0..TOTAL / BATCH {
        let mut out = String::new();
        for i in 0..BATCH {
            out.push_str(&format!(
                "<message to='slow@localhost/r' type='chat' id='m{}'><body>{body}</body></message>",
                b * BATCH + i
            ));
        }
        // A ping after each batch: its answer comes after every error for the batch, and keeps
        // Alice's own queue short, as a client that reads would.
        let ping = format!("ping{b}");
        out.push_str(&format!(
            "<iq type='get' to='localhost' id='{ping}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
        pair.alice.send(&out).await;
        loop {
            let el = pair.alice.recv().await;
            if el.attr("id") == Some(ping.as_str()) {
                assert_eq!(el.attr("type"), Some("result"), "{}", xml(&el));
                break;
            }
            if el.name() == "message" && el.attr("type") == Some("error") {
                match stanza_error(&el).as_deref() {
                    Some("service-unavailable") | Some("resource-constraint") => errors += 1,
                    other => other_conditions.push(format!("{other:?}")),
                }
            }
        }
    }
    assert!(
        other_conditions.is_empty(),
        "unexpected error conditions: {other_conditions:?}"
    );
    assert!(errors >= 1, "Alice learns some messages were not delivered");
    // Alice's session is fine and so is everyone else.
    server_still_fine(&s, &mut pair).await;

    // The slow session was cut off: reading now yields what was in flight, then a stream error
    // or the end of the connection, never all 5000 messages.
    let mut delivered = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match slow.next_event().await {
                Some(StreamEvent::Element(el)) if el.is("error", NS_STREAM) => break,
                Some(StreamEvent::Element(el)) => {
                    if el.name() == "message" {
                        delivered += 1;
                    }
                }
                Some(StreamEvent::Close) | None => break,
                Some(StreamEvent::Open(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow session ends");
    assert!(
        delivered + errors <= TOTAL,
        "delivered {delivered}, errors {errors}"
    );
    eprintln!("slow reader: {delivered} delivered, {errors} errors to Alice");
    assert!(
        delivered < TOTAL,
        "the server did not buffer everything for the slow reader ({delivered} delivered)"
    );
    // The slow session is really gone: a message to it now bounces.
    pair.alice
        .send("<message to='slow@localhost/r' type='chat' id='after'><body>x</body></message>")
        .await;
    let r = pair
        .alice
        .recv_until(|e| e.attr("id") == Some("after"))
        .await;
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(&r));
}

#[tokio::test]
async fn spoofed_from_is_replaced_by_the_senders_full_jid() {
    let s = TestServer::start().await;
    add_users(&s).await;
    let mut pair = Pair::login(&s, "spoof").await;
    pair.alice
        .send(&format!(
            "<message from='bob@localhost/x' to='{}' type='chat' id='spoof'><body>trust me</body></message>",
            pair.bob_jid()
        ))
        .await;
    let got = pair.bob.recv_until(|e| e.name() == "message").await;
    assert_eq!(got.attr("id"), Some("spoof"), "{}", xml(&got));
    assert_eq!(
        got.attr("from"),
        Some(pair.alice_jid().as_str()),
        "{}",
        xml(&got)
    );
    server_still_fine(&s, &mut pair).await;
}

#[tokio::test]
async fn pipelining_sender_that_reads_is_not_taken_for_a_slow_reader() {
    let s = TestServer::start_with(|cfg| {
        cfg.c2s.outbound_queue = 16;
        cfg.archive.max_page = 8;
        cfg.archive.default_page = 8;
        // Eve's messages must bounce, not wait in offline storage.
        cfg.offline.quota = 0;
    })
    .await;
    add_users(&s).await;
    let mut pair = Pair::login(&s, "pipe").await;
    // Eve is offline: every message comes back as service-unavailable. Alice writes 20 at a
    // time and reads whatever has come back before writing again.
    const TOTAL: usize = 5000;
    let mut errors = 0usize;
    fn count(el: &Element, errors: &mut usize) {
        assert!(
            !el.is("error", NS_STREAM),
            "Alice was disconnected after {errors} error replies: {}",
            xml(el)
        );
        if el.name() == "message" && el.attr("type") == Some("error") {
            *errors += 1;
        }
    }
    for b in 0..TOTAL / 20 {
        let out: String = (0..20)
            .map(|i| {
                format!(
                    "<message to='eve@localhost/r' type='chat' id='m{}'><body>x</body></message>",
                    b * 20 + i
                )
            })
            .collect();
        pair.alice.send(&out).await;
        while let Ok(ev) =
            tokio::time::timeout(Duration::from_millis(2), pair.alice.next_event()).await
        {
            match ev {
                Some(StreamEvent::Element(el)) => count(&el, &mut errors),
                other => panic!("Alice's stream ended after {errors} error replies: {other:?}"),
            }
        }
    }
    pair.alice
        .send("<iq type='get' to='localhost' id='end'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    loop {
        let el = pair.alice.recv().await;
        if el.attr("id") == Some("end") {
            break;
        }
        count(&el, &mut errors);
    }
    assert_eq!(errors, TOTAL, "one error reply per message");
    server_still_fine(&s, &mut pair).await;
}
