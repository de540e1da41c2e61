//! Stanza routing and delivery: RFC 6120 §8 (stanza semantics), §10 (server rules for processing
//! XML stanzas) and RFC 6121 §8 (delivery rules for instant messaging).

use minidom::Element;

use super::common::*;

const PW: &str = "pw";

/// A server with `users` registered (password [`PW`]).
async fn server_with(users: &[&str]) -> TestServer {
    let s = TestServer::start().await;
    for u in users {
        s.add_user(u, PW).await;
    }
    s
}

/// A server that stores nothing offline, so the RFC 6121 §8.5.2.2 fallback (an error to the
/// sender) is what a message to an unavailable user gets.
async fn server_without_offline_storage(users: &[&str]) -> TestServer {
    let s = TestServer::start_with(|c| c.offline.quota = 0).await;
    for u in users {
        s.add_user(u, PW).await;
    }
    s
}

/// A bound session of `user` with resource `res`, without presence.
async fn bound(s: &TestServer, user: &str, res: &str) -> RawClient {
    RawClient::login(s, user, PW, res).await
}

/// Waits until every stanza `c` sent before has been processed: the server handles a session's
/// stanzas in order, so once the answer to a ping arrives, everything sent earlier is done.
/// Whatever arrives in between (presence echoes and broadcasts) is discarded.
async fn sync(c: &mut RawClient, tag: &str) {
    let id = format!("sync-{tag}");
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id.as_str()))
        .await;
}

/// Sends available presence (with `priority` if given) and waits until it is processed.
async fn available(c: &mut RawClient, priority: Option<i8>) {
    match priority {
        Some(p) => {
            c.send(&format!("<presence><priority>{p}</priority></presence>"))
                .await
        }
        None => c.send("<presence/>").await,
    }
    sync(c, "available").await;
}

/// A bound and available session.
async fn online(s: &TestServer, user: &str, res: &str, priority: Option<i8>) -> RawClient {
    let mut c = bound(s, user, res).await;
    available(&mut c, priority).await;
    c
}

/// The next message or iq (presence is skipped: other resources coming online broadcast it).
async fn recv_non_presence(c: &mut RawClient) -> Element {
    c.recv_until(|e| e.name() != "presence").await
}

/// Asserts `e` is a `name` error stanza with `condition`, answering `id`.
fn assert_error(e: &Element, name: &str, id: &str, condition: &str) {
    assert_eq!(e.name(), name, "expected a {name} error, got {}", xml(e));
    assert_eq!(e.attr("type"), Some("error"), "not an error: {}", xml(e));
    assert_eq!(
        e.attr("id"),
        Some(id),
        "error answers the stanza: {}",
        xml(e)
    );
    assert_eq!(
        stanza_error(e).as_deref(),
        Some(condition),
        "condition in {}",
        xml(e)
    );
}

/// The reply to the stanza with `id` (skipping presence and anything else).
async fn reply_to(c: &mut RawClient, id: &str) -> Element {
    c.recv_until(|e| e.attr("id") == Some(id)).await
}

#[tokio::test]
async fn message_to_bound_full_jid_goes_to_that_resource_only_with_sender_full_jid() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut bob_a = online(&s, "bob", "a", None).await;
    // A bound resource that never sent presence is still "connected" (RFC 6121 §8.5.3.1).
    let mut bob_b = bound(&s, "bob", "b").await;

    // A spoofed 'from' must be replaced by the session's full JID (RFC 6120 §8.1.2.1).
    alice
        .send("<message to='bob@localhost/b' from='mallory@localhost/x' type='chat' id='m1'><body>to b</body></message>")
        .await;
    let got = recv_non_presence(&mut bob_b).await;
    assert_eq!(got.name(), "message", "{}", xml(&got));
    assert_eq!(
        got.attr("from"),
        Some("alice@localhost/phone"),
        "{}",
        xml(&got)
    );
    assert_eq!(got.attr("id"), Some("m1"));
    assert_eq!(body(&got).as_deref(), Some("to b"));

    alice
        .send("<message to='bob@localhost/a' type='chat' id='m2'><body>to a</body></message>")
        .await;
    let got = recv_non_presence(&mut bob_a).await;
    assert_eq!(got.attr("id"), Some("m2"), "{}", xml(&got));
    assert_eq!(got.attr("from"), Some("alice@localhost/phone"));
    assert_eq!(body(&got).as_deref(), Some("to a"));

    assert_nothing(&mut bob_a, "bob/a after the message to bob/b").await;
    assert_nothing(&mut bob_b, "bob/b after the message to bob/a").await;
    assert_nothing(&mut alice, "alice (no error for a delivered message)").await;
}

#[tokio::test]
async fn chat_to_bare_jid_goes_to_the_highest_priority_resource_only() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut high = online(&s, "bob", "high", Some(5)).await;
    let mut low = online(&s, "bob", "low", Some(1)).await;

    alice
        .send("<message to='bob@localhost' type='chat' id='c1'><body>hi</body></message>")
        .await;
    let got = recv_non_presence(&mut high).await;
    assert_eq!(got.attr("id"), Some("c1"), "{}", xml(&got));
    assert_eq!(got.attr("from"), Some("alice@localhost/phone"));
    assert_eq!(body(&got).as_deref(), Some("hi"));
    assert_nothing(&mut low, "the lower-priority resource").await;
    assert_nothing(&mut alice, "the sender").await;
}

#[tokio::test]
async fn chat_to_bare_jid_goes_to_every_resource_of_equal_top_priority() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut b1 = online(&s, "bob", "one", Some(3)).await;
    let mut b2 = online(&s, "bob", "two", Some(3)).await;
    let mut b3 = online(&s, "bob", "three", Some(2)).await;

    alice
        .send("<message to='bob@localhost' type='chat' id='c2'><body>both</body></message>")
        .await;
    for (name, c) in [("one", &mut b1), ("two", &mut b2)] {
        let got = recv_non_presence(c).await;
        assert_eq!(got.attr("id"), Some("c2"), "bob/{name}: {}", xml(&got));
        assert_eq!(body(&got).as_deref(), Some("both"));
    }
    assert_nothing(&mut b3, "bob/three (lower priority)").await;
    assert_nothing(&mut b1, "bob/one (exactly one copy)").await;
    assert_nothing(&mut b2, "bob/two (exactly one copy)").await;
    assert_nothing(&mut alice, "the sender").await;
}

#[tokio::test]
async fn deliver_to_all_resources_reaches_every_non_negative_resource() {
    let s = TestServer::start_with(|cfg| cfg.c2s.deliver_to_all_resources = true).await;
    s.add_user("alice", PW).await;
    s.add_user("bob", PW).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut high = online(&s, "bob", "high", Some(5)).await;
    let mut low = online(&s, "bob", "low", Some(1)).await;
    let mut zero = online(&s, "bob", "zero", Some(0)).await;
    let mut neg = online(&s, "bob", "neg", Some(-1)).await;

    alice
        .send("<message to='bob@localhost' type='chat' id='c3'><body>all</body></message>")
        .await;
    for (name, c) in [("high", &mut high), ("low", &mut low), ("zero", &mut zero)] {
        let got = recv_non_presence(c).await;
        assert_eq!(got.attr("id"), Some("c3"), "bob/{name}: {}", xml(&got));
        assert_eq!(body(&got).as_deref(), Some("all"));
    }
    assert_nothing(&mut neg, "bob/neg (negative priority)").await;
    assert_nothing(&mut alice, "the sender").await;
}

#[tokio::test]
async fn negative_priority_resources_never_get_bare_jid_messages() {
    let s = server_without_offline_storage(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut neg = online(&s, "bob", "neg", Some(-1)).await;

    // Only a negative-priority resource: as if none were available (RFC 6121 §8.5.2.1.1).
    alice
        .send("<message to='bob@localhost' type='chat' id='n1'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "n1").await;
    assert_error(&e, "message", "n1", "service-unavailable");
    assert_eq!(e.attr("from"), Some("bob@localhost"), "{}", xml(&e));
    assert_eq!(e.attr("to"), Some("alice@localhost/phone"), "{}", xml(&e));
    assert_nothing(&mut neg, "bob/neg (only resource, negative priority)").await;

    // Alongside a priority-0 resource, the negative one still gets nothing.
    let mut zero = online(&s, "bob", "zero", Some(0)).await;
    alice
        .send("<message to='bob@localhost' type='normal' id='n2'><body>y</body></message>")
        .await;
    let got = recv_non_presence(&mut zero).await;
    assert_eq!(got.attr("id"), Some("n2"), "{}", xml(&got));
    assert_nothing(&mut neg, "bob/neg (beside bob/zero)").await;

    // But a message to its full JID is delivered (RFC 6121 §8.5.3.1).
    alice
        .send("<message to='bob@localhost/neg' type='chat' id='n3'><body>z</body></message>")
        .await;
    let got = recv_non_presence(&mut neg).await;
    assert_eq!(got.attr("id"), Some("n3"), "{}", xml(&got));
    assert_nothing(&mut alice, "the sender").await;
}

#[tokio::test]
async fn message_to_gone_resource_falls_back_by_type() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut bob = online(&s, "bob", "here", None).await;

    // chat and normal: as if to the bare JID (RFC 6121 §8.5.3.2.1).
    alice
        .send("<message to='bob@localhost/gone' type='chat' id='g1'><body>chat</body></message>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.attr("id"), Some("g1"), "{}", xml(&got));
    assert_eq!(got.attr("from"), Some("alice@localhost/phone"));
    assert_eq!(body(&got).as_deref(), Some("chat"));

    alice
        .send("<message to='bob@localhost/gone' id='g2'><body>normal</body></message>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.attr("id"), Some("g2"), "{}", xml(&got));

    // groupchat: service-unavailable, not delivered.
    alice
        .send("<message to='bob@localhost/gone' type='groupchat' id='g3'><body>gc</body></message>")
        .await;
    let e = reply_to(&mut alice, "g3").await;
    assert_error(&e, "message", "g3", "service-unavailable");
    assert_eq!(e.attr("from"), Some("bob@localhost/gone"), "{}", xml(&e));

    // error: silently dropped.
    alice
        .send("<message to='bob@localhost/gone' type='error' id='g4'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
        .await;
    assert_nothing(&mut alice, "the sender of an error message").await;
    assert_nothing(&mut bob, "bob (groupchat and error are not delivered)").await;
}

#[tokio::test]
async fn message_to_account_without_available_resource_bounces_except_headline() {
    let s = server_without_offline_storage(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    // Not logged in at all.
    alice
        .send("<message to='bob@localhost' type='chat' id='o1'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "o1").await;
    assert_error(&e, "message", "o1", "service-unavailable");
    assert_eq!(e.attr("from"), Some("bob@localhost"), "{}", xml(&e));

    // Bound, but no presence sent: not available.
    let mut bob = bound(&s, "bob", "quiet").await;
    alice
        .send("<message to='bob@localhost' type='chat' id='o2'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "o2").await;
    assert_error(&e, "message", "o2", "service-unavailable");
    alice
        .send("<message to='bob@localhost' id='o3'><body>normal</body></message>")
        .await;
    let e = reply_to(&mut alice, "o3").await;
    assert_error(&e, "message", "o3", "service-unavailable");
    assert_nothing(&mut bob, "a resource that sent no presence").await;

    // Headline: silently dropped.
    alice
        .send("<message to='bob@localhost' type='headline' id='o4'><body>news</body></message>")
        .await;
    assert_nothing(&mut alice, "the sender of a headline").await;
    assert_nothing(&mut bob, "bob (headline)").await;

    // Was available, then logged out.
    let mut bob2 = online(&s, "bob", "later", None).await;
    bob2.send("</stream:stream>").await;
    while bob2.next_event().await.is_some() {}
    sync(&mut alice, "after-logout").await;
    alice
        .send("<message to='bob@localhost' type='chat' id='o5'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "o5").await;
    assert_error(&e, "message", "o5", "service-unavailable");
    alice
        .send("<message to='bob@localhost' type='headline' id='o6'><body>news</body></message>")
        .await;
    assert_nothing(&mut alice, "the sender of a headline after logout").await;
}

#[tokio::test]
async fn stanzas_to_a_nonexistent_local_account() {
    let s = server_with(&["alice"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    alice
        .send("<message to='nobody@localhost' type='chat' id='x1'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "x1").await;
    assert_error(&e, "message", "x1", "service-unavailable");
    assert_eq!(e.attr("from"), Some("nobody@localhost"), "{}", xml(&e));

    alice
        .send("<message to='nobody@localhost/res' type='chat' id='x2'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "x2").await;
    assert_error(&e, "message", "x2", "service-unavailable");

    alice
        .send(
            "<iq to='nobody@localhost' type='get' id='x3'><query xmlns='jabber:iq:version'/></iq>",
        )
        .await;
    let e = reply_to(&mut alice, "x3").await;
    assert_error(&e, "iq", "x3", "service-unavailable");

    alice
        .send("<iq to='nobody@localhost/res' type='get' id='x4'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = reply_to(&mut alice, "x4").await;
    assert_error(&e, "iq", "x4", "service-unavailable");

    // Presence of any kind is silently ignored (RFC 6121 §8.5.1).
    alice
        .send("<presence to='nobody@localhost' id='x5'/>")
        .await;
    alice
        .send("<presence to='nobody@localhost' type='subscribe' id='x6'/>")
        .await;
    alice
        .send("<presence to='nobody@localhost/res' type='probe' id='x7'/>")
        .await;
    let mut got = Vec::new();
    while let Some(e) = alice.recv_quiet(QUIET).await {
        got.push(xml(&e));
    }
    assert!(
        got.is_empty(),
        "presence to a nonexistent account is ignored: {got:?}"
    );
}

#[tokio::test]
async fn stanzas_to_a_remote_domain_get_remote_server_not_found() {
    let s = server_with(&["alice"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    alice
        .send("<message to='x@example.org' type='chat' id='r1'><body>x</body></message>")
        .await;
    let e = reply_to(&mut alice, "r1").await;
    assert_error(&e, "message", "r1", "remote-server-not-found");
    assert_eq!(e.attr("from"), Some("x@example.org"), "{}", xml(&e));
    assert_eq!(e.attr("to"), Some("alice@localhost/phone"), "{}", xml(&e));

    alice
        .send("<iq to='example.org' type='get' id='r2'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = reply_to(&mut alice, "r2").await;
    assert_error(&e, "iq", "r2", "remote-server-not-found");

    alice
        .send("<message to='x@example.org/r' type='error' id='r3'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")
        .await;
    assert_nothing(&mut alice, "an error to a remote domain").await;
}

#[tokio::test]
async fn invalid_to_gets_jid_malformed() {
    let s = server_with(&["alice"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    for (i, to) in ["@@bad", "a@b@c", "bob@", "@localhost"].iter().enumerate() {
        let id = format!("j{i}");
        alice
            .send(&format!(
                "<message to='{to}' type='chat' id='{id}'><body>x</body></message>"
            ))
            .await;
        let e = reply_to(&mut alice, &id).await;
        assert_error(&e, "message", &id, "jid-malformed");
    }
    alice
        .send("<iq to='a@b@c' type='get' id='j-iq'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = reply_to(&mut alice, "j-iq").await;
    assert_error(&e, "iq", "j-iq", "jid-malformed");
}

#[tokio::test]
async fn iq_validation() {
    let s = server_with(&["alice"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    // RFC 6120 §8.2.3: a get or set has exactly one child.
    alice.send("<iq type='get' id='v1' to='localhost'/>").await;
    let e = reply_to(&mut alice, "v1").await;
    assert_error(&e, "iq", "v1", "bad-request");

    alice
        .send("<iq type='get' id='v2' to='localhost'><ping xmlns='urn:xmpp:ping'/><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let e = reply_to(&mut alice, "v2").await;
    assert_error(&e, "iq", "v2", "bad-request");

    alice
        .send("<iq type='set' id='v2s'><query xmlns='jabber:iq:roster'/><query xmlns='jabber:iq:roster'/></iq>")
        .await;
    let e = reply_to(&mut alice, "v2s").await;
    assert_error(&e, "iq", "v2s", "bad-request");

    // RFC 6120 §8.2.3: type is one of get, set, result, error.
    alice
        .send("<iq type='foo' id='v3' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = reply_to(&mut alice, "v3").await;
    assert_error(&e, "iq", "v3", "bad-request");

    // RFC 6120 §8.4: an unknown namespace gets service-unavailable.
    alice
        .send("<iq type='get' id='v4' to='localhost'><query xmlns='urn:example:unknown'/></iq>")
        .await;
    let e = reply_to(&mut alice, "v4").await;
    assert_error(&e, "iq", "v4", "service-unavailable");
    assert_eq!(e.attr("from"), Some("localhost"), "{}", xml(&e));
    assert_eq!(e.attr("to"), Some("alice@localhost/phone"), "{}", xml(&e));

    alice
        .send("<iq type='set' id='v5'><query xmlns='urn:example:unknown'/></iq>")
        .await;
    let e = reply_to(&mut alice, "v5").await;
    assert_error(&e, "iq", "v5", "service-unavailable");

    // A known namespace still works on the same session (sanity: the errors are specific).
    alice
        .send("<iq type='get' id='v6' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let r = reply_to(&mut alice, "v6").await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

#[tokio::test]
async fn iq_to_a_bound_full_jid_is_delivered_and_its_result_returns() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut bob = bound(&s, "bob", "desk").await;

    alice
        .send("<iq type='get' id='q1' to='bob@localhost/desk'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.name(), "iq", "{}", xml(&got));
    assert_eq!(got.attr("type"), Some("get"));
    assert_eq!(got.attr("id"), Some("q1"));
    assert_eq!(
        got.attr("from"),
        Some("alice@localhost/phone"),
        "{}",
        xml(&got)
    );
    assert!(
        got.get_child("query", "jabber:iq:version").is_some(),
        "payload kept: {}",
        xml(&got)
    );

    bob.send("<iq type='result' id='q1' to='alice@localhost/phone'><query xmlns='jabber:iq:version'><name>BobClient</name><version>1</version></query></iq>")
        .await;
    let r = reply_to(&mut alice, "q1").await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    assert_eq!(r.attr("from"), Some("bob@localhost/desk"), "{}", xml(&r));
    let name = r
        .get_child("query", "jabber:iq:version")
        .and_then(|q| q.get_child("name", "jabber:iq:version"))
        .map(|n| n.text());
    assert_eq!(name.as_deref(), Some("BobClient"), "{}", xml(&r));

    // And an error reply travels back the same way.
    alice
        .send("<iq type='set' id='q2' to='bob@localhost/desk'><query xmlns='urn:example:x'/></iq>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.attr("id"), Some("q2"), "{}", xml(&got));
    bob.send("<iq type='error' id='q2' to='alice@localhost/phone'><error type='cancel'><feature-not-implemented xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
        .await;
    let r = reply_to(&mut alice, "q2").await;
    assert_error(&r, "iq", "q2", "feature-not-implemented");
    assert_eq!(r.attr("from"), Some("bob@localhost/desk"), "{}", xml(&r));
    assert_nothing(&mut bob, "bob (no error bounced back for his error reply)").await;
}

#[tokio::test]
async fn iq_to_an_unbound_full_jid_gets_service_unavailable() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let _bob = online(&s, "bob", "here", None).await;

    alice
        .send("<iq type='get' id='u1' to='bob@localhost/gone'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = reply_to(&mut alice, "u1").await;
    assert_error(&e, "iq", "u1", "service-unavailable");
    assert_eq!(e.attr("from"), Some("bob@localhost/gone"), "{}", xml(&e));

    // Own other resource, not bound.
    alice
        .send(
            "<iq type='get' id='u2' to='alice@localhost/tablet'><ping xmlns='urn:xmpp:ping'/></iq>",
        )
        .await;
    let e = reply_to(&mut alice, "u2").await;
    assert_error(&e, "iq", "u2", "service-unavailable");
}

#[tokio::test]
async fn an_error_iq_is_never_answered_with_an_error() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let err = "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
    for (i, to) in [
        "localhost",
        "bob@localhost",
        "bob@localhost/gone",
        "nobody@localhost",
        "x@example.org",
        "a@b@c",
    ]
    .iter()
    .enumerate()
    {
        alice
            .send(&format!("<iq type='error' id='e{i}' to='{to}'>{err}</iq>"))
            .await;
    }
    // Nor a result nobody asked for.
    alice
        .send("<iq type='result' id='e-r' to='localhost'/>")
        .await;
    alice
        .send("<iq type='result' id='e-r2' to='bob@localhost/gone'/>")
        .await;
    // Replies to one session are queued in order: if any of the above were answered, the answer
    // would arrive before the ping's result.
    alice
        .send("<iq type='get' id='after' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let first = alice.recv().await;
    assert_eq!(
        first.attr("id"),
        Some("after"),
        "errors and results are never answered, yet got: {}",
        xml(&first)
    );
    assert_eq!(first.attr("type"), Some("result"));
    let mut got = Vec::new();
    while let Some(e) = alice.recv_quiet(QUIET).await {
        got.push(xml(&e));
    }
    assert!(
        got.is_empty(),
        "errors and results are never answered: {got:?}"
    );
}

#[tokio::test]
async fn stanzas_from_one_session_arrive_in_order() {
    const N: usize = 200;
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut bob = online(&s, "bob", "desk", None).await;

    for i in 0..N {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='seq{i}'><body>{i}</body></message>"
            ))
            .await;
    }
    for i in 0..N {
        let got = recv_non_presence(&mut bob).await;
        assert_eq!(got.name(), "message", "{}", xml(&got));
        assert_eq!(
            body(&got),
            Some(i.to_string()),
            "message {i} in order: {}",
            xml(&got)
        );
        assert_eq!(got.attr("id"), Some(format!("seq{i}").as_str()));
    }
    assert_nothing(&mut bob, "bob (no duplicates)").await;
    assert_nothing(&mut alice, "alice (no errors)").await;
}

#[tokio::test]
async fn message_without_to_goes_to_own_bare_jid() {
    let s = server_with(&["alice"]).await;
    let mut a1 = online(&s, "alice", "one", None).await;
    let mut a2 = online(&s, "alice", "two", None).await;
    let mut a3 = bound(&s, "alice", "silent").await;

    a1.send("<message type='chat' id='self1'><body>note to self</body></message>")
        .await;
    for (name, c) in [("one", &mut a1), ("two", &mut a2)] {
        let got = recv_non_presence(c).await;
        assert_eq!(got.name(), "message", "alice/{name}: {}", xml(&got));
        assert_eq!(got.attr("id"), Some("self1"), "alice/{name}: {}", xml(&got));
        assert_eq!(
            got.attr("from"),
            Some("alice@localhost/one"),
            "{}",
            xml(&got)
        );
        assert_eq!(body(&got).as_deref(), Some("note to self"));
    }
    assert_nothing(&mut a3, "a resource without presence").await;
    assert_nothing(&mut a1, "alice/one (one copy, no error)").await;
}

#[tokio::test]
async fn headline_and_groupchat_to_a_bare_jid() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut high = online(&s, "bob", "high", Some(5)).await;
    let mut low = online(&s, "bob", "low", Some(0)).await;
    let mut neg = online(&s, "bob", "neg", Some(-5)).await;

    // headline: every available resource with non-negative priority (RFC 6121 §8.5.2.1.1).
    alice
        .send("<message to='bob@localhost' type='headline' id='h1'><body>news</body></message>")
        .await;
    for (name, c) in [("high", &mut high), ("low", &mut low)] {
        let got = recv_non_presence(c).await;
        assert_eq!(got.attr("id"), Some("h1"), "bob/{name}: {}", xml(&got));
    }
    assert_nothing(&mut neg, "bob/neg (headline, negative priority)").await;

    // groupchat to a bare JID: an error, delivered nowhere.
    alice
        .send("<message to='bob@localhost' type='groupchat' id='h2'><body>gc</body></message>")
        .await;
    let e = reply_to(&mut alice, "h2").await;
    assert_error(&e, "message", "h2", "service-unavailable");
    assert_nothing(&mut high, "bob/high (groupchat)").await;
    assert_nothing(&mut low, "bob/low").await;
}

#[tokio::test]
async fn addresses_are_normalised_before_routing() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;
    let mut bob = online(&s, "bob", "Desk", None).await;

    // RFC 7622: localpart and domainpart compare case-insensitively; the resource does not.
    alice
        .send("<message to='BOB@LocalHost/Desk' type='chat' id='cs1'><body>caps</body></message>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.attr("id"), Some("cs1"), "{}", xml(&got));
    assert_eq!(got.attr("from"), Some("alice@localhost/phone"));

    alice
        .send("<message to='Bob@LOCALHOST' type='chat' id='cs2'><body>caps bare</body></message>")
        .await;
    let got = recv_non_presence(&mut bob).await;
    assert_eq!(got.attr("id"), Some("cs2"), "{}", xml(&got));

    alice
        .send("<iq to='LOCALHOST' type='get' id='cs3'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let r = reply_to(&mut alice, "cs3").await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    assert_nothing(&mut alice, "alice (no errors)").await;
}

#[tokio::test]
async fn iq_without_id_and_unknown_iq_to_an_account() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = bound(&s, "alice", "phone").await;

    // RFC 6120 §8.1.3: an iq needs an id.
    alice
        .send("<iq type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let e = alice.recv().await;
    assert_eq!(e.name(), "iq", "{}", xml(&e));
    assert_eq!(e.attr("type"), Some("error"), "{}", xml(&e));
    assert_eq!(
        stanza_error(&e).as_deref(),
        Some("bad-request"),
        "{}",
        xml(&e)
    );

    // An iq to another account's bare JID is handled by the server on the account's behalf
    // (RFC 6121 §8.5.2): an unknown namespace gets service-unavailable.
    alice
        .send(
            "<iq type='get' id='ua1' to='bob@localhost'><query xmlns='urn:example:unknown'/></iq>",
        )
        .await;
    let e = reply_to(&mut alice, "ua1").await;
    assert_error(&e, "iq", "ua1", "service-unavailable");
    assert_eq!(e.attr("from"), Some("bob@localhost"), "{}", xml(&e));
}
