//! XEP-0357 push notifications over real sockets. The app server is a client session
//! (`appsrv@localhost/push`): the server's publishes reach it as iq sets, and it answers them
//! as an app server would.

use std::time::{Duration, Instant};

use minidom::Element;

use super::cli::{login_at, Env};
use super::common::*;

const PUSH: &str = "urn:xmpp:push:0";
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const XDATA: &str = "jabber:x:data";
const APP: &str = "appsrv@localhost/push";
const OPTIONS: &str = "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>eruio234vzxc2kla-91</value></field></x>";

/// A server with short push timings, and alice, bob and the app server's account.
async fn server(tweak: impl FnOnce(&mut halyard::config::Config)) -> TestServer {
    let s = TestServer::start_with(|c| {
        c.push.coalesce_window_ms = 1_500;
        c.push.retry_base_ms = 300;
        c.push.request_timeout_ms = 600;
        tweak(c);
    })
    .await;
    for u in ["alice", "bob", "appsrv"] {
        s.add_user(u, "pw").await;
    }
    s
}

async fn iq(c: &mut RawClient, id: &str, inner: &str) -> Element {
    c.send(&format!("<iq type='set' id='{id}'>{inner}</iq>"))
        .await;
    c.recv_until(|e| e.attr("id") == Some(id)).await
}

/// Bob registers the app server (node `n1`, with a secret), then ends his session.
async fn bob_enables_and_leaves(addr: std::net::SocketAddr) {
    let mut bob = login_at(addr, "bob", "pw", "phone").await;
    let r = iq(
        &mut bob,
        "e1",
        &format!("<enable xmlns='{PUSH}' jid='{APP}' node='n1'>{OPTIONS}</enable>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    leave(bob).await;
}

/// Closes a session and waits until the server has unbound it (it answers the closing tag
/// after unbinding).
async fn leave(mut c: RawClient) {
    c.send("</stream:stream>").await;
    while let Some(ev) = c.next_event().await {
        if matches!(ev, halyard::stream::StreamEvent::Close) {
            break;
        }
    }
}

async fn say(alice: &mut RawClient, body: &str) {
    alice
        .send(&format!(
            "<message to='bob@localhost' type='chat'><body>{body}</body></message>"
        ))
        .await;
}

/// The next publish the app server receives.
async fn next_publish(app: &mut RawClient) -> Element {
    let el = app.recv_until(|e| e.name() == "iq").await;
    assert_eq!(el.attr("type"), Some("set"), "{}", xml(&el));
    el
}

fn publish_of(iq: &Element) -> &Element {
    iq.get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("publish", PUBSUB))
        .unwrap_or_else(|| panic!("a pubsub publish: {}", xml(iq)))
}

fn summary(iq: &Element, var: &str) -> Option<String> {
    publish_of(iq)
        .get_child("item", PUBSUB)?
        .get_child("notification", PUSH)?
        .get_child("x", XDATA)?
        .children()
        .find(|f| f.attr("var") == Some(var))?
        .get_child("value", XDATA)
        .map(|v| v.text())
}

async fn answer(app: &mut RawClient, iq: &Element, inner: &str) {
    let id = iq.attr("id").expect("publish id");
    let typ = if inner.is_empty() { "result" } else { "error" };
    app.send(&format!(
        "<iq type='{typ}' id='{id}' to='bob@localhost'>{inner}</iq>"
    ))
    .await;
}

/// Asserts the app server receives nothing within `wait`.
async fn no_publish(app: &mut RawClient, wait: Duration, what: &str) {
    let got = non_presence_within(app, wait).await;
    assert!(
        got.is_empty(),
        "{what}: expected no publish, got {:?}",
        got.iter().map(xml).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn enable_disable_and_disco() {
    let s = server(|_| {}).await;
    let mut bob = RawClient::login(&s, "bob", "pw", "phone").await;
    bob.send("<iq type='get' id='d1' to='bob@localhost'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>").await;
    let info = bob.recv_until(|e| e.attr("id") == Some("d1")).await;
    let features: Vec<&str> = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .expect("disco#info")
        .children()
        .filter_map(|f| f.attr("var"))
        .collect();
    assert!(features.contains(&PUSH), "{features:?}");

    let r = iq(
        &mut bob,
        "e1",
        &format!("<enable xmlns='{PUSH}' jid='{APP}' node='n1'>{OPTIONS}</enable>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let r = iq(
        &mut bob,
        "e2",
        &format!("<enable xmlns='{PUSH}' jid='{APP}'/>"),
    )
    .await;
    assert_eq!(stanza_error(&r).as_deref(), Some("bad-request"));
    let r = iq(
        &mut bob,
        "e3",
        &format!("<enable xmlns='{PUSH}' jid='{APP}' node='n1'/>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"));
    // Someone else's account.
    bob.send(&format!("<iq type='set' id='e4' to='alice@localhost'><enable xmlns='{PUSH}' jid='{APP}' node='n1'/></iq>")).await;
    let r = bob.recv_until(|e| e.attr("id") == Some("e4")).await;
    assert_eq!(stanza_error(&r).as_deref(), Some("forbidden"));

    // Enabled: with bob gone, a message is published to the app server...
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    leave(bob).await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;
    say(&mut alice, "one").await;
    let p = next_publish(&mut app).await;
    // The second enable replaced the publish options (XEP-0357 §5: the last request wins).
    assert!(
        p.get_child("pubsub", PUBSUB)
            .unwrap()
            .get_child("publish-options", PUBSUB)
            .is_none(),
        "{}",
        xml(&p)
    );
    answer(&mut app, &p, "").await;

    // ...and once disabled, nothing is.
    let mut bob = RawClient::login(&s, "bob", "pw", "phone").await;
    let r = iq(
        &mut bob,
        "x1",
        &format!("<disable xmlns='{PUSH}' jid='{APP}'/>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    leave(bob).await;
    say(&mut alice, "two").await;
    no_publish(&mut app, Duration::from_millis(2_000), "after disable").await;
}

#[tokio::test]
async fn a_burst_for_an_offline_user_is_coalesced() {
    let s = server(|_| {}).await;
    bob_enables_and_leaves(s.c2s).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;

    say(&mut alice, "first, private").await;
    let p1 = next_publish(&mut app).await;
    let t1 = Instant::now();
    assert_eq!(p1.attr("from"), Some("bob@localhost"));
    assert_eq!(p1.attr("to"), Some(APP));
    assert_eq!(publish_of(&p1).attr("node"), Some("n1"));
    assert_eq!(
        summary(&p1, "FORM_TYPE").as_deref(),
        Some("urn:xmpp:push:summary")
    );
    assert_eq!(summary(&p1, "message-count").as_deref(), Some("1"));
    assert_eq!(
        summary(&p1, "last-message-sender").as_deref(),
        Some("alice@localhost")
    );
    assert_eq!(summary(&p1, "last-message-body"), None);
    assert!(!xml(&p1).contains("private"), "no body by default");
    let opts = p1
        .get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("publish-options", PUBSUB))
        .and_then(|o| o.get_child("x", XDATA))
        .expect("publish-options");
    assert!(xml(opts).contains("eruio234vzxc2kla-91"));
    answer(&mut app, &p1, "").await;

    for i in 2..=5 {
        say(&mut alice, &format!("m{i}")).await;
    }
    let p2 = next_publish(&mut app).await;
    assert!(
        t1.elapsed() >= Duration::from_millis(1_300),
        "the second waits for the window: {:?}",
        t1.elapsed()
    );
    assert_eq!(summary(&p2, "message-count").as_deref(), Some("5"));
    answer(&mut app, &p2, "").await;
    no_publish(&mut app, Duration::from_millis(2_500), "after the burst").await;

    // The messages themselves wait in offline storage.
    let mut bob = RawClient::login(&s, "bob", "pw", "phone").await;
    bob.online().await;
    let got = non_presence_within(&mut bob, Duration::from_millis(1_000)).await;
    assert_eq!(got.iter().filter(|e| e.name() == "message").count(), 5);
}

#[tokio::test]
async fn bodies_only_when_the_operator_allows_them() {
    let s = server(|c| c.push.include_body = true).await;
    bob_enables_and_leaves(s.c2s).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;
    say(&mut alice, "Wherefore art thou").await;
    let p = next_publish(&mut app).await;
    assert_eq!(
        summary(&p, "last-message-body").as_deref(),
        Some("Wherefore art thou")
    );
}

#[tokio::test]
async fn nothing_while_the_user_is_online() {
    let s = server(|_| {}).await;
    bob_enables_and_leaves(s.c2s).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;
    let mut bob = RawClient::login(&s, "bob", "pw", "desk").await;
    bob.online().await;
    for i in 0..3 {
        say(&mut alice, &format!("live {i}")).await;
        let m = bob.recv_until(|e| e.name() == "message").await;
        assert_eq!(body(&m).as_deref(), Some(format!("live {i}").as_str()));
    }
    no_publish(&mut app, Duration::from_millis(2_000), "bob is online").await;

    // Once he is gone, the next message is published, counted from his last session.
    leave(bob).await;
    say(&mut alice, "offline").await;
    let p = next_publish(&mut app).await;
    assert_eq!(summary(&p, "message-count").as_deref(), Some("1"));
}

#[tokio::test]
async fn a_permanent_error_disables_the_registration() {
    let s = server(|_| {}).await;
    bob_enables_and_leaves(s.c2s).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;
    say(&mut alice, "one").await;
    let p = next_publish(&mut app).await;
    answer(
        &mut app,
        &p,
        "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
    )
    .await;
    // Past any coalescing window: nothing more is published to a disabled registration.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    say(&mut alice, "two").await;
    say(&mut alice, "three").await;
    no_publish(
        &mut app,
        Duration::from_millis(2_500),
        "after item-not-found",
    )
    .await;
}

#[tokio::test]
async fn timeouts_and_wait_errors_are_retried_with_backoff() {
    let s = server(|_| {}).await;
    bob_enables_and_leaves(s.c2s).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "a").await;
    say(&mut alice, "one").await;

    // First attempt: no answer (the request times out after 600 ms, then 300 ms backoff).
    let p1 = next_publish(&mut app).await;
    let t1 = Instant::now();
    let p2 = next_publish(&mut app).await;
    let d1 = t1.elapsed();
    assert!(
        d1 >= Duration::from_millis(800),
        "timeout + first backoff: {d1:?}"
    );
    assert_ne!(p1.attr("id"), p2.attr("id"), "a new request");
    assert_eq!(summary(&p2, "message-count").as_deref(), Some("1"));
    // Second attempt: a wait-type error (backoff doubles to 600 ms).
    let t2 = Instant::now();
    answer(
        &mut app,
        &p2,
        "<error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
    )
    .await;
    let p3 = next_publish(&mut app).await;
    let d2 = t2.elapsed();
    assert!(d2 >= Duration::from_millis(550), "second backoff: {d2:?}");
    answer(&mut app, &p3, "").await;
    no_publish(&mut app, Duration::from_millis(2_500), "delivered").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_notification_survives_kill_9() {
    let env = Env::with_test_cert().await;
    for u in ["alice", "bob", "appsrv"] {
        env.run(&["user", "add", &format!("{u}@localhost"), "--password", "pw"])
            .ok("add user");
    }
    // A publish in flight holds its row for request_timeout_ms + 1 s.
    let mut cfg = std::fs::read_to_string(env.cfg()).expect("config");
    cfg.push_str("\n[push]\nrequest_timeout_ms = 4000\n");
    std::fs::write(env.cfg(), cfg).expect("config");
    let server = env.serve();
    bob_enables_and_leaves(server.c2s).await;
    let mut app = login_at(server.c2s, "appsrv", "pw", "push").await;
    let mut alice = login_at(server.c2s, "alice", "pw", "a").await;
    say(&mut alice, "queued").await;
    // The app server is slow: it never answers this one.
    let p = next_publish(&mut app).await;
    assert_eq!(summary(&p, "message-count").as_deref(), Some("1"));

    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    drop(server);
    drop(app);
    drop(alice);

    let server = env.serve();
    let mut app = login_at(server.c2s, "appsrv", "pw", "push").await;
    let p = next_publish(&mut app).await;
    assert_eq!(p.attr("from"), Some("bob@localhost"));
    assert_eq!(summary(&p, "message-count").as_deref(), Some("1"));
    answer(&mut app, &p, "").await;
    no_publish(&mut app, Duration::from_millis(1_000), "delivered once").await;
}

/// A phone whose connection dropped (XEP-0198 hibernation) still counts as online, so its
/// messages queue for it, and it is notified; resuming makes it live again.
#[tokio::test]
async fn a_hibernating_session_is_notified() {
    let s = server(|_| {}).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut bob = RawClient::login(&s, "bob", "pw", "phone").await;
    let r = iq(
        &mut bob,
        "e1",
        &format!("<enable xmlns='{PUSH}' jid='{APP}' node='n1'>{OPTIONS}</enable>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"));
    bob.send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
        .await;
    let enabled = bob.recv_until(|e| e.name() == "enabled").await;
    assert!(enabled.attr("id").is_some());
    bob.online().await;
    let mut alice = RawClient::login(&s, "alice", "pw", "desk").await;
    // Live and active: no push.
    say(&mut alice, "while online").await;
    bob.recv_until(|e| e.name() == "message").await;
    no_publish(&mut app, Duration::from_millis(400), "bob is online").await;
    // The connection drops without a close: the session hibernates.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    say(&mut alice, "while away").await;
    let p = next_publish(&mut app).await;
    eprintln!("message to publish (hibernating): {:?}", sent.elapsed());
    assert_eq!(summary(&p, "message-count").as_deref(), Some("1"));
    assert_eq!(
        summary(&p, "last-message-sender").as_deref(),
        Some("alice@localhost")
    );
    answer(&mut app, &p, "").await;
}

/// A phone that said it is inactive and then froze (its socket takes messages but it never
/// acknowledges them) is notified once a message has waited unacknowledged for the configured
/// time; one that acknowledges in time is not.
#[tokio::test]
async fn an_inactive_stream_that_stops_acknowledging_is_notified() {
    let s = server(|c| c.push.inactive_unacked_ms = 700).await;
    let mut app = RawClient::login(&s, "appsrv", "pw", "push").await;
    let mut bob = RawClient::login(&s, "bob", "pw", "phone").await;
    let r = iq(
        &mut bob,
        "e1",
        &format!("<enable xmlns='{PUSH}' jid='{APP}' node='n1'>{OPTIONS}</enable>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"));
    bob.send("<enable xmlns='urn:xmpp:sm:3'/>").await;
    bob.recv_until(|e| e.name() == "enabled").await;
    bob.online().await;
    bob.send("<inactive xmlns='urn:xmpp:csi:0'/>").await;
    let mut alice = RawClient::login(&s, "alice", "pw", "desk").await;

    // Acknowledged in time: no push.
    say(&mut alice, "first").await;
    bob.recv_until(|e| e.name() == "message").await;
    // (Its own presence and the message.)
    bob.send("<a xmlns='urn:xmpp:sm:3' h='2'/>").await;
    bob.send("<iq type='get' id='alive' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let pong = bob.recv_until(|e| e.attr("id") == Some("alive")).await;
    assert_eq!(pong.attr("type"), Some("result"), "the stream is fine");
    bob.send("<a xmlns='urn:xmpp:sm:3' h='3'/>").await;
    no_publish(
        &mut app,
        Duration::from_millis(1200),
        "acknowledged in time",
    )
    .await;

    // Frozen: the message is written but never acknowledged.
    say(&mut alice, "second").await;
    bob.recv_until(|e| e.name() == "message").await;
    let p = next_publish(&mut app).await;
    assert_eq!(summary(&p, "message-count").as_deref(), Some("1"));
    answer(&mut app, &p, "").await;
}
