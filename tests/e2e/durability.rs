//! Crash safety of history: messages survive `kill -9` once the server has handled them and the
//! group-commit window has passed — live ones in both archives, offline ones in the offline
//! store too.

use std::time::Duration;

use super::cli::{login_at, Env};
use super::common::*;

const MAM: &str = "urn:xmpp:mam:2";
const SID: &str = "urn:xmpp:sid:0";

/// Round trip on `c`'s own stream: once the answer arrives, everything sent before it has been
/// routed (a session processes its stanzas in order).
async fn sync(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    c.recv_until(|e| e.attr("id") == Some(id)).await;
}

/// The bodies and stanza-ids of a user's whole archive, oldest first (pages of 100).
async fn archive(c: &mut RawClient) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    for page in 0.. {
        let qid = format!("q{page}");
        let set = match &after {
            Some(a) => format!("<set xmlns='http://jabber.org/protocol/rsm'><max>100</max><after>{a}</after></set>"),
            None => "<set xmlns='http://jabber.org/protocol/rsm'><max>100</max></set>".to_string(),
        };
        c.send(&format!(
            "<iq type='set' id='{qid}'><query xmlns='{MAM}' queryid='{qid}'>{set}</query></iq>"
        ))
        .await;
        loop {
            let el = c.recv().await;
            if let Some(r) = el.get_child("result", MAM) {
                let id = r.attr("id").unwrap_or_default().to_string();
                let m = r
                    .get_child("forwarded", "urn:xmpp:forward:0")
                    .and_then(|f| f.get_child("message", NS_CLIENT))
                    .expect("forwarded message");
                out.push((body(m).unwrap_or_default(), id));
            } else if el.attr("id") == Some(qid.as_str()) {
                assert_eq!(el.attr("type"), Some("result"), "{}", xml(&el));
                let fin = el.get_child("fin", MAM).expect("fin");
                if fin.attr("complete") == Some("true") {
                    return out;
                }
                after = fin
                    .get_child("set", "http://jabber.org/protocol/rsm")
                    .and_then(|s| s.get_child("last", "http://jabber.org/protocol/rsm"))
                    .map(|l| l.text());
                break;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn handled_messages_survive_kill_9() {
    let env = Env::with_test_cert().await;
    env.run(&["user", "add", "alice@localhost", "--password", "pw"])
        .ok("add alice");
    env.run(&["user", "add", "bob@localhost", "--password", "pw"])
        .ok("add bob");
    let server = env.serve();

    let mut alice = login_at(server.c2s, "alice", "pw", "a").await;
    alice.online().await;
    let mut bob = login_at(server.c2s, "bob", "pw", "b").await;
    bob.online().await;
    sync(&mut bob, "b0").await;

    // Live: bob receives each with the stanza-id of his archive.
    let mut live_ids = Vec::new();
    for i in 0..20 {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='l{i}'><body>live {i}</body></message>"
            ))
            .await;
        let m = bob.recv_until(|e| e.name() == "message").await;
        assert_eq!(body(&m).as_deref(), Some(format!("live {i}").as_str()));
        let sid = m
            .get_child("stanza-id", SID)
            .expect("stanza-id on the delivered copy");
        assert_eq!(sid.attr("by"), Some("bob@localhost"));
        live_ids.push(sid.attr("id").expect("id").to_string());
    }
    // Bob leaves; the next messages go to offline storage.
    // The server unbinds a session before it answers the closing tag.
    bob.send("</stream:stream>").await;
    while let Some(ev) = bob.next_event().await {
        if matches!(ev, halyard::stream::StreamEvent::Close) {
            break;
        }
    }
    drop(bob);
    for i in 0..20 {
        alice.send(&format!("<message to='bob@localhost' type='chat' id='o{i}'><body>offline {i}</body></message>")).await;
    }
    sync(&mut alice, "a1").await;
    // Past the group-commit window (2 ms by default) and its flush.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = server.pid();
    let st = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    drop(server);
    drop(alice);

    let server = env.serve();
    let mut bob = login_at(server.c2s, "bob", "pw", "b2").await;
    bob.online().await;
    let mut offline = Vec::new();
    while offline.len() < 20 {
        let m = bob.recv_until(|e| e.name() == "message").await;
        assert!(
            m.get_child("delay", "urn:xmpp:delay").is_some(),
            "offline delivery carries <delay/>: {}",
            xml(&m)
        );
        offline.push(body(&m).unwrap_or_default());
    }
    let expected: Vec<String> = (0..20).map(|i| format!("offline {i}")).collect();
    assert_eq!(
        offline, expected,
        "every offline message, once, oldest first"
    );

    let bob_archive = archive(&mut bob).await;
    let bodies: Vec<&str> = bob_archive.iter().map(|(b, _)| b.as_str()).collect();
    let mut want: Vec<String> = (0..20).map(|i| format!("live {i}")).collect();
    want.extend(expected.iter().cloned());
    assert_eq!(
        bodies,
        want.iter().map(String::as_str).collect::<Vec<_>>(),
        "bob's archive has every message once"
    );
    let archived_live: Vec<&str> = bob_archive
        .iter()
        .take(20)
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(
        archived_live,
        live_ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "stanza-ids are stable"
    );

    let mut alice = login_at(server.c2s, "alice", "pw", "a2").await;
    let alice_archive = archive(&mut alice).await;
    let bodies: Vec<&str> = alice_archive.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(
        bodies,
        want.iter().map(String::as_str).collect::<Vec<_>>(),
        "alice's archive has every message once"
    );
}
