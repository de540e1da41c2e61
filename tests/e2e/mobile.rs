//! Mobile delivery over real sockets: XEP-0198 stream management (acks, counters, resumption on
//! another transport, hibernation, rerouting when a session ends) and XEP-0352 client state
//! (held-back presence and chat states, released by a message with a body or by `<active/>`).

use std::time::Duration;

use halyard::config::Config;
use minidom::Element;

use super::cli::{login_at, Env};
use super::common::*;

const PW: &str = "pw";
const SM: &str = "urn:xmpp:sm:3";
const CSI: &str = "urn:xmpp:csi:0";

async fn server_cfg(users: &[&str], tweak: impl FnOnce(&mut Config)) -> TestServer {
    let s = TestServer::start_with(tweak).await;
    for u in users {
        s.add_user(u, PW).await;
    }
    s
}

/// Authenticated over `transport` ("starttls" or "tls"), stream restarted, not bound.
async fn authed(s: &TestServer, user: &str, transport: &str) -> RawClient {
    let mut c = match transport {
        "tls" => RawClient::connect_direct_tls(s.c2s_tls).await,
        _ => {
            let mut c = RawClient::connect(s.c2s).await;
            c.open().await;
            c.starttls().await
        }
    };
    c.open().await;
    let r = c.auth_plain(user, PW).await;
    assert!(r.is("success", NS_SASL), "auth: {}", xml(&r));
    c.open().await;
    c
}

/// Bound and with stream management enabled (with resumption when `resume`); returns the
/// `<enabled/>`.
async fn sm_session(s: &TestServer, user: &str, res: &str, resume: bool) -> (RawClient, Element) {
    let mut c = authed(s, user, "starttls").await;
    let f = c.features.clone().expect("features");
    assert!(
        f.get_child("sm", SM).is_some(),
        "sm advertised: {}",
        xml(&f)
    );
    c.bind(res).await;
    c.send(&format!("<enable xmlns='{SM}' resume='{resume}'/>"))
        .await;
    let e = c.recv().await;
    assert!(e.is("enabled", SM), "expected enabled: {}", xml(&e));
    (c, e)
}

/// The next `n` messages, skipping ack requests (answering none) and presence.
async fn messages(c: &mut RawClient, n: usize) -> Vec<Element> {
    let mut got = Vec::new();
    while got.len() < n {
        let e = c.recv().await;
        if e.name() == "message" {
            got.push(e);
        } else {
            assert!(
                e.is("r", SM) || e.name() == "presence",
                "unexpected {}",
                xml(&e)
            );
        }
    }
    got
}

fn bodies(ms: &[Element]) -> Vec<String> {
    ms.iter().map(|m| body(m).unwrap_or_default()).collect()
}

async fn say(c: &mut RawClient, to: &str, text: &str) {
    c.send(&format!(
        "<message to='{to}' type='chat'><body>{text}</body></message>"
    ))
    .await;
}

/// Round trip on `c`'s stream: everything sent before has been routed.
async fn sync(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    c.recv_until(|e| e.attr("id") == Some(id)).await;
}

#[tokio::test]
async fn enable_acks_both_ways_and_counts() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, enabled) = sm_session(&s, "a", "phone", true).await;
    assert!(enabled.attr("id").is_some_and(|i| i.len() >= 16));
    assert_eq!(enabled.attr("resume"), Some("true"));
    assert_eq!(enabled.attr("max"), Some("300"));

    // Enabling twice is refused.
    a.send(&format!("<enable xmlns='{SM}'/>")).await;
    let f = a.recv().await;
    assert!(f.is("failed", SM) && f.get_child("unexpected-request", NS_STANZAS).is_some());

    // The server counts what it handled: three pings (answered), then <r/>; it asks for an ack
    // of what it sent.
    for i in 0..3 {
        a.send(&format!(
            "<iq type='get' id='p{i}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await;
    }
    a.send(&format!("<r xmlns='{SM}'/>")).await;
    let (mut results, mut saw_r) = (0, false);
    let ack = loop {
        let e = a.recv().await;
        match e.name() {
            "iq" => results += 1,
            "r" => saw_r = true,
            "a" => break e,
            other => panic!("unexpected <{other}/>"),
        }
    };
    assert_eq!(ack.attr("h"), Some("3"));
    assert_eq!(results, 3);
    assert!(saw_r, "the server requests an ack after writing");

    // What the server sends is counted too.
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    for i in 0..2 {
        say(&mut b, "a@localhost/phone", &format!("m{i}")).await;
    }
    assert_eq!(bodies(&messages(&mut a, 2).await), ["m0", "m1"]);
    // 3 ping results + 2 messages.
    a.send(&format!("<a xmlns='{SM}' h='5'/>")).await;
    sync(&mut a, "s1").await;
    // Acknowledging more than was sent ends the stream with handled-count-too-high.
    a.send(&format!("<a xmlns='{SM}' h='9'/>")).await;
    loop {
        let e = a.recv().await;
        if e.is("error", NS_STREAM) {
            assert!(e.get_child("undefined-condition", NS_STREAMS).is_some());
            let t = e
                .get_child("handled-count-too-high", SM)
                .expect("handled-count-too-high");
            assert_eq!(t.attr("h"), Some("9"));
            assert_eq!(t.attr("send-count"), Some("6"), "5 + the sync result");
            break;
        }
    }
}

#[tokio::test]
async fn enable_before_binding_is_refused() {
    let s = server_cfg(&["a"], |_| {}).await;
    let mut a = authed(&s, "a", "starttls").await;
    a.send(&format!("<enable xmlns='{SM}' resume='true'/>"))
        .await;
    let f = a.recv().await;
    assert!(f.is("failed", SM), "{}", xml(&f));
    assert!(f.get_child("unexpected-request", NS_STANZAS).is_some());
    // The stream goes on: binding still works.
    a.bind("r").await;
}

#[tokio::test]
async fn resume_on_another_transport_after_connection_loss() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, enabled) = sm_session(&s, "a", "phone", true).await;
    let id = enabled.attr("id").expect("id").to_string();
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    for i in 1..=3 {
        say(&mut b, "a@localhost/phone", &format!("m{i}")).await;
    }
    let got = messages(&mut a, 3).await;
    assert_eq!(bodies(&got), ["m1", "m2", "m3"]);
    // The phone handled m1 only, then lost its connection (no close, no ack for the rest).
    a.send(&format!("<a xmlns='{SM}' h='1'/>")).await;
    a.send("<message to='b@localhost/desk' type='chat'><body>before</body></message>")
        .await;
    let m = b.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("before"));
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // While it waits to be resumed, the session is still there: messages queue for it.
    say(&mut b, "a@localhost/phone", "m4").await;
    sync(&mut b, "sb").await;
    assert_nothing(&mut b, "no error for a message to a hibernating session").await;

    // Resume over Direct TLS: resumed with the count of what the server handled (the message),
    // then m2, m3, m4: each exactly once.
    let mut a2 = authed(&s, "a", "tls").await;
    a2.send(&format!("<resume xmlns='{SM}' previd='{id}' h='1'/>"))
        .await;
    let r = a2.recv().await;
    assert!(r.is("resumed", SM), "expected resumed: {}", xml(&r));
    assert_eq!(r.attr("previd"), Some(id.as_str()));
    assert_eq!(r.attr("h"), Some("1"));
    let again = messages(&mut a2, 3).await;
    assert_eq!(bodies(&again), ["m2", "m3", "m4"]);
    let extra = non_presence_within(&mut a2, QUIET).await;
    assert!(
        extra.iter().all(|e| e.is("r", SM)),
        "nothing twice: {:?}",
        extra.iter().map(xml).collect::<Vec<_>>()
    );
    // The resumed session carries on both ways, with the same counters.
    say(&mut b, "a@localhost/phone", "m5").await;
    assert_eq!(bodies(&messages(&mut a2, 1).await), ["m5"]);
    say(&mut a2, "b@localhost/desk", "after").await;
    let m = b.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("after"));
    a2.send(&format!("<r xmlns='{SM}'/>")).await;
    let ack = a2.recv_until(|e| e.is("a", SM)).await;
    assert_eq!(ack.attr("h"), Some("2"));
}

#[tokio::test]
async fn resuming_takes_over_a_connection_that_is_still_open() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, enabled) = sm_session(&s, "a", "phone", true).await;
    let id = enabled.attr("id").expect("id").to_string();
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    say(&mut b, "a@localhost/phone", "m1").await;
    assert_eq!(bodies(&messages(&mut a, 1).await), ["m1"]);
    // The old connection looks alive to the server (a NAT rebinding); the client resumes.
    let mut a2 = authed(&s, "a", "starttls").await;
    a2.send(&format!("<resume xmlns='{SM}' previd='{id}' h='0'/>"))
        .await;
    let r = a2.recv().await;
    assert!(r.is("resumed", SM), "{}", xml(&r));
    assert_eq!(bodies(&messages(&mut a2, 1).await), ["m1"]);
    // The old connection is closed.
    loop {
        match a.next_event().await {
            None | Some(halyard::stream::StreamEvent::Close) => break,
            Some(_) => continue,
        }
    }
}

#[tokio::test]
async fn failed_resumptions() {
    let s = server_cfg(&["a", "c"], |cfg| {
        cfg.stream_management.resume_timeout_secs = 1;
    })
    .await;
    // Unknown id.
    let mut x = authed(&s, "a", "starttls").await;
    x.send(&format!("<resume xmlns='{SM}' previd='nope' h='0'/>"))
        .await;
    let f = x.recv().await;
    assert!(f.is("failed", SM) && f.get_child("item-not-found", NS_STANZAS).is_some());
    // A failed resumption leaves the stream usable: bind instead.
    x.bind("other").await;

    let (mut a, enabled) = sm_session(&s, "a", "phone", true).await;
    let id = enabled.attr("id").expect("id").to_string();
    sync(&mut a, "s").await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Another account cannot take it.
    let mut c = authed(&s, "c", "starttls").await;
    c.send(&format!("<resume xmlns='{SM}' previd='{id}' h='0'/>"))
        .await;
    let f = c.recv().await;
    assert!(f.is("failed", SM) && f.get_child("item-not-found", NS_STANZAS).is_some());

    // More handled than was sent (one ping result).
    let mut a2 = authed(&s, "a", "starttls").await;
    a2.send(&format!("<resume xmlns='{SM}' previd='{id}' h='7'/>"))
        .await;
    let f = a2.recv().await;
    assert!(f.is("failed", SM), "{}", xml(&f));
    let t = f
        .get_child("handled-count-too-high", SM)
        .expect("handled-count-too-high");
    assert_eq!(t.attr("send-count"), Some("1"));

    // Past the timeout: item-not-found, with the count the server had handled.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut a3 = authed(&s, "a", "starttls").await;
    a3.send(&format!("<resume xmlns='{SM}' previd='{id}' h='1'/>"))
        .await;
    let f = a3.recv().await;
    assert!(f.is("failed", SM) && f.get_child("item-not-found", NS_STANZAS).is_some());
    assert_eq!(f.attr("h"), Some("1"), "{}", xml(&f));
}

#[tokio::test]
async fn unresumed_session_sends_its_messages_to_offline_storage() {
    let s = server_cfg(&["a", "b"], |cfg| {
        cfg.stream_management.resume_timeout_secs = 1;
    })
    .await;
    let (mut a, _) = sm_session(&s, "a", "phone", true).await;
    a.online().await;
    sync(&mut a, "s").await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    say(&mut b, "a@localhost", "delivered, never acked").await;
    assert_eq!(messages(&mut a, 1).await.len(), 1);
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Hibernating counts as online: this one is queued for the session, not stored offline.
    say(&mut b, "a@localhost", "queued while away").await;
    sync(&mut b, "sb").await;
    assert_nothing(&mut b, "no error while the session waits").await;
    // The session is not resumed; both messages go to offline storage, in order.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut a2 = RawClient::login(&s, "a", PW, "phone2").await;
    a2.online().await;
    let got = messages(&mut a2, 2).await;
    assert_eq!(
        bodies(&got),
        ["delivered, never acked", "queued while away"]
    );
    for m in &got {
        assert!(
            m.get_child("delay", "urn:xmpp:delay").is_some(),
            "{}",
            xml(m)
        );
    }
    assert_nothing(&mut a2, "each once").await;
}

#[tokio::test]
async fn clean_close_reroutes_unacknowledged_messages() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, _) = sm_session(&s, "a", "phone", false).await;
    let mut other = RawClient::login(&s, "a", PW, "laptop").await;
    other.online().await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    say(&mut b, "a@localhost/phone", "to the phone").await;
    assert_eq!(messages(&mut a, 1).await.len(), 1);
    // The phone closes without acknowledging: the laptop (no carbons) gets the message.
    a.send("</stream:stream>").await;
    let m = other.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("to the phone"));
}

#[tokio::test]
async fn inactive_client_gets_presence_only_with_the_next_message() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let mut a = RawClient::login(&s, "a", PW, "phone").await;
    let f = a.features.clone().expect("features");
    assert!(f.get_child("csi", CSI).is_some(), "csi advertised");
    a.online().await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    a.send(&format!("<inactive xmlns='{CSI}'/>")).await;
    sync(&mut a, "s").await;

    // Directed presence twice (coalesced), a chat state and a receipt: all held.
    b.send("<presence to='a@localhost/phone'><show>away</show></presence>")
        .await;
    b.send("<presence to='a@localhost/phone'><show>dnd</show></presence>")
        .await;
    b.send("<message to='a@localhost/phone' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>").await;
    b.send("<message to='a@localhost/phone' type='chat' id='r1'><received xmlns='urn:xmpp:receipts' id='x'/></message>").await;
    sync(&mut b, "sb").await;
    assert!(
        a.recv_quiet(QUIET).await.is_none(),
        "nothing reaches an inactive client"
    );

    // A message with a body: the held ones first, in order, the presence only in its latest form.
    say(&mut b, "a@localhost/phone", "wake up").await;
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(a.recv().await);
    }
    assert_eq!(got[0].name(), "presence");
    assert_eq!(
        got[0]
            .get_child("show", NS_CLIENT)
            .map(|s| s.text())
            .as_deref(),
        Some("dnd")
    );
    assert!(got[1]
        .get_child("composing", "http://jabber.org/protocol/chatstates")
        .is_some());
    assert!(got[2].get_child("received", "urn:xmpp:receipts").is_some());
    assert_eq!(body(&got[3]).as_deref(), Some("wake up"));
    assert!(a.recv_quiet(QUIET).await.is_none(), "presence sent once");

    // Held again, then released by <active/>.
    b.send("<presence to='a@localhost/phone'><show>chat</show></presence>")
        .await;
    sync(&mut b, "sb2").await;
    assert!(a.recv_quiet(QUIET).await.is_none());
    a.send(&format!("<active xmlns='{CSI}'/>")).await;
    let p = a.recv().await;
    assert_eq!(p.name(), "presence");
    assert_eq!(
        p.get_child("show", NS_CLIENT).map(|s| s.text()).as_deref(),
        Some("chat")
    );
    // Active again: presence flows at once.
    b.send("<presence to='a@localhost/phone'/>").await;
    let p = a.recv().await;
    assert_eq!(p.name(), "presence");
}

/// An `<a/>` is the server's promise that what it covers survives a crash: messages stored
/// offline are all there after kill -9 right after the ack, with no wait.
#[tokio::test(flavor = "multi_thread")]
async fn acknowledged_messages_survive_kill_9() {
    let env = Env::with_test_cert().await;
    env.run(&["user", "add", "alice@localhost", "--password", "pw"])
        .ok("add alice");
    env.run(&["user", "add", "bob@localhost", "--password", "pw"])
        .ok("add bob");
    let server = env.serve();
    let mut alice = login_at(server.c2s, "alice", "pw", "a").await;
    alice.send(&format!("<enable xmlns='{SM}'/>")).await;
    let e = alice.recv().await;
    assert!(e.is("enabled", SM));
    for i in 0..50 {
        say(&mut alice, "bob@localhost", &format!("m{i}")).await;
    }
    alice.send(&format!("<r xmlns='{SM}'/>")).await;
    let a = alice.recv_until(|e| e.is("a", SM)).await;
    assert_eq!(a.attr("h"), Some("50"));
    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    drop(server);
    drop(alice);

    let server = env.serve();
    let mut bob = login_at(server.c2s, "bob", "pw", "b").await;
    bob.online().await;
    let got = messages(&mut bob, 50).await;
    let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies(&got), want);
}

#[tokio::test]
async fn an_ended_session_answers_the_requests_it_never_answered() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, _) = sm_session(&s, "a", "phone", false).await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    b.send("<iq type='get' id='v1' to='a@localhost/phone'><query xmlns='jabber:iq:version'/></iq>")
        .await;
    let q = a.recv_until(|e| e.name() == "iq").await;
    assert_eq!(q.attr("id"), Some("v1"));
    // The connection drops; without resumption the session ends at once.
    drop(a);
    let e = b.recv_until(|e| e.attr("id") == Some("v1")).await;
    assert_eq!(e.attr("type"), Some("error"), "{}", xml(&e));
    assert_eq!(stanza_error(&e).as_deref(), Some("service-unavailable"));
}

#[tokio::test]
async fn hibernation_is_bounded_and_loses_nothing() {
    let s = server_cfg(&["a", "b"], |cfg| {
        cfg.stream_management.max_unacked = 3;
        cfg.stream_management.max_hibernating_per_account = 1;
    })
    .await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;

    // Too many stanzas for a waiting session: it ends and they go to offline storage.
    let (mut a, enabled) = sm_session(&s, "a", "p1", true).await;
    let id1 = enabled.attr("id").expect("id").to_string();
    sync(&mut a, "s").await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..5 {
        say(&mut b, "a@localhost/p1", &format!("m{i}")).await;
    }
    sync(&mut b, "sb").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut x = authed(&s, "a", "starttls").await;
    x.send(&format!("<resume xmlns='{SM}' previd='{id1}' h='0'/>"))
        .await;
    let f = x.recv().await;
    assert!(f.is("failed", SM), "ended on overflow: {}", xml(&f));

    // Two waiting sessions of one account with a limit of one: the older ends.
    let (mut a2, e2) = sm_session(&s, "a", "p2", true).await;
    let id2 = e2.attr("id").expect("id").to_string();
    sync(&mut a2, "s2").await;
    drop(a2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut a3, e3) = sm_session(&s, "a", "p3", true).await;
    let id3 = e3.attr("id").expect("id").to_string();
    sync(&mut a3, "s3").await;
    drop(a3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut y = authed(&s, "a", "starttls").await;
    y.send(&format!("<resume xmlns='{SM}' previd='{id2}' h='1'/>"))
        .await;
    assert!(y.recv().await.is("failed", SM), "the older one ended");
    let mut z = authed(&s, "a", "starttls").await;
    z.send(&format!("<resume xmlns='{SM}' previd='{id3}' h='1'/>"))
        .await;
    let r = z.recv().await;
    assert!(r.is("resumed", SM), "the newer one waits: {}", xml(&r));

    // Nothing was lost: the overflowed messages wait in offline storage.
    let mut a4 = RawClient::login(&s, "a", PW, "p4").await;
    a4.online().await;
    let got = messages(&mut a4, 5).await;
    assert_eq!(bodies(&got), ["m0", "m1", "m2", "m3", "m4"]);
}

#[tokio::test]
async fn a_client_that_never_acknowledges_is_disconnected_without_loss() {
    let s = server_cfg(&["a", "b"], |cfg| {
        cfg.stream_management.max_unacked = 3;
    })
    .await;
    let (mut a, _) = sm_session(&s, "a", "phone", false).await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    for i in 0..5 {
        say(&mut b, "a@localhost/phone", &format!("m{i}")).await;
    }
    assert_eq!(a.expect_stream_error().await, "policy-violation");
    let mut a2 = RawClient::login(&s, "a", PW, "phone2").await;
    a2.online().await;
    // Whatever the phone did not acknowledge (here: all of it) is waiting offline.
    let got = messages(&mut a2, 5).await;
    assert_eq!(bodies(&got), ["m0", "m1", "m2", "m3", "m4"]);
}

#[tokio::test]
async fn a_resumed_stream_starts_active_and_gets_what_was_held() {
    let s = server_cfg(&["a", "b"], |_| {}).await;
    let (mut a, enabled) = sm_session(&s, "a", "phone", true).await;
    let id = enabled.attr("id").expect("id").to_string();
    a.send(&format!("<inactive xmlns='{CSI}'/>")).await;
    sync(&mut a, "s").await;
    let mut b = RawClient::login(&s, "b", PW, "desk").await;
    b.send("<presence to='a@localhost/phone'><show>away</show></presence>")
        .await;
    sync(&mut b, "sb").await;
    while let Some(e) = a.recv_quiet(QUIET).await {
        assert!(e.is("r", SM), "held while inactive, got {}", xml(&e));
    }
    // Resumed on a new connection while the old one still looks open: the held presence comes
    // after the replay, and the new stream is active.
    let mut a2 = authed(&s, "a", "starttls").await;
    a2.send(&format!("<resume xmlns='{SM}' previd='{id}' h='1'/>"))
        .await;
    let r = a2.recv().await;
    assert!(r.is("resumed", SM), "{}", xml(&r));
    let p = a2.recv_until(|e| e.name() == "presence").await;
    assert_eq!(
        p.get_child("show", NS_CLIENT).map(|s| s.text()).as_deref(),
        Some("away")
    );
    b.send("<presence to='a@localhost/phone'><show>dnd</show></presence>")
        .await;
    let p = a2.recv_until(|e| e.name() == "presence").await;
    assert_eq!(
        p.get_child("show", NS_CLIENT).map(|s| s.text()).as_deref(),
        Some("dnd"),
        "active: presence flows at once"
    );
}
