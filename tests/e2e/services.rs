//! Server services: XEP-0030 (disco), XEP-0115 (caps on the stream features), XEP-0199 (ping),
//! XEP-0092 (version), XEP-0012 (last activity).

use std::time::Duration;

use base64::Engine;
use minidom::Element;
use sha1::{Digest, Sha1};

use super::common::*;

const PW: &str = "pw";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_CAPS: &str = "http://jabber.org/protocol/caps";
const NS_PING: &str = "urn:xmpp:ping";
const NS_VERSION: &str = "jabber:iq:version";
const NS_LAST: &str = "jabber:iq:last";
const NS_DATA: &str = "jabber:x:data";
const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";

async fn server_with(users: &[&str]) -> TestServer {
    let s = TestServer::start().await;
    for u in users {
        s.add_user(u, PW).await;
    }
    s
}

/// Sends an iq get with `payload` to `to` (or no `to`) and returns the answer with that id.
async fn get(c: &mut RawClient, id: &str, to: Option<&str>, payload: &str) -> Element {
    let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
    c.send(&format!("<iq type='get' id='{id}'{to}>{payload}</iq>"))
        .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
        .await
}

fn assert_result(r: &Element, from: &str) {
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(r));
    assert_eq!(
        r.attr("from"),
        Some(from),
        "result comes from the addressee: {}",
        xml(r)
    );
}

fn identities(q: &Element) -> Vec<(String, String, String, String)> {
    let mut v: Vec<_> = q
        .children()
        .filter(|c| c.is("identity", NS_DISCO_INFO))
        .map(|i| {
            let lang = i.attr_ns(NS_XML, "lang").unwrap_or("").to_string();
            (
                i.attr("category").unwrap_or("").to_string(),
                i.attr("type").unwrap_or("").to_string(),
                lang,
                i.attr("name").unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn features(q: &Element) -> Vec<String> {
    let mut v: Vec<String> = q
        .children()
        .filter(|c| c.is("feature", NS_DISCO_INFO))
        .map(|f| f.attr("var").unwrap_or("").to_string())
        .collect();
    v.sort();
    v
}

/// An extended-information form (XEP-0128): its FORM_TYPE and its other fields with their values.
type Form = (String, Vec<(String, Vec<String>)>);

/// XEP-0115 §5.1, computed independently of the server from a disco#info result.
fn caps_ver(q: &Element) -> String {
    let mut s = String::new();
    for (cat, typ, lang, name) in identities(q) {
        s.push_str(&format!("{cat}/{typ}/{lang}/{name}<"));
    }
    for f in features(q) {
        s.push_str(&f);
        s.push('<');
    }
    // Extended information (XEP-0128 forms), sorted by FORM_TYPE.
    let mut forms: Vec<Form> = q
        .children()
        .filter(|c| c.is("x", NS_DATA))
        .map(|x| {
            let mut form_type = String::new();
            let mut fields = Vec::new();
            for f in x.children().filter(|f| f.is("field", NS_DATA)) {
                let var = f.attr("var").unwrap_or("").to_string();
                let mut values: Vec<String> = f
                    .children()
                    .filter(|v| v.is("value", NS_DATA))
                    .map(|v| v.text())
                    .collect();
                values.sort();
                if var == "FORM_TYPE" {
                    form_type = values.first().cloned().unwrap_or_default();
                } else {
                    fields.push((var, values));
                }
            }
            fields.sort();
            (form_type, fields)
        })
        .collect();
    forms.sort();
    for (form_type, fields) in forms {
        s.push_str(&form_type);
        s.push('<');
        for (var, values) in fields {
            s.push_str(&var);
            s.push('<');
            for v in values {
                s.push_str(&v);
                s.push('<');
            }
        }
    }
    base64::engine::general_purpose::STANDARD.encode(Sha1::digest(s.as_bytes()))
}

#[test]
fn caps_ver_matches_the_xep_0115_example() {
    // XEP-0115 §5.2: the test's own implementation must be right for the comparison to mean
    // anything.
    let q: Element = "<query xmlns='http://jabber.org/protocol/disco#info'>\
        <identity category='client' name='Exodus 0.9.1' type='pc'/>\
        <feature var='http://jabber.org/protocol/caps'/>\
        <feature var='http://jabber.org/protocol/disco#info'/>\
        <feature var='http://jabber.org/protocol/disco#items'/>\
        <feature var='http://jabber.org/protocol/muc'/></query>"
        .parse()
        .expect("parse");
    assert_eq!(caps_ver(&q), "QgayPKawpkPSDYmwT/WM94uAlu0=");
}

#[tokio::test]
async fn disco_info_of_the_server_and_its_caps() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;

    let r = get(
        &mut alice,
        "d1",
        Some("localhost"),
        "<query xmlns='http://jabber.org/protocol/disco#info'/>",
    )
    .await;
    assert_result(&r, "localhost");
    let q = r
        .get_child("query", NS_DISCO_INFO)
        .unwrap_or_else(|| panic!("disco#info query in {}", xml(&r)));
    let ids = identities(q);
    assert!(
        ids.iter().any(|(c, t, _, _)| c == "server" && t == "im"),
        "identity server/im: {ids:?}"
    );
    let feats = features(q);
    for f in [NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_VERSION, NS_LAST] {
        assert!(feats.iter().any(|x| x == f), "feature {f} in {feats:?}");
    }
    let mut dedup = feats.clone();
    dedup.dedup();
    assert_eq!(dedup, feats, "no duplicate features (XEP-0030 §3.1)");

    // The caps on the stream features (XEP-0115 §6.3) hash exactly this answer.
    let c = alice
        .features
        .as_ref()
        .and_then(|f| f.get_child("c", NS_CAPS))
        .cloned()
        .expect("caps <c/> in the stream features");
    assert_eq!(c.attr("hash"), Some("sha-1"), "{}", xml(&c));
    let node = c.attr("node").expect("caps node");
    let ver = c.attr("ver").expect("caps ver");
    assert_eq!(ver, caps_ver(q), "ver recomputed from disco#info");

    // Querying node#ver gives the same identities and features, with the node echoed.
    let node_ver = format!("{node}#{ver}");
    let r2 = get(
        &mut alice,
        "d2",
        Some("localhost"),
        &format!("<query xmlns='http://jabber.org/protocol/disco#info' node='{node_ver}'/>"),
    )
    .await;
    assert_result(&r2, "localhost");
    let q2 = r2.get_child("query", NS_DISCO_INFO).expect("query");
    assert_eq!(q2.attr("node"), Some(node_ver.as_str()), "{}", xml(&r2));
    assert_eq!(identities(q2), ids);
    assert_eq!(features(q2), feats);

    // Any other node is unknown.
    let r3 = get(
        &mut alice,
        "d3",
        Some("localhost"),
        "<query xmlns='http://jabber.org/protocol/disco#info' node='urn:example:nonexistent'/>",
    )
    .await;
    assert_eq!(r3.attr("type"), Some("error"), "{}", xml(&r3));
    assert_eq!(stanza_error(&r3).as_deref(), Some("item-not-found"));
}

#[tokio::test]
async fn caps_are_offered_before_authentication_too() {
    let s = TestServer::start().await;
    let mut c = RawClient::connect(s.c2s).await;
    let f = c.open().await;
    let caps = f.get_child("c", NS_CAPS).expect("caps before TLS");
    let ver = caps.attr("ver").expect("ver").to_string();
    let mut c = c.starttls().await;
    let f = c.open().await;
    let caps = f.get_child("c", NS_CAPS).expect("caps after TLS");
    assert_eq!(caps.attr("ver"), Some(ver.as_str()), "one ver per server");
}

#[tokio::test]
async fn disco_items_of_the_server_lists_only_the_upload_service() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = get(
        &mut alice,
        "i1",
        Some("localhost"),
        "<query xmlns='http://jabber.org/protocol/disco#items'/>",
    )
    .await;
    assert_result(&r, "localhost");
    let q = r
        .get_child("query", NS_DISCO_ITEMS)
        .unwrap_or_else(|| panic!("disco#items query in {}", xml(&r)));
    // The upload component (on by default) is the server's only item.
    let items: Vec<_> = q.children().filter_map(|i| i.attr("jid")).collect();
    assert_eq!(items, vec!["upload.localhost"], "{}", xml(&r));
}

#[tokio::test]
async fn disco_info_of_an_account() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    for (id, to) in [
        ("a1", Some("alice@localhost")),
        ("a2", None),
        ("a3", Some("bob@localhost")),
    ] {
        let r = get(
            &mut alice,
            id,
            to,
            "<query xmlns='http://jabber.org/protocol/disco#info'/>",
        )
        .await;
        assert_result(&r, to.unwrap_or("alice@localhost"));
        let q = r
            .get_child("query", NS_DISCO_INFO)
            .unwrap_or_else(|| panic!("query in {}", xml(&r)));
        let ids = identities(q);
        assert!(
            ids.iter()
                .any(|(c, t, _, _)| c == "account" && t == "registered"),
            "identity account/registered for {to:?}: {ids:?}"
        );
        assert!(
            !ids.iter().any(|(c, _, _, _)| c == "server"),
            "an account is not the server: {ids:?}"
        );
        assert!(
            features(q).iter().any(|f| f == NS_DISCO_INFO),
            "{}",
            xml(&r)
        );
    }
}

#[tokio::test]
async fn ping_to_the_server_and_to_own_bare_jid() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = get(
        &mut alice,
        "p1",
        Some("localhost"),
        "<ping xmlns='urn:xmpp:ping'/>",
    )
    .await;
    assert_result(&r, "localhost");
    assert_eq!(r.attr("to"), Some("alice@localhost/phone"), "{}", xml(&r));
    let r = get(
        &mut alice,
        "p2",
        Some("alice@localhost"),
        "<ping xmlns='urn:xmpp:ping'/>",
    )
    .await;
    assert_result(&r, "alice@localhost");
    // A ping is a get: set is wrong.
    alice
        .send("<iq type='set' id='p3' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let r = alice.recv_until(|e| e.attr("id") == Some("p3")).await;
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(&r));
}

#[tokio::test]
async fn software_version_of_the_server() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = get(
        &mut alice,
        "v1",
        Some("localhost"),
        "<query xmlns='jabber:iq:version'/>",
    )
    .await;
    assert_result(&r, "localhost");
    let q = r
        .get_child("query", NS_VERSION)
        .unwrap_or_else(|| panic!("version query in {}", xml(&r)));
    assert_eq!(
        q.get_child("name", NS_VERSION).map(|n| n.text()).as_deref(),
        Some("Halyard")
    );
    let v = q
        .get_child("version", NS_VERSION)
        .map(|n| n.text())
        .unwrap_or_default();
    assert!(!v.trim().is_empty(), "a version string: {}", xml(&r));
}

fn last_seconds(r: &Element) -> u64 {
    r.get_child("query", NS_LAST)
        .and_then(|q| q.attr("seconds"))
        .unwrap_or_else(|| panic!("jabber:iq:last seconds in {}", xml(r)))
        .parse()
        .unwrap_or_else(|_| panic!("seconds is a number: {}", xml(r)))
}

#[tokio::test]
async fn last_activity_of_the_server_is_its_uptime() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = get(
        &mut alice,
        "l1",
        Some("localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    assert_result(&r, "localhost");
    let up = last_seconds(&r);
    assert!(up < 30, "the server just started: uptime {up}s");

    // It grows with time.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(
        &mut alice,
        "l2",
        Some("localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    let later = last_seconds(&r);
    assert!(later >= 1 && later >= up, "uptime {up}s then {later}s");
}

#[tokio::test]
async fn last_activity_of_a_contact_without_subscription_is_forbidden() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let mut bob = RawClient::login(&s, "bob", PW, "desk").await;
    bob.send("<presence/>").await;
    let r = get(
        &mut alice,
        "f1",
        Some("bob@localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(&r));
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("forbidden"),
        "{}",
        xml(&r)
    );
    bob.send("</stream:stream>").await;
}

/// Waits until everything `c` sent so far was processed (see routing.rs).
async fn sync(c: &mut RawClient, tag: &str) {
    let id = format!("sync-{tag}");
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id.as_str()))
        .await;
}

/// alice, subscribed to bob's presence (bob approved, RFC 6121 §3.1), and bob, available with a
/// status.
async fn subscribed_pair(s: &TestServer) -> (RawClient, RawClient) {
    let mut alice = RawClient::login(s, "alice", PW, "phone").await;
    let mut bob = RawClient::login(s, "bob", PW, "desk").await;
    alice
        .send("<presence type='subscribe' to='bob@localhost'/>")
        .await;
    sync(&mut alice, "subscribe").await;
    bob.send("<presence type='subscribed' to='alice@localhost'/>")
        .await;
    bob.send("<presence><status>at work</status></presence>")
        .await;
    sync(&mut bob, "subscribed").await;
    (alice, bob)
}

/// bob sends `unavailable` (with `status`), closes his stream and waits for the server to close
/// it; then alice asks for bob's last activity until the stored logout answers.
async fn logout_then_ask(alice: &mut RawClient, mut bob: RawClient, status: &str) -> Element {
    bob.send(&format!(
        "<presence type='unavailable'><status>{status}</status></presence>"
    ))
    .await;
    bob.send("</stream:stream>").await;
    while bob.next_event().await.is_some() {}
    // bob's stream is closed, so he is unbound; the logout is recorded just after: a result now
    // comes from the stored logout (before, the answer is an error). Poll briefly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("after-logout-{n}");
        let r = get(
            alice,
            &id,
            Some("bob@localhost"),
            "<query xmlns='jabber:iq:last'/>",
        )
        .await;
        if r.attr("type") == Some("result") || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn last_activity_of_a_subscribed_contact_online_then_offline() {
    let s = server_with(&["alice", "bob"]).await;
    let (mut alice, bob) = subscribed_pair(&s).await;

    // Online contact: seconds='0' (XEP-0012 §4).
    let r = get(
        &mut alice,
        "s1",
        Some("bob@localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    assert_result(&r, "bob@localhost");
    assert_eq!(last_seconds(&r), 0, "{}", xml(&r));

    let r = logout_then_ask(&mut alice, bob, "gone fishing").await;
    assert_result(&r, "bob@localhost");
    let secs = last_seconds(&r);
    assert!(secs < 30, "bob logged out just now: {secs}s");

    // Time passes for an offline contact.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(
        &mut alice,
        "s3",
        Some("bob@localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    assert_result(&r, "bob@localhost");
    assert!(last_seconds(&r) >= 1, "{}", xml(&r));
}

#[tokio::test]
async fn last_activity_of_an_offline_contact_carries_the_unavailable_status() {
    let s = server_with(&["alice", "bob"]).await;
    let (mut alice, bob) = subscribed_pair(&s).await;
    let r = logout_then_ask(&mut alice, bob, "gone fishing").await;
    assert_result(&r, "bob@localhost");
    let status = r
        .get_child("query", NS_LAST)
        .map(|q| q.text())
        .unwrap_or_default();
    assert_eq!(
        status,
        "gone fishing",
        "the status of the last unavailable presence (XEP-0012 §4): {}",
        xml(&r)
    );
}

#[tokio::test]
async fn last_activity_of_self() {
    let s = server_with(&["alice"]).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    alice.send("<presence/>").await;
    // An account may always ask about itself; with a resource online the answer is 0.
    let r = get(
        &mut alice,
        "me1",
        Some("alice@localhost"),
        "<query xmlns='jabber:iq:last'/>",
    )
    .await;
    assert_result(&r, "alice@localhost");
    assert_eq!(last_seconds(&r), 0, "{}", xml(&r));
}
