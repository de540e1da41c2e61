//! RFC 6121 between real clients over real sockets: roster management and versioning (§2), the
//! presence subscription flow (§3, pre-approval included) and presence exchange (§4: initial
//! presence and its implicit probes, broadcasts, logout and lost connections, directed presence,
//! client probes).
//!
//! Presence and roster pushes interleave, so each client keeps what it received in a backlog and
//! the tests wait for precise stanzas; "nothing arrives" is checked over a short quiet period.

use std::time::{Duration, Instant};

use minidom::Element;

use super::common::*;

const NS_ROSTER: &str = "jabber:iq:roster";
const NS_ROSTER_VER: &str = "urn:xmpp:features:rosterver";
const NS_PRE_APPROVAL: &str = "urn:xmpp:features:pre-approval";
/// How long a test waits for a stanza it expects.
const WAIT: Duration = Duration::from_secs(5);

fn bare(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

fn password(user: &str) -> String {
    format!("pw-{user}")
}

async fn server(users: &[&str]) -> TestServer {
    let s = TestServer::start().await;
    for u in users {
        s.add_user(u, &password(u)).await;
    }
    s
}

/// A presence of `type_` (`None`: available) from exactly `from`.
fn is_presence(el: &Element, type_: Option<&str>, from: &str) -> bool {
    el.name() == "presence" && el.attr("type") == type_ && el.attr("from") == Some(from)
}

fn child_text(el: &Element, name: &str) -> Option<String> {
    el.get_child(name, NS_CLIENT).map(|c| c.text())
}

/// The items of a roster query.
fn items(query: &Element) -> Vec<&Element> {
    query
        .children()
        .filter(|c| c.is("item", NS_ROSTER))
        .collect()
}

fn groups(item: &Element) -> Vec<String> {
    let mut g: Vec<String> = item
        .children()
        .filter(|c| c.is("group", NS_ROSTER))
        .map(|c| c.text())
        .collect();
    g.sort();
    g
}

/// The one item of a roster push about `contact`, if `el` is such a push.
fn push_item<'a>(el: &'a Element, contact: &str) -> Option<&'a Element> {
    if el.name() != "iq" || el.attr("type") != Some("set") {
        return None;
    }
    let q = el.get_child("query", NS_ROSTER)?;
    match items(q).as_slice() {
        [item] if item.attr("jid") == Some(contact) => Some(item),
        _ => None,
    }
}

/// `item`'s (subscription, ask, approved) attributes.
fn state(item: &Element) -> (Option<&str>, Option<&str>, Option<&str>) {
    (
        item.attr("subscription"),
        item.attr("ask"),
        item.attr("approved"),
    )
}

/// A logged-in client that remembers what it received but has not been asked for yet.
struct Client {
    raw: RawClient,
    /// Full JID.
    jid: String,
    /// Bare JID.
    user: String,
    /// Received, not yet asked for, with arrival numbers.
    backlog: Vec<(u64, Element)>,
    received: u64,
    ids: u32,
}

impl Client {
    /// Logged in and bound; no roster get, no presence.
    async fn login(s: &TestServer, user: &str, resource: &str) -> Client {
        let raw = RawClient::login(s, user, &password(user), resource).await;
        Client {
            raw,
            jid: format!("{user}@{DOMAIN}/{resource}"),
            user: bare(user),
            backlog: Vec::new(),
            received: 0,
            ids: 0,
        }
    }

    /// What a usual client does (RFC 6121 §2.2): roster get, then initial presence.
    async fn start(s: &TestServer, user: &str, resource: &str) -> Client {
        Self::start_with(s, user, resource, "<presence/>").await
    }

    async fn start_with(s: &TestServer, user: &str, resource: &str, presence: &str) -> Client {
        let mut c = Self::login(s, user, resource).await;
        c.roster_get(None).await;
        c.available(presence).await;
        c
    }

    async fn send(&mut self, xml: &str) {
        self.raw.send(xml).await;
    }

    /// Sends a broadcast presence and waits for its reflection to this very resource
    /// (RFC 6121 §4.2.2, §4.4.2).
    async fn available(&mut self, presence: &str) -> Element {
        self.send(presence).await;
        let me = self.jid.clone();
        self.expect("the reflection of our own presence", |e| {
            is_presence(e, None, &me)
        })
        .await
    }

    /// Reads one element into the backlog; false when `deadline` passes first.
    async fn pull(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.raw.recv()).await {
            Ok(el) => {
                self.received += 1;
                self.backlog.push((self.received, el));
                true
            }
            Err(_) => false,
        }
    }

    fn dump(&self) -> String {
        self.backlog
            .iter()
            .map(|(_, e)| format!("  {}\n", xml(e)))
            .collect()
    }

    /// The first element (received earlier or within [`WAIT`]) matching `pred`.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        self.expect_at(what, pred).await.1
    }

    /// Like [`Client::expect`], with the element's arrival number (to check ordering).
    async fn expect_at(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> (u64, Element) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.backlog.iter().position(|(_, e)| pred(e)) {
                return self.backlog.remove(i);
            }
            if !self.pull(deadline).await {
                panic!(
                    "{}: no {what} within {WAIT:?}; received meanwhile:\n{}",
                    self.jid,
                    self.dump()
                );
            }
        }
    }

    /// Listens for [`QUIET`] and fails if anything matching `pred` was received.
    async fn quiet(&mut self, what: &str, pred: impl Fn(&Element) -> bool) {
        let deadline = Instant::now() + QUIET;
        while self.pull(deadline).await {}
        if let Some((_, e)) = self.backlog.iter().find(|(_, e)| pred(e)) {
            panic!("{}: unexpected {what}: {}", self.jid, xml(e));
        }
    }

    /// Lets in-flight stanzas arrive, then forgets everything received.
    async fn settle(&mut self) {
        let deadline = Instant::now() + QUIET;
        while self.pull(deadline).await {}
        self.backlog.clear();
    }

    /// Sends an iq and returns its answer (result or error).
    async fn iq(&mut self, type_: &str, to: Option<&str>, payload: &str) -> Element {
        self.ids += 1;
        let id = format!("rp{}", self.ids);
        let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
        self.send(&format!("<iq type='{type_}' id='{id}'{to}>{payload}</iq>"))
            .await;
        self.expect(&format!("answer to iq {id}"), |e| {
            e.name() == "iq"
                && e.attr("id") == Some(id.as_str())
                && matches!(e.attr("type"), Some("result" | "error"))
        })
        .await
    }

    /// A roster get (with `ver` if given); returns the result, asserted to be one.
    async fn roster_get(&mut self, ver: Option<&str>) -> Element {
        let ver = ver.map(|v| format!(" ver='{v}'")).unwrap_or_default();
        let r = self
            .iq("get", None, &format!("<query xmlns='{NS_ROSTER}'{ver}/>"))
            .await;
        assert_eq!(r.attr("type"), Some("result"), "roster get: {}", xml(&r));
        r
    }

    /// The query of a full roster get, with its `ver`.
    async fn roster(&mut self) -> Element {
        let r = self.roster_get(None).await;
        let q = r
            .get_child("query", NS_ROSTER)
            .unwrap_or_else(|| panic!("a roster get without 'ver' returns the roster: {}", xml(&r)))
            .clone();
        assert!(
            q.attr("ver").is_some(),
            "versioning is advertised, so the roster carries 'ver': {}",
            xml(&q)
        );
        q
    }

    /// A roster set of one `<item/>`; returns the answer.
    async fn roster_set(&mut self, items: &str) -> Element {
        self.iq(
            "set",
            None,
            &format!("<query xmlns='{NS_ROSTER}'>{items}</query>"),
        )
        .await
    }

    /// Waits for a roster push about `contact` whose item satisfies `pred`; checks it is a valid
    /// push (RFC 6121 §2.1.6: addressed to this resource, from the bare JID or no 'from'),
    /// acknowledges it and returns (ver, item).
    async fn expect_push(
        &mut self,
        contact: &str,
        what: &str,
        pred: impl Fn(&Element) -> bool,
    ) -> (Option<String>, Element) {
        let iq = self
            .expect(&format!("roster push for {contact} ({what})"), |e| {
                push_item(e, contact).is_some_and(&pred)
            })
            .await;
        assert!(
            iq.attr("from").is_none() || iq.attr("from") == Some(self.user.as_str()),
            "a roster push comes from the account's bare JID or has no 'from': {}",
            xml(&iq)
        );
        assert!(
            iq.attr("to").is_none() || iq.attr("to") == Some(self.jid.as_str()),
            "a roster push is addressed to the resource: {}",
            xml(&iq)
        );
        let id = iq.attr("id").expect("a roster push has an id").to_string();
        self.send(&format!("<iq type='result' id='{id}'/>")).await;
        let q = iq.get_child("query", NS_ROSTER).expect("query");
        let item = push_item(&iq, contact).expect("item").clone();
        (q.attr("ver").map(str::to_string), item)
    }

    /// Closes the stream and waits for the server to close its side.
    async fn close(mut self) {
        self.send("</stream:stream>").await;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.raw.next_event()).await {
                Ok(Some(halyard::stream::StreamEvent::Close)) | Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(_) => panic!("{}: the server did not close the stream", self.jid),
            }
        }
    }
}

/// Subscribes `a` to `b` through the real flow: request, approval, both pushes, b's presence.
async fn subscribe_to(a: &mut Client, b: &mut Client) {
    let (ab, bb) = (a.user.clone(), b.user.clone());
    a.send(&format!("<presence type='subscribe' to='{bb}'/>"))
        .await;
    b.expect("subscription request", |e| {
        is_presence(e, Some("subscribe"), &ab)
    })
    .await;
    b.send(&format!("<presence type='subscribed' to='{ab}'/>"))
        .await;
    a.expect_push(&bb, "subscribed to", |i| {
        matches!(i.attr("subscription"), Some("to" | "both")) && i.attr("ask").is_none()
    })
    .await;
    b.expect_push(&ab, "subscriber", |i| {
        matches!(i.attr("subscription"), Some("from" | "both"))
    })
    .await;
    let bj = b.jid.clone();
    a.expect("the contact's presence after approval", |e| {
        is_presence(e, None, &bj)
    })
    .await;
}

/// Mutual subscription ('both'), then every in-flight stanza is forgotten.
async fn befriend(a: &mut Client, b: &mut Client) {
    subscribe_to(a, b).await;
    subscribe_to(b, a).await;
    tokio::join!(a.settle(), b.settle());
}

// --- Roster management (§2) ---

#[tokio::test]
async fn stream_features_after_auth_advertise_roster_versioning() {
    let s = server(&["alice"]).await;
    let c = Client::login(&s, "alice", "phone").await;
    let f = c.raw.features.as_ref().expect("features after auth");
    assert!(
        f.get_child("ver", NS_ROSTER_VER).is_some(),
        "urn:xmpp:features:rosterver is advertised: {}",
        xml(f)
    );
    assert!(
        f.get_child("sub", NS_PRE_APPROVAL).is_some(),
        "pre-approval is advertised: {}",
        xml(f)
    );
}

#[tokio::test]
async fn roster_get_set_update_remove_with_versioning_and_pushes_to_interested_resources() {
    let s = server(&["alice", "bob"]).await;
    let mut r1 = Client::login(&s, "alice", "r1").await;
    let mut r2 = Client::login(&s, "alice", "r2").await;
    // Bound, but never asks for the roster: not an interested resource.
    let mut r3 = Client::login(&s, "alice", "r3").await;
    let bob = bare("bob");

    // Empty roster, with a version.
    let q0 = r1.roster().await;
    assert!(
        items(&q0).is_empty(),
        "a new account's roster is empty: {}",
        xml(&q0)
    );
    let v0 = q0.attr("ver").expect("ver").to_string();
    assert!(items(&r2.roster().await).is_empty());

    // Add an item with a name and groups.
    let r = r1
        .roster_set(&format!(
            "<item jid='{bob}' name='Bob'><group>Friends</group><group>Work</group></item>"
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let mut vers = Vec::new();
    for c in [&mut r1, &mut r2] {
        let (ver, item) = c
            .expect_push(&bob, "added", |i| i.attr("name") == Some("Bob"))
            .await;
        assert_eq!(state(&item), (Some("none"), None, None), "{}", xml(&item));
        assert_eq!(groups(&item), ["Friends", "Work"]);
        vers.push(ver.expect("a push carries 'ver' when versioning is on"));
    }
    assert_eq!(vers[0], vers[1], "both resources get the same version");
    let v1 = vers[0].clone();
    assert_ne!(v1, v0, "a change makes a new version");
    r3.quiet(
        "roster push to a resource that never requested the roster",
        |e| e.get_child("query", NS_ROSTER).is_some(),
    )
    .await;

    // The roster now holds the item, at the pushed version.
    let q1 = r2.roster().await;
    assert_eq!(q1.attr("ver"), Some(v1.as_str()));
    let listed = items(&q1);
    assert_eq!(listed.len(), 1, "{}", xml(&q1));
    assert_eq!(listed[0].attr("jid"), Some(bob.as_str()));
    assert_eq!(listed[0].attr("name"), Some("Bob"));
    assert_eq!(listed[0].attr("subscription"), Some("none"));
    assert_eq!(groups(listed[0]), ["Friends", "Work"]);

    // §2.6.3: the current version gets an empty result; a stale one the whole roster.
    let r = r1.roster_get(Some(&v1)).await;
    assert_eq!(
        r.children().count(),
        0,
        "a get with the current ver gets an empty result: {}",
        xml(&r)
    );
    let r = r1.roster_get(Some(&v0)).await;
    let q = r
        .get_child("query", NS_ROSTER)
        .expect("a stale ver gets the roster");
    assert_eq!(items(q).len(), 1, "{}", xml(q));
    assert_eq!(q.attr("ver"), Some(v1.as_str()));
    // A roster get addressed to the account's own bare JID is the same as one without 'to'.
    let alice = bare("alice");
    let r = r1
        .iq(
            "get",
            Some(&alice),
            &format!("<query xmlns='{NS_ROSTER}'/>"),
        )
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let q = r.get_child("query", NS_ROSTER).expect("the roster");
    assert_eq!(items(q).len(), 1, "{}", xml(q));

    // A resource whose copy is current (empty result) is an interested resource all the same.
    let mut r4 = Client::login(&s, "alice", "r4").await;
    let r = r4.roster_get(Some(&v1)).await;
    assert_eq!(r.children().count(), 0, "{}", xml(&r));

    // Update name and groups, from the other resource.
    let r = r2
        .roster_set(&format!(
            "<item jid='{bob}' name='Bobby'><group>Family</group></item>"
        ))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let mut v2 = None;
    for c in [&mut r1, &mut r2, &mut r4] {
        let (ver, item) = c
            .expect_push(&bob, "renamed", |i| i.attr("name") == Some("Bobby"))
            .await;
        assert_eq!(
            groups(&item),
            ["Family"],
            "groups are replaced: {}",
            xml(&item)
        );
        assert_eq!(item.attr("subscription"), Some("none"));
        v2 = ver;
    }
    let v2 = v2.expect("ver");
    assert!(v2 != v1 && v2 != v0, "each change makes a new version");
    let q2 = r1.roster().await;
    assert_eq!(q2.attr("ver"), Some(v2.as_str()));
    let listed = items(&q2);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].attr("name"), Some("Bobby"));
    assert_eq!(groups(listed[0]), ["Family"]);

    // Remove: a push with subscription='remove' to every interested resource.
    let r = r1
        .roster_set(&format!("<item jid='{bob}' subscription='remove'/>"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    for c in [&mut r1, &mut r2, &mut r4] {
        let (ver, item) = c
            .expect_push(&bob, "removed", |i| {
                i.attr("subscription") == Some("remove")
            })
            .await;
        assert_eq!(item.children().count(), 0, "{}", xml(&item));
        let ver = ver.expect("ver");
        assert!(ver != v2 && ver != v1 && ver != v0);
    }
    r3.quiet(
        "roster push to a resource that never requested the roster",
        |e| e.get_child("query", NS_ROSTER).is_some(),
    )
    .await;
    let q3 = r2.roster().await;
    assert!(items(&q3).is_empty(), "{}", xml(&q3));
}

#[tokio::test]
async fn invalid_roster_sets_and_foreign_rosters_are_refused() {
    let s = server(&["alice", "bob", "carol"]).await;
    let mut a = Client::login(&s, "alice", "phone").await;
    let mut other = Client::login(&s, "alice", "laptop").await;
    a.roster().await;
    other.roster().await;
    let (alice, bob, carol) = (bare("alice"), bare("bob"), bare("carol"));

    let cases = [
        (
            format!("<item jid='{bob}'/><item jid='{carol}'/>"),
            Some("bad-request"),
            "two items",
        ),
        (format!("<item jid='{alice}'/>"), None, "the user's own JID"),
        (
            format!("<item jid='{bob}'><group>G</group><group>G</group></item>"),
            Some("bad-request"),
            "a duplicate group",
        ),
        (
            format!("<item jid='{bob}' subscription='remove'/>"),
            Some("item-not-found"),
            "removing an unknown item",
        ),
    ];
    for (items_xml, condition, what) in &cases {
        let r = a.roster_set(items_xml).await;
        assert_eq!(r.attr("type"), Some("error"), "{what}: {}", xml(&r));
        let got = stanza_error(&r);
        assert!(got.is_some(), "{what}: an error condition: {}", xml(&r));
        if let Some(c) = condition {
            assert_eq!(got.as_deref(), Some(*c), "{what}: {}", xml(&r));
        }
    }
    // None of them changed anything.
    other
        .quiet("roster push after a refused set", |e| {
            e.get_child("query", NS_ROSTER).is_some()
        })
        .await;
    let q = a.roster().await;
    assert!(items(&q).is_empty(), "{}", xml(&q));

    // Only the account itself may read or change its roster (§2.1.5).
    let r = a
        .iq("get", Some(&bob), &format!("<query xmlns='{NS_ROSTER}'/>"))
        .await;
    assert_eq!(
        r.attr("type"),
        Some("error"),
        "roster get addressed to another user: {}",
        xml(&r)
    );
    assert!(r
        .get_child("query", NS_ROSTER)
        .is_none_or(|q| items(q).is_empty()));
    assert!(stanza_error(&r).is_some(), "{}", xml(&r));
    let r = a
        .iq(
            "set",
            Some(&bob),
            &format!("<query xmlns='{NS_ROSTER}'><item jid='{carol}'/></query>"),
        )
        .await;
    assert_eq!(
        r.attr("type"),
        Some("error"),
        "roster set addressed to another user: {}",
        xml(&r)
    );
    let mut b = Client::login(&s, "bob", "desk").await;
    let q = b.roster().await;
    assert!(
        items(&q).is_empty(),
        "bob's roster is untouched: {}",
        xml(&q)
    );
}

// --- Subscriptions (§3) ---

#[tokio::test]
async fn subscription_flow_between_two_clients_ends_in_both() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut laptop = Client::start_with(
        &s,
        "bob",
        "laptop",
        "<presence><show>chat</show><status>on the laptop</status></presence>",
    )
    .await;
    let mut tablet = Client::start_with(
        &s,
        "bob",
        "tablet",
        "<presence><show>away</show><status>on the tablet</status></presence>",
    )
    .await;
    // Interested (it fetched the roster) but never available.
    let mut bg = Client::login(&s, "bob", "bg").await;
    bg.roster().await;
    let (ab, bb) = (alice.user.clone(), laptop.user.clone());

    // §3.1.2: alice asks; her roster shows the pending request.
    alice
        .send(&format!("<presence type='subscribe' to='{bb}'/>"))
        .await;
    let (_, item) = alice
        .expect_push(&bb, "pending out", |i| i.attr("ask") == Some("subscribe"))
        .await;
    assert_eq!(item.attr("subscription"), Some("none"), "{}", xml(&item));

    // §3.1.3: each of bob's available resources gets the request, from alice's bare JID.
    for b in [&mut laptop, &mut tablet] {
        let req = b
            .expect("subscription request", |e| {
                e.name() == "presence" && e.attr("type") == Some("subscribe")
            })
            .await;
        assert_eq!(
            req.attr("from"),
            Some(ab.as_str()),
            "subscription requests come from the bare JID: {}",
            xml(&req)
        );
    }
    // §2.2: subscription requests go to available resources only.
    bg.quiet(
        "subscription request to a resource that is not available",
        |e| e.name() == "presence" && e.attr("type") == Some("subscribe"),
    )
    .await;

    // §3.1.5: bob approves; every interested resource of his gets the push.
    laptop
        .send(&format!("<presence type='subscribed' to='{ab}'/>"))
        .await;
    for b in [&mut laptop, &mut tablet, &mut bg] {
        let (_, item) = b
            .expect_push(&ab, "approved", |i| i.attr("subscription") == Some("from"))
            .await;
        assert_eq!(state(&item), (Some("from"), None, None), "{}", xml(&item));
    }
    // §3.1.6: alice learns of it, her item becomes 'to', and she gets bob's current presence
    // from each of his available resources.
    let (ok_at, ok) = alice
        .expect_at("subscription approval", |e| {
            e.name() == "presence" && e.attr("type") == Some("subscribed")
        })
        .await;
    assert_eq!(ok.attr("from"), Some(bb.as_str()), "{}", xml(&ok));
    let (_, item) = alice
        .expect_push(&bb, "subscribed", |i| i.attr("subscription") == Some("to"))
        .await;
    assert_eq!(state(&item), (Some("to"), None, None), "{}", xml(&item));
    for (res, show, status) in [
        ("laptop", "chat", "on the laptop"),
        ("tablet", "away", "on the tablet"),
    ] {
        let from = format!("{bb}/{res}");
        let (p_at, p) = alice
            .expect_at(&format!("presence of {from}"), |e| {
                is_presence(e, None, &from)
            })
            .await;
        assert!(
            ok_at < p_at,
            "'subscribed' comes before the contact's presence (§3.1.5)"
        );
        assert_eq!(child_text(&p, "show").as_deref(), Some(show), "{}", xml(&p));
        assert_eq!(child_text(&p, "status").as_deref(), Some(status));
    }

    // Bob subscribes back (to alice's full JID: treated as her bare JID, §3.1.2); alice approves.
    tablet
        .send(&format!("<presence type='subscribe' to='{}'/>", alice.jid))
        .await;
    for b in [&mut laptop, &mut tablet, &mut bg] {
        let (_, item) = b
            .expect_push(&ab, "from + pending out", |i| {
                i.attr("ask") == Some("subscribe")
            })
            .await;
        assert_eq!(item.attr("subscription"), Some("from"), "{}", xml(&item));
    }
    let req = alice
        .expect("subscription request", |e| {
            e.name() == "presence" && e.attr("type") == Some("subscribe")
        })
        .await;
    assert_eq!(req.attr("from"), Some(bb.as_str()), "{}", xml(&req));
    assert_eq!(
        req.attr("to"),
        Some(ab.as_str()),
        "the request is addressed to the bare JID: {}",
        xml(&req)
    );
    alice
        .send(&format!("<presence type='subscribed' to='{bb}'/>"))
        .await;
    let (_, item) = alice
        .expect_push(&bb, "both", |i| i.attr("subscription") == Some("both"))
        .await;
    assert_eq!(state(&item), (Some("both"), None, None), "{}", xml(&item));
    let aj = alice.jid.clone();
    for b in [&mut laptop, &mut tablet, &mut bg] {
        b.expect("subscription approval", |e| {
            is_presence(e, Some("subscribed"), &ab)
        })
        .await;
        let (_, item) = b
            .expect_push(&ab, "both", |i| i.attr("subscription") == Some("both"))
            .await;
        assert_eq!(state(&item), (Some("both"), None, None), "{}", xml(&item));
    }
    for b in [&mut laptop, &mut tablet] {
        b.expect("alice's presence after approval", |e| {
            is_presence(e, None, &aj)
        })
        .await;
    }

    // The stored rosters agree.
    let q = alice.roster().await;
    assert_eq!(
        items(&q).iter().map(|i| state(i)).collect::<Vec<_>>(),
        [(Some("both"), None, None)],
        "{}",
        xml(&q)
    );
    let q = laptop.roster().await;
    assert_eq!(
        items(&q).iter().map(|i| state(i)).collect::<Vec<_>>(),
        [(Some("both"), None, None)],
        "{}",
        xml(&q)
    );

    // Presence now flows both ways.
    tokio::join!(alice.settle(), laptop.settle(), tablet.settle());
    alice
        .available("<presence><show>away</show></presence>")
        .await;
    for b in [&mut laptop, &mut tablet] {
        let p = b
            .expect("alice's update", |e| is_presence(e, None, &aj))
            .await;
        assert_eq!(
            child_text(&p, "show").as_deref(),
            Some("away"),
            "{}",
            xml(&p)
        );
    }
    laptop
        .available("<presence><show>dnd</show><status>busy</status></presence>")
        .await;
    let lj = laptop.jid.clone();
    let p = alice
        .expect("bob's update", |e| is_presence(e, None, &lj))
        .await;
    assert_eq!(
        child_text(&p, "show").as_deref(),
        Some("dnd"),
        "{}",
        xml(&p)
    );
    assert_eq!(child_text(&p, "status").as_deref(), Some("busy"));
}

#[tokio::test]
async fn request_to_offline_user_is_delivered_at_each_login_until_answered() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let (ab, bb) = (alice.user.clone(), bare("bob"));
    alice
        .send(&format!(
            "<presence type='subscribe' to='{bb}'><status>it is alice</status></presence>"
        ))
        .await;
    alice
        .expect_push(&bb, "pending out", |i| i.attr("ask") == Some("subscribe"))
        .await;
    let is_request = |e: &Element| is_presence(e, Some("subscribe"), &ab);

    // Bob logs in: the request comes after his initial presence.
    let mut bob = Client::login(&s, "bob", "laptop").await;
    bob.roster().await;
    bob.quiet("subscription request before initial presence", is_request)
        .await;
    bob.available("<presence/>").await;
    let req = bob
        .expect("the stored subscription request", is_request)
        .await;
    assert_eq!(
        child_text(&req, "status").as_deref(),
        Some("it is alice"),
        "the request is delivered as sent: {}",
        xml(&req)
    );
    bob.close().await;

    // Not answered: delivered again at the next login.
    let mut bob = Client::start(&s, "bob", "laptop").await;
    bob.expect("the request again", is_request).await;

    // Answered: alice gets the approval, and the request is gone.
    bob.send(&format!("<presence type='subscribed' to='{ab}'/>"))
        .await;
    alice
        .expect("subscription approval", |e| {
            is_presence(e, Some("subscribed"), &bb)
        })
        .await;
    alice
        .expect_push(&bb, "subscribed", |i| i.attr("subscription") == Some("to"))
        .await;
    bob.close().await;
    let mut bob = Client::start(&s, "bob", "tablet").await;
    bob.quiet("an answered request delivered again", is_request)
        .await;
}

#[tokio::test]
async fn refusing_a_request_with_unsubscribed() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    let (ab, bb) = (alice.user.clone(), bob.user.clone());
    alice
        .send(&format!("<presence type='subscribe' to='{bb}'/>"))
        .await;
    alice
        .expect_push(&bb, "pending out", |i| i.attr("ask") == Some("subscribe"))
        .await;
    let is_request = |e: &Element| is_presence(e, Some("subscribe"), &ab);
    bob.expect("subscription request", is_request).await;

    // Seen online but not answered: delivered again at the next login (§3.1.3).
    bob.close().await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    bob.expect("the unanswered request again", is_request).await;

    bob.send(&format!("<presence type='unsubscribed' to='{ab}'/>"))
        .await;
    alice
        .expect("the refusal", |e| is_presence(e, Some("unsubscribed"), &bb))
        .await;
    let (_, item) = alice
        .expect_push(&bb, "no longer pending", |i| i.attr("ask").is_none())
        .await;
    assert_eq!(state(&item), (Some("none"), None, None), "{}", xml(&item));
    alice
        .quiet("bob's presence after a refusal", |e| {
            e.name() == "presence" && e.attr("type").is_none()
        })
        .await;

    // The refused request is not delivered again.
    bob.close().await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    bob.quiet("a refused request delivered again", is_request)
        .await;
}

#[tokio::test]
async fn removing_a_contact_withdraws_a_pending_request() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let (ab, bb) = (alice.user.clone(), bare("bob"));
    alice
        .send(&format!("<presence type='subscribe' to='{bb}'/>"))
        .await;
    alice
        .expect_push(&bb, "pending out", |i| i.attr("ask") == Some("subscribe"))
        .await;
    // Bob is offline; alice changes her mind and removes him.
    let r = alice
        .roster_set(&format!("<item jid='{bb}' subscription='remove'/>"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    alice
        .expect_push(&bb, "remove", |i| i.attr("subscription") == Some("remove"))
        .await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    bob.quiet("a withdrawn subscription request", |e| {
        is_presence(e, Some("subscribe"), &ab)
    })
    .await;
    let q = bob.roster().await;
    assert!(
        items(&q)
            .iter()
            .all(|i| i.attr("ask").is_none()
                && !matches!(i.attr("subscription"), Some("from" | "both"))),
        "{}",
        xml(&q)
    );
}

#[tokio::test]
async fn unsubscribe_and_unsubscribed_fall_back_to_none() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    befriend(&mut alice, &mut bob).await;
    let (ab, bb, aj, bj) = (
        alice.user.clone(),
        bob.user.clone(),
        alice.jid.clone(),
        bob.jid.clone(),
    );

    // §3.3: alice unsubscribes from bob's presence: alice 'from', bob 'to'; alice gets
    // unavailable from bob's resources.
    alice
        .send(&format!("<presence type='unsubscribe' to='{bb}'/>"))
        .await;
    let (_, item) = alice
        .expect_push(&bb, "from", |i| i.attr("subscription") == Some("from"))
        .await;
    assert_eq!(state(&item), (Some("from"), None, None), "{}", xml(&item));
    bob.expect("unsubscribe", |e| is_presence(e, Some("unsubscribe"), &ab))
        .await;
    let (_, item) = bob
        .expect_push(&ab, "to", |i| i.attr("subscription") == Some("to"))
        .await;
    assert_eq!(state(&item), (Some("to"), None, None), "{}", xml(&item));
    alice
        .expect("bob's unavailable", |e| {
            is_presence(e, Some("unavailable"), &bj)
        })
        .await;

    // Bob's presence no longer reaches alice; alice's still reaches bob.
    bob.available("<presence><show>dnd</show></presence>").await;
    alice
        .quiet("bob's presence after unsubscribing", |e| {
            is_presence(e, None, &bj)
        })
        .await;
    alice
        .available("<presence><show>chat</show></presence>")
        .await;
    bob.expect("alice's presence", |e| is_presence(e, None, &aj))
        .await;

    // §3.2: alice cancels bob's subscription: bob gets unavailable from alice, then both 'none'.
    alice
        .send(&format!("<presence type='unsubscribed' to='{bb}'/>"))
        .await;
    let (_, item) = alice
        .expect_push(&bb, "none", |i| i.attr("subscription") == Some("none"))
        .await;
    assert_eq!(state(&item), (Some("none"), None, None), "{}", xml(&item));
    bob.expect("alice's unavailable", |e| {
        is_presence(e, Some("unavailable"), &aj)
    })
    .await;
    bob.expect("unsubscribed", |e| {
        is_presence(e, Some("unsubscribed"), &ab)
    })
    .await;
    let (_, item) = bob
        .expect_push(&ab, "none", |i| i.attr("subscription") == Some("none"))
        .await;
    assert_eq!(state(&item), (Some("none"), None, None), "{}", xml(&item));

    alice
        .available("<presence><show>xa</show></presence>")
        .await;
    bob.quiet(
        "alice's presence after the subscription was cancelled",
        |e| is_presence(e, None, &aj),
    )
    .await;
    for c in [&mut alice, &mut bob] {
        let q = c.roster().await;
        assert_eq!(
            items(&q).iter().map(|i| state(i)).collect::<Vec<_>>(),
            [(Some("none"), None, None)],
            "{}",
            xml(&q)
        );
    }
}

#[tokio::test]
async fn removing_a_both_contact_cancels_both_subscriptions() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    befriend(&mut alice, &mut bob).await;
    let (ab, bb, aj, bj) = (
        alice.user.clone(),
        bob.user.clone(),
        alice.jid.clone(),
        bob.jid.clone(),
    );

    let r = alice
        .roster_set(&format!("<item jid='{bb}' subscription='remove'/>"))
        .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    alice
        .expect_push(&bb, "remove", |i| i.attr("subscription") == Some("remove"))
        .await;
    // §2.5.2: as if alice had sent unsubscribe and unsubscribed.
    alice
        .expect("bob's unavailable", |e| {
            is_presence(e, Some("unavailable"), &bj)
        })
        .await;
    bob.expect("unsubscribe", |e| is_presence(e, Some("unsubscribe"), &ab))
        .await;
    bob.expect("unsubscribed", |e| {
        is_presence(e, Some("unsubscribed"), &ab)
    })
    .await;
    bob.expect("alice's unavailable", |e| {
        is_presence(e, Some("unavailable"), &aj)
    })
    .await;
    let (_, item) = bob
        .expect_push(&ab, "none", |i| i.attr("subscription") == Some("none"))
        .await;
    assert_eq!(state(&item), (Some("none"), None, None), "{}", xml(&item));

    let q = alice.roster().await;
    assert!(items(&q).is_empty(), "{}", xml(&q));
    let q = bob.roster().await;
    assert_eq!(
        items(&q).iter().map(|i| state(i)).collect::<Vec<_>>(),
        [(Some("none"), None, None)],
        "{}",
        xml(&q)
    );

    // No presence flows any more, either way.
    alice
        .available("<presence><show>away</show></presence>")
        .await;
    bob.available("<presence><show>away</show></presence>")
        .await;
    bob.quiet("alice's presence after the removal", |e| {
        is_presence(e, None, &aj)
    })
    .await;
    alice
        .quiet("bob's presence after the removal", |e| {
            is_presence(e, None, &bj)
        })
        .await;
}

#[tokio::test]
async fn pre_approval_auto_approves_a_later_request() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start_with(
        &s,
        "bob",
        "laptop",
        "<presence><status>pre-approving</status></presence>",
    )
    .await;
    let (ab, bb, bj) = (alice.user.clone(), bob.user.clone(), bob.jid.clone());

    // §3.4: a 'subscribed' without a pending request is a pre-approval.
    bob.send(&format!("<presence type='subscribed' to='{ab}'/>"))
        .await;
    let (_, item) = bob
        .expect_push(&ab, "pre-approved", |i| i.attr("approved") == Some("true"))
        .await;
    assert_eq!(
        state(&item),
        (Some("none"), None, Some("true")),
        "{}",
        xml(&item)
    );
    alice
        .quiet("a routed pre-approval", |e| {
            e.name() == "presence" && e.attr("type") == Some("subscribed")
        })
        .await;

    // Alice's later request is approved without bob doing anything.
    alice
        .send(&format!("<presence type='subscribe' to='{bb}'/>"))
        .await;
    alice
        .expect("automatic approval", |e| {
            is_presence(e, Some("subscribed"), &bb)
        })
        .await;
    let (_, item) = alice
        .expect_push(&bb, "subscribed", |i| i.attr("subscription") == Some("to"))
        .await;
    assert_eq!(state(&item), (Some("to"), None, None), "{}", xml(&item));
    let p = alice
        .expect("bob's presence", |e| is_presence(e, None, &bj))
        .await;
    assert_eq!(child_text(&p, "status").as_deref(), Some("pre-approving"));
    let (_, item) = bob
        .expect_push(&ab, "subscriber", |i| {
            i.attr("subscription") == Some("from")
        })
        .await;
    assert_eq!(
        state(&item),
        (Some("from"), None, None),
        "the pre-approval is used up: {}",
        xml(&item)
    );
    bob.quiet("a request that was pre-approved", |e| {
        is_presence(e, Some("subscribe"), &ab)
    })
    .await;
}

// --- Presence (§4) ---

#[tokio::test]
async fn initial_presence_is_broadcast_and_answered_with_contacts_presence() {
    let s = server(&["alice", "bob", "carol"]).await;
    let mut alice = Client::start_with(
        &s,
        "alice",
        "phone",
        "<presence><show>chat</show><status>at home</status></presence>",
    )
    .await;
    let mut laptop = Client::start(&s, "bob", "laptop").await;
    let mut carol = Client::start(&s, "carol", "desk").await;
    befriend(&mut alice, &mut laptop).await;

    // Bob's second resource: roster, then initial presence.
    let mut tablet = Client::login(&s, "bob", "tablet").await;
    tablet.roster().await;
    tablet
        .available("<presence><show>xa</show><status>tablet here</status></presence>")
        .await;
    let tj = tablet.jid.clone();

    // §4.2.2: alice (subscribed to bob) and bob's other resource get it.
    let p = alice
        .expect("bob's initial presence", |e| is_presence(e, None, &tj))
        .await;
    assert_eq!(child_text(&p, "show").as_deref(), Some("xa"), "{}", xml(&p));
    assert_eq!(child_text(&p, "status").as_deref(), Some("tablet here"));
    let p = laptop
        .expect("the new resource's presence", |e| is_presence(e, None, &tj))
        .await;
    assert_eq!(child_text(&p, "show").as_deref(), Some("xa"), "{}", xml(&p));
    // §4.2.3/§4.3: the implicit probe brings alice's current presence to the new resource.
    let aj = alice.jid.clone();
    let p = tablet
        .expect("alice's current presence", |e| is_presence(e, None, &aj))
        .await;
    assert_eq!(
        child_text(&p, "show").as_deref(),
        Some("chat"),
        "{}",
        xml(&p)
    );
    assert_eq!(child_text(&p, "status").as_deref(), Some("at home"));
    // Carol has no subscription: she hears nothing.
    carol
        .quiet("presence of a user carol is not subscribed to", |e| {
            e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with("bob@"))
        })
        .await;
}

#[tokio::test]
async fn clean_logout_sends_unavailable_to_contacts_and_own_resources() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut laptop = Client::start(&s, "bob", "laptop").await;
    befriend(&mut alice, &mut laptop).await;
    let mut tablet = Client::start(&s, "bob", "tablet").await;
    let lj = laptop.jid.clone();
    laptop.close().await;
    for c in [&mut alice, &mut tablet] {
        c.expect("unavailable after a clean logout", |e| {
            is_presence(e, Some("unavailable"), &lj)
        })
        .await;
    }

    // An explicit unavailable, then the close: one unavailable, not two.
    let tj = tablet.jid.clone();
    tablet
        .send("<presence type='unavailable'><status>gone fishing</status></presence>")
        .await;
    let p = alice
        .expect("explicit unavailable", |e| {
            is_presence(e, Some("unavailable"), &tj)
        })
        .await;
    assert_eq!(child_text(&p, "status").as_deref(), Some("gone fishing"));
    tablet.close().await;
    alice
        .quiet("a second unavailable", |e| {
            is_presence(e, Some("unavailable"), &tj)
        })
        .await;
}

#[tokio::test]
async fn lost_connection_sends_unavailable_to_contacts() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start(&s, "bob", "laptop").await;
    befriend(&mut alice, &mut bob).await;
    let bj = bob.jid.clone();
    // The TCP connection goes away without a closing stream tag.
    drop(bob);
    alice
        .expect("unavailable after a lost connection", |e| {
            is_presence(e, Some("unavailable"), &bj)
        })
        .await;
}

#[tokio::test]
async fn directed_presence_from_a_stranger_and_its_unavailable_at_session_end() {
    let s = server(&["alice", "carol", "dave"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let aj = alice.jid.clone();

    // Carol (available, no subscription) sends directed presence, then logs out cleanly.
    let mut carol = Client::start(&s, "carol", "desk").await;
    let cj = carol.jid.clone();
    carol
        .send(&format!(
            "<presence to='{aj}'><status>hi alice</status></presence>"
        ))
        .await;
    let p = alice
        .expect("carol's directed presence", |e| is_presence(e, None, &cj))
        .await;
    assert_eq!(
        child_text(&p, "status").as_deref(),
        Some("hi alice"),
        "{}",
        xml(&p)
    );
    carol.close().await;
    alice
        .expect("carol's unavailable at session end", |e| {
            is_presence(e, Some("unavailable"), &cj)
        })
        .await;

    // Dave (available, no subscription either) loses his connection after a directed presence.
    let mut dave = Client::start(&s, "dave", "pad").await;
    let dj = dave.jid.clone();
    dave.send(&format!("<presence to='{aj}'/>")).await;
    alice
        .expect("dave's directed presence", |e| is_presence(e, None, &dj))
        .await;
    drop(dave);
    alice
        .expect("dave's unavailable after a lost connection", |e| {
            is_presence(e, Some("unavailable"), &dj)
        })
        .await;
}

#[tokio::test]
async fn probes_are_answered_for_subscribers_only() {
    let s = server(&["alice", "bob", "dave"]).await;
    let mut alice = Client::start_with(
        &s,
        "alice",
        "phone",
        "<presence><status>probe me</status></presence>",
    )
    .await;
    let mut dave = Client::start(&s, "dave", "pad").await;
    let (ab, aj) = (alice.user.clone(), alice.jid.clone());

    // No subscription: nothing comes back.
    dave.send(&format!("<presence type='probe' to='{ab}'/>"))
        .await;
    dave.quiet("an answer to an unauthorized probe", |e| {
        e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with("alice@"))
    })
    .await;

    // Control: a subscriber's probe is answered with alice's current presence.
    let mut bob = Client::start(&s, "bob", "laptop").await;
    subscribe_to(&mut bob, &mut alice).await;
    bob.settle().await;
    bob.send(&format!("<presence type='probe' to='{ab}'/>"))
        .await;
    let p = bob
        .expect("the answer to a subscriber's probe", |e| {
            is_presence(e, None, &aj)
        })
        .await;
    assert_eq!(
        child_text(&p, "status").as_deref(),
        Some("probe me"),
        "{}",
        xml(&p)
    );

    // Alice offline: a subscriber's probe gets an unavailable presence (§4.3.2).
    alice.close().await;
    bob.expect("alice's unavailable", |e| {
        is_presence(e, Some("unavailable"), &aj)
    })
    .await;
    bob.settle().await;
    bob.send(&format!("<presence type='probe' to='{ab}'/>"))
        .await;
    let p = bob
        .expect("the answer to a probe of an offline contact", |e| {
            e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with(ab.as_str()))
        })
        .await;
    assert_eq!(p.attr("type"), Some("unavailable"), "{}", xml(&p));
    dave.quiet("an answer to an unauthorized probe", |e| {
        e.name() == "presence" && e.attr("from").is_some_and(|f| f.starts_with("alice@"))
    })
    .await;
}

#[tokio::test]
async fn a_session_replaced_by_a_conflicting_login_ends_with_unavailable() {
    let s = server(&["alice", "bob"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut bob = Client::start_with(
        &s,
        "bob",
        "laptop",
        "<presence><status>old session</status></presence>",
    )
    .await;
    befriend(&mut alice, &mut bob).await;
    let bj = bob.jid.clone();

    // A new login binds the same resource: the old session is closed with <conflict/>
    // (RFC 6120 §7.7.2.2). That session ended, so its presence must be withdrawn
    // (RFC 6121 §4.5.2); the new one sends no presence and logs out too.
    let replacement = Client::login(&s, "bob", "laptop").await;
    let cond = bob.raw.expect_stream_error().await;
    assert_eq!(cond, "conflict");
    replacement.close().await;
    // By now both sessions of bob@localhost/laptop are gone: alice must have been told.
    alice
        .expect("unavailable for bob's ended session(s)", |e| {
            is_presence(e, Some("unavailable"), &bj)
        })
        .await;
}

/// Issue 7: `℻@localhost` prepares to `FAX@localhost`, which prepares to `fax@localhost`, so it
/// would print as another account's JID. A roster set with it is refused with `jid-malformed`
/// and stores nothing; a message to it bounces with `jid-malformed`.
#[tokio::test]
async fn unstable_jids_are_refused_not_stored_or_routed() {
    let s = server(&["alice", "fax"]).await;
    let mut alice = Client::start(&s, "alice", "phone").await;
    let mut fax = Client::start(&s, "fax", "desk").await;

    let r = alice.roster_set("<item jid='\u{213b}@localhost'/>").await;
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(&r));
    assert_eq!(
        stanza_error(&r).as_deref(),
        Some("jid-malformed"),
        "{}",
        xml(&r)
    );
    let q = alice.roster().await;
    assert!(items(&q).is_empty(), "nothing stored: {}", xml(&q));

    alice
        .send("<message to='\u{213b}@localhost' type='chat' id='fax1'><body>x</body></message>")
        .await;
    let e = alice
        .expect("the bounce", |e| {
            e.name() == "message" && e.attr("id") == Some("fax1")
        })
        .await;
    assert_eq!(e.attr("type"), Some("error"), "{}", xml(&e));
    assert_eq!(
        stanza_error(&e).as_deref(),
        Some("jid-malformed"),
        "{}",
        xml(&e)
    );
    fax.quiet("no message for fax@localhost", |e| e.name() == "message")
        .await;
}
