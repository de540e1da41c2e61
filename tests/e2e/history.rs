//! Message history over real sockets: XEP-0313 archives (with XEP-0059 paging, XEP-0359
//! stanza-ids and XEP-0441 preferences), XEP-0334 storage hints, XEP-0160 offline messages with
//! XEP-0203 stamps, XEP-0280 carbons, archive retention and the admin archive commands.
//! (Crash safety of the same data is durability.rs's.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use halyard::admin::Request;
use halyard::config::Config;
use halyard::stream::StreamEvent;
use minidom::Element;

use super::common::*;

const PW: &str = "pw";

const MAM: &str = "urn:xmpp:mam:2";
const MAM_EXTENDED: &str = "urn:xmpp:mam:2#extended";
const RSM: &str = "http://jabber.org/protocol/rsm";
const SID: &str = "urn:xmpp:sid:0";
const FORWARD: &str = "urn:xmpp:forward:0";
const DELAY: &str = "urn:xmpp:delay";
const DATA: &str = "jabber:x:data";
const CARBONS: &str = "urn:xmpp:carbons:2";
const ROSTER: &str = "jabber:iq:roster";
const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

// --- Harness ----------------------------------------------------------------------------------

/// A server (tweaked by `tweak`) with `users` registered (password [`PW`]).
async fn server_cfg(users: &[&str], tweak: impl FnOnce(&mut Config)) -> TestServer {
    let s = TestServer::start_with(tweak).await;
    for u in users {
        s.add_user(u, PW).await;
    }
    s
}

async fn server_with(users: &[&str]) -> TestServer {
    server_cfg(users, |_| {}).await
}

/// A bound session without presence.
async fn bound(s: &TestServer, user: &str, res: &str) -> RawClient {
    RawClient::login(s, user, PW, res).await
}

/// Waits until every stanza `c` sent before has been processed (a session's stanzas are handled
/// in order); whatever arrives in between is discarded.
async fn sync(c: &mut RawClient, tag: &str) {
    let id = format!("sync-{tag}");
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id.as_str()))
        .await;
}

/// Like [`sync`], but returns the non-presence elements that arrived before the answer: errors
/// bounced for stanzas sent earlier arrive there.
async fn settle(c: &mut RawClient, tag: &str) -> Vec<Element> {
    let id = format!("settle-{tag}");
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let mut got = Vec::new();
    loop {
        let e = c.recv().await;
        if e.name() == "iq" && e.attr("id") == Some(id.as_str()) {
            return got;
        }
        if e.name() != "presence" {
            got.push(e);
        }
    }
}

/// Everything that arrives at `c` up to its own round trip and within [`QUIET`] after it.
async fn drain(c: &mut RawClient, tag: &str) -> Vec<Element> {
    let mut got = settle(c, tag).await;
    got.extend(non_presence_within(c, QUIET).await);
    got
}

/// A bound session that has sent initial presence (processed).
async fn online(s: &TestServer, user: &str, res: &str) -> RawClient {
    let mut c = bound(s, user, res).await;
    c.send("<presence/>").await;
    sync(&mut c, "online").await;
    c
}

/// Closes the stream and waits for the server's close: the session is unbound by then.
async fn logout(mut c: RawClient) {
    c.send("</stream:stream>").await;
    while let Some(ev) = c.next_event().await {
        if matches!(ev, StreamEvent::Close) {
            break;
        }
    }
}

async fn send_chat(c: &mut RawClient, to: &str, id: &str, text: &str) {
    c.send(&format!(
        "<message to='{to}' type='chat' id='{id}'><body>{text}</body></message>"
    ))
    .await;
}

/// The next message (presence and iqs are skipped).
async fn recv_msg(c: &mut RawClient) -> Element {
    c.recv_until(|e| e.name() == "message").await
}

/// `from` sends a chat with `text` to `to`; `rcpt` receives it. Returns the delivered copy.
async fn exchange(
    from: &mut RawClient,
    rcpt: &mut RawClient,
    to: &str,
    id: &str,
    text: &str,
) -> Element {
    send_chat(from, to, id, text).await;
    let got = recv_msg(rcpt).await;
    assert_eq!(body(&got).as_deref(), Some(text), "{}", xml(&got));
    got
}

/// The ids of the `<stanza-id xmlns='urn:xmpp:sid:0'/>` children claimed `by` this JID.
fn stanza_ids(el: &Element, by: &str) -> Vec<String> {
    el.children()
        .filter(|c| c.is("stanza-id", SID) && c.attr("by") == Some(by))
        .map(|c| c.attr("id").unwrap_or_default().to_string())
        .collect()
}

/// Sends an iq from `c` and returns its answer (result or error).
async fn iq(c: &mut RawClient, id: &str, iq_xml: &str) -> Element {
    c.send(iq_xml).await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
        .await
}

/// Microseconds since the epoch of an XEP-0082 UTC DateTime (`CCYY-MM-DDThh:mm:ss[.sss]Z`),
/// parsed here independently of the server's code.
fn parse_utc(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from civil (proleptic Gregorian).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1])
    } else {
        (d[0], d[1])
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d[2] - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1_000_000 + micros)
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64
}

// --- Archive queries --------------------------------------------------------------------------

/// One archived message as a query returned it.
struct Item {
    id: String,
    stamp: String,
    msg: Element,
}

/// The answer to a query: the results (in transmission order) and the `<fin/>`.
struct Answer {
    items: Vec<Item>,
    fin: Element,
}

impl Answer {
    fn ids(&self) -> Vec<String> {
        self.items.iter().map(|i| i.id.clone()).collect()
    }
    fn bodies(&self) -> Vec<String> {
        self.items
            .iter()
            .map(|i| body(&i.msg).unwrap_or_default())
            .collect()
    }
    fn complete(&self) -> bool {
        self.fin.attr("complete") == Some("true")
    }
    fn set(&self) -> &Element {
        self.fin
            .get_child("set", RSM)
            .unwrap_or_else(|| panic!("<fin/> carries an RSM <set/>: {}", xml(&self.fin)))
    }
    fn count(&self) -> Option<u64> {
        self.set().get_child("count", RSM).map(|c| {
            c.text()
                .parse()
                .unwrap_or_else(|_| panic!("count: {}", xml(c)))
        })
    }
    fn first(&self) -> Option<String> {
        self.set().get_child("first", RSM).map(|f| f.text())
    }
    fn first_index(&self) -> Option<u64> {
        self.set()
            .get_child("first", RSM)
            .and_then(|f| f.attr("index"))
            .map(|i| i.parse().expect("numeric index"))
    }
    fn last(&self) -> Option<String> {
        self.set().get_child("last", RSM).map(|l| l.text())
    }
    /// RSM `first`/`last` name the page's first and last results (chronologically), and an
    /// optional `first@index` is the first result's position in the whole result set.
    fn check_page(&self, ids: &[String], index_of_first: Option<u64>) {
        assert_eq!(self.ids(), ids, "page ids");
        assert_eq!(self.first(), ids.first().cloned(), "RSM <first/>");
        assert_eq!(self.last(), ids.last().cloned(), "RSM <last/>");
        if let (Some(got), Some(want)) = (self.first_index(), index_of_first) {
            assert_eq!(
                got, want,
                "first@index, when given, is the position in the set"
            );
        }
    }
}

/// `<x type='submit'/>` with FORM_TYPE and `fields`; a value with spaces is several `<value/>`s.
fn form_xml(fields: &[(&str, &str)]) -> String {
    if fields.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "<x xmlns='{DATA}' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>"
    );
    for (var, v) in fields {
        s.push_str(&format!("<field var='{var}'>"));
        for one in v.split_whitespace() {
            s.push_str(&format!("<value>{one}</value>"));
        }
        s.push_str("</field>");
    }
    s.push_str("</x>");
    s
}

/// Queries `c`'s own archive: the form `fields`, the RSM `<set/>` content `rsm` (none when
/// empty) and `extra` children (e.g. `<flip-page/>`). Checks that every result is a
/// `<message><result queryid id><forwarded><delay stamp/><message/></forwarded></result>` sent
/// before the iq result. `Err(condition)` for an error.
async fn mam(
    c: &mut RawClient,
    fields: &[(&str, &str)],
    rsm: &str,
    extra: &str,
) -> Result<Answer, String> {
    mam_to(c, None, fields, rsm, extra).await
}

async fn mam_to(
    c: &mut RawClient,
    to: Option<&str>,
    fields: &[(&str, &str)],
    rsm: &str,
    extra: &str,
) -> Result<Answer, String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let qid = format!("mq{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let set = if rsm.is_empty() {
        String::new()
    } else {
        format!("<set xmlns='{RSM}'>{rsm}</set>")
    };
    let to = to.map(|t| format!(" to='{t}'")).unwrap_or_default();
    c.send(&format!(
        "<iq type='set' id='{qid}'{to}><query xmlns='{MAM}' queryid='{qid}'>{}{set}{extra}</query></iq>",
        form_xml(fields)
    ))
    .await;
    let mut items = Vec::new();
    loop {
        let el = c.recv().await;
        if el.name() == "presence" {
            continue;
        }
        if el.name() == "iq" && el.attr("id") == Some(qid.as_str()) {
            return match el.attr("type") {
                Some("result") => {
                    let fin = el
                        .get_child("fin", MAM)
                        .unwrap_or_else(|| panic!("the iq result carries <fin/>: {}", xml(&el)))
                        .clone();
                    Ok(Answer { items, fin })
                }
                Some("error") => {
                    assert!(items.is_empty(), "no results before an error: {}", xml(&el));
                    Err(stanza_error(&el).unwrap_or_else(|| panic!("condition in {}", xml(&el))))
                }
                _ => panic!("unexpected answer {}", xml(&el)),
            };
        }
        let r = el
            .get_child("result", MAM)
            .filter(|_| el.name() == "message")
            .unwrap_or_else(|| panic!("unexpected stanza during a query: {}", xml(&el)));
        assert_eq!(r.attr("queryid"), Some(qid.as_str()), "{}", xml(&el));
        if let (Some(from), Some(to)) = (el.attr("from"), el.attr("to")) {
            assert_eq!(
                Some(from),
                to.split('/').next(),
                "results come from the archive (the owner's bare JID): {}",
                xml(&el)
            );
        }
        let id = r
            .attr("id")
            .unwrap_or_else(|| panic!("result id: {}", xml(&el)))
            .to_string();
        let fwd = r
            .get_child("forwarded", FORWARD)
            .unwrap_or_else(|| panic!("forwarded: {}", xml(&el)));
        let stamp = fwd
            .get_child("delay", DELAY)
            .and_then(|d| d.attr("stamp"))
            .unwrap_or_else(|| panic!("delay stamp: {}", xml(&el)))
            .to_string();
        assert!(
            parse_utc(&stamp).is_some(),
            "stamp {stamp:?} is an XEP-0082 UTC DateTime"
        );
        let msg = fwd
            .get_child("message", NS_CLIENT)
            .unwrap_or_else(|| panic!("forwarded message: {}", xml(&el)))
            .clone();
        items.push(Item { id, stamp, msg });
    }
}

/// `c`'s whole archive (which must fit one page of 100), oldest first.
async fn archive(c: &mut RawClient) -> Answer {
    let a = mam(c, &[], "<max>100</max>", "")
        .await
        .expect("archive query");
    assert!(a.complete(), "whole archive in one page: {}", xml(&a.fin));
    a
}

async fn archive_bodies(c: &mut RawClient) -> Vec<String> {
    archive(c).await.bodies()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// --- Archiving ---------------------------------------------------------------------------------

#[tokio::test]
async fn chat_is_archived_on_both_sides_with_stanza_ids() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;

    // A client may not hand out ids in bob's archive's name (XEP-0359 §3): the forged one goes.
    alice
        .send("<message to='bob@localhost' type='chat' id='m1'><body>hello</body><origin-id xmlns='urn:xmpp:sid:0' id='orig-1'/><stanza-id xmlns='urn:xmpp:sid:0' by='bob@localhost' id='forged-1'/></message>")
        .await;
    let got = recv_msg(&mut bob).await;
    assert_eq!(body(&got).as_deref(), Some("hello"));
    let bob_sids = stanza_ids(&got, "bob@localhost");
    assert_eq!(
        bob_sids.len(),
        1,
        "exactly one stanza-id by bob's archive: {}",
        xml(&got)
    );
    let x = bob_sids[0].clone();
    assert_ne!(x, "forged-1", "the forged stanza-id is stripped");
    assert!(!x.is_empty());
    let origin = got
        .get_child("origin-id", SID)
        .unwrap_or_else(|| panic!("origin-id kept: {}", xml(&got)));
    assert_eq!(origin.attr("id"), Some("orig-1"));

    // Bob answers alice's full JID: her copy carries her archive's id, never bob's.
    let back = exchange(
        &mut bob,
        &mut alice,
        "alice@localhost/a",
        "m2",
        "hello back",
    )
    .await;
    let alice_sids = stanza_ids(&back, "alice@localhost");
    assert_eq!(alice_sids.len(), 1, "{}", xml(&back));
    let y = alice_sids[0].clone();
    assert!(
        stanza_ids(&back, "bob@localhost").is_empty(),
        "the sender's archive id is not sent to the contact: {}",
        xml(&back)
    );
    sync(&mut alice, "a").await;
    sync(&mut bob, "b").await;

    // Bob's archive: both messages; the id he was given is the one his archive uses.
    let b = archive(&mut bob).await;
    assert_eq!(b.bodies(), strs(&["hello", "hello back"]));
    assert_eq!(b.items[0].id, x, "delivered stanza-id = bob's archive id");
    assert_eq!(b.count(), Some(2));
    let orig = &b.items[0].msg;
    assert_eq!(
        orig.attr("from"),
        Some("alice@localhost/a"),
        "{}",
        xml(orig)
    );
    assert_eq!(orig.attr("to"), Some("bob@localhost"));
    assert_eq!(
        orig.get_child("origin-id", SID).and_then(|o| o.attr("id")),
        Some("orig-1"),
        "origin-id archived: {}",
        xml(orig)
    );
    for it in &b.items {
        assert!(
            it.msg
                .children()
                .all(|c| !(c.is("stanza-id", SID) && c.attr("id") == Some("forged-1"))),
            "the forged stanza-id is not archived: {}",
            xml(&it.msg)
        );
    }

    // Alice's archive: the same two messages under her own ids.
    let a = archive(&mut alice).await;
    assert_eq!(a.bodies(), strs(&["hello", "hello back"]));
    assert_eq!(a.items[1].id, y, "delivered stanza-id = alice's archive id");
    assert_eq!(
        a.items[0].msg.attr("from"),
        Some("alice@localhost/a"),
        "{}",
        xml(&a.items[0].msg)
    );
    for it in &a.items {
        assert!(
            it.msg
                .children()
                .all(|c| !(c.is("stanza-id", SID) && c.attr("id") == Some("forged-1"))),
            "{}",
            xml(&it.msg)
        );
    }
    // Her id for "hello" is an id of her archive; bob's id for it is not.
    let hello = mam(&mut alice, &[("ids", &a.items[0].id)], "", "")
        .await
        .expect("ids query");
    assert_eq!(hello.bodies(), strs(&["hello"]));
    assert_eq!(
        mam(&mut alice, &[], &format!("<after>{x}</after>"), "")
            .await
            .err()
            .as_deref(),
        Some("item-not-found"),
        "bob's archive id is unknown in alice's archive"
    );

    // A message without a type is `normal`: archived as well (XEP-0313 §3.1).
    alice
        .send("<message to='bob@localhost' id='m3'><body>normal</body></message>")
        .await;
    let got = recv_msg(&mut bob).await;
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));
    sync(&mut alice, "a2").await;
    assert_eq!(
        archive_bodies(&mut bob).await,
        strs(&["hello", "hello back", "normal"])
    );
    assert_eq!(
        archive_bodies(&mut alice).await,
        strs(&["hello", "hello back", "normal"])
    );
}

#[tokio::test]
async fn a_message_to_oneself_is_archived_once_and_found_with_ones_own_jid() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    exchange(&mut alice, &mut bob, "bob@localhost", "s1", "to bob").await;
    // To her own bare JID: it comes back to her (her only available resource).
    send_chat(&mut alice, "alice@localhost", "s2", "note to self").await;
    let got = recv_msg(&mut alice).await;
    assert_eq!(body(&got).as_deref(), Some("note to self"), "{}", xml(&got));
    assert_eq!(
        stanza_ids(&got, "alice@localhost").len(),
        1,
        "{}",
        xml(&got)
    );
    exchange(&mut bob, &mut alice, "alice@localhost", "s3", "from bob").await;
    sync(&mut alice, "a").await;

    let all = archive(&mut alice).await;
    assert_eq!(
        all.bodies(),
        strs(&["to bob", "note to self", "from bob"]),
        "stored once"
    );
    assert_eq!(all.items[1].id, stanza_ids(&got, "alice@localhost")[0]);
    // XEP-0313 §4.1.1: `with` = one's own JID finds only the messages to oneself.
    let a = mam(&mut alice, &[("with", "alice@localhost")], "", "")
        .await
        .unwrap();
    assert_eq!(a.bodies(), strs(&["note to self"]));
    // The archive is the account's bare JID; addressing it explicitly is the same query.
    let a = mam_to(&mut alice, Some("alice@localhost"), &[], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), all.ids());
}

#[tokio::test]
async fn stored_text_round_trips_and_addresses_are_normalised() {
    const TEXT: &str = "a < b & \"c\" 'd' ]]> ünïcødé 🎉";
    const ESCAPED: &str = "a &lt; b &amp; &quot;c&quot; &apos;d&apos; ]]&gt; ünïcødé 🎉";
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;

    // RFC 7622: the archive knows bob by his normalised JID whatever case the sender used.
    send_chat(&mut alice, "Bob@LocalHost", "t1", ESCAPED).await;
    let got = recv_msg(&mut bob).await;
    assert_eq!(body(&got).as_deref(), Some(TEXT), "{}", xml(&got));
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));
    sync(&mut alice, "a").await;
    for with in ["bob@localhost", "BOB@localhost"] {
        let a = mam(&mut alice, &[("with", with)], "", "").await.unwrap();
        assert_eq!(a.bodies(), vec![TEXT.to_string()], "with {with}");
        assert_eq!(a.count(), Some(1), "with {with}");
    }
    assert_eq!(archive_bodies(&mut bob).await, vec![TEXT.to_string()]);

    // Through offline storage too.
    logout(bob).await;
    send_chat(&mut alice, "bob@localhost", "t2", ESCAPED).await;
    let errors = settle(&mut alice, "a2").await;
    assert!(
        errors.is_empty(),
        "{:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );
    let (_bob, msgs) = online_collect(&s, "bob", "b2").await;
    assert_eq!(
        msgs.iter().map(body).collect::<Vec<_>>(),
        vec![Some(TEXT.to_string())]
    );
}

// --- Queries -----------------------------------------------------------------------------------

/// Alice's archive of ten messages m0..m9, exchanged with bob (bob/b) and carol:
/// 0 a→bob, 1 bob/b→a, 2 a→carol, 3 a→bob/b, 4 carol→a, 5 bob/b→a, 6 a→bob, 7 a→carol,
/// 8 bob/b→a, 9 a→bob. Returns the server, alice's session and her whole archive.
async fn fixture() -> (TestServer, RawClient, Answer) {
    let s = server_with(&["alice", "bob", "carol"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    let mut carol = online(&s, "carol", "c").await;
    for i in 0..10 {
        let (id, text) = (format!("f{i}"), format!("m{i}"));
        match i {
            0 | 6 | 9 => exchange(&mut alice, &mut bob, "bob@localhost", &id, &text).await,
            3 => exchange(&mut alice, &mut bob, "bob@localhost/b", &id, &text).await,
            2 | 7 => exchange(&mut alice, &mut carol, "carol@localhost", &id, &text).await,
            4 => exchange(&mut carol, &mut alice, "alice@localhost", &id, &text).await,
            _ => exchange(&mut bob, &mut alice, "alice@localhost", &id, &text).await,
        };
    }
    sync(&mut alice, "fixture").await;
    let all = archive(&mut alice).await;
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(all.bodies(), want, "chronological order");
    let stamps: Vec<i64> = all
        .items
        .iter()
        .map(|i| parse_utc(&i.stamp).expect("stamp"))
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] < w[1]),
        "distinct, increasing stamps: {stamps:?}"
    );
    (s, alice, all)
}

fn pick(all: &Answer, idx: &[usize]) -> Vec<String> {
    idx.iter().map(|i| all.items[*i].id.clone()).collect()
}

#[tokio::test]
async fn query_filters_with_start_end_and_ids() {
    let (_s, mut alice, all) = fixture().await;
    let id = |i: usize| all.items[i].id.clone();
    let stamp = |i: usize| all.items[i].stamp.clone();

    // `with` a bare JID: every message exchanged with any of bob's resources; count given.
    let a = mam(&mut alice, &[("with", "bob@localhost")], "", "")
        .await
        .unwrap();
    a.check_page(&pick(&all, &[0, 1, 3, 5, 6, 8, 9]), Some(0));
    assert!(a.complete());
    assert_eq!(a.count(), Some(7), "count for a with-only query");
    let a = mam(&mut alice, &[("with", "carol@localhost")], "", "")
        .await
        .unwrap();
    a.check_page(&pick(&all, &[2, 4, 7]), Some(0));
    assert_eq!(a.count(), Some(3));
    // `with` a full JID: only messages to or from that resource (XEP-0313 §4.1.1).
    let a = mam(&mut alice, &[("with", "bob@localhost/b")], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), pick(&all, &[1, 3, 5, 8]));
    assert!(a.complete());
    let a = mam(&mut alice, &[("with", "nobody@localhost")], "", "")
        .await
        .unwrap();
    assert!(a.items.is_empty() && a.complete(), "{}", xml(&a.fin));

    // Paging within a full-JID `with`.
    let a = mam(
        &mut alice,
        &[("with", "bob@localhost/b")],
        "<max>2</max>",
        "",
    )
    .await
    .unwrap();
    a.check_page(&pick(&all, &[1, 3]), Some(0));
    assert!(!a.complete());
    let a = mam(
        &mut alice,
        &[("with", "bob@localhost/b")],
        &format!("<max>2</max><after>{}</after>", id(3)),
        "",
    )
    .await
    .unwrap();
    a.check_page(&pick(&all, &[5, 8]), Some(2));
    assert!(a.complete());
    let a = mam(
        &mut alice,
        &[("with", "bob@localhost/b")],
        "<max>3</max><before/>",
        "",
    )
    .await
    .unwrap();
    a.check_page(&pick(&all, &[3, 5, 8]), Some(1));
    assert!(!a.complete());

    // `start` / `end`, inclusive, from the stamps the archive reported.
    let a = mam(
        &mut alice,
        &[("start", &stamp(2)), ("end", &stamp(6))],
        "",
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.ids(), pick(&all, &[2, 3, 4, 5, 6]));
    assert!(a.complete());
    let a = mam(&mut alice, &[("start", &stamp(7))], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), pick(&all, &[7, 8, 9]));
    let a = mam(&mut alice, &[("end", &stamp(1))], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), pick(&all, &[0, 1]));
    let a = mam(
        &mut alice,
        &[("with", "carol@localhost"), ("start", &stamp(3))],
        "",
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.ids(), pick(&all, &[4, 7]), "filters combine");
    let a = mam(&mut alice, &[("start", "2000-01-01T00:00:00Z")], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), all.ids());
    let a = mam(&mut alice, &[("end", "2000-01-01T00:00:00Z")], "", "")
        .await
        .unwrap();
    assert!(a.items.is_empty() && a.complete());

    // `after-id` / `before-id` (exclusive) and `ids` (XEP-0313 §4.1.2-4.1.4, extended).
    let a = mam(&mut alice, &[("after-id", &id(6))], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), pick(&all, &[7, 8, 9]));
    let a = mam(&mut alice, &[("before-id", &id(3))], "", "")
        .await
        .unwrap();
    assert_eq!(a.ids(), pick(&all, &[0, 1, 2]));
    let a = mam(
        &mut alice,
        &[("after-id", &id(2)), ("before-id", &id(7))],
        "",
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.ids(), pick(&all, &[3, 4, 5, 6]));
    let list = format!("{} {} {}", id(7), id(1), id(4));
    let a = mam(&mut alice, &[("ids", &list)], "", "").await.unwrap();
    assert_eq!(a.ids(), pick(&all, &[1, 4, 7]), "ids, chronologically");
    assert!(a.complete());
    let a = mam(
        &mut alice,
        &[("ids", &list), ("with", "carol@localhost")],
        "",
        "",
    )
    .await
    .unwrap();
    assert_eq!(a.ids(), pick(&all, &[4, 7]), "ids within the other filters");

    // The last page within bounds.
    let a = mam(
        &mut alice,
        &[("end", &stamp(6))],
        "<max>2</max><before/>",
        "",
    )
    .await
    .unwrap();
    a.check_page(&pick(&all, &[5, 6]), Some(5));
    assert!(!a.complete());
    let a = mam(
        &mut alice,
        &[("before-id", &id(7))],
        "<max>2</max><before/>",
        "",
    )
    .await
    .unwrap();
    a.check_page(&pick(&all, &[5, 6]), Some(5));

    // A field the server does not know: feature-not-implemented (§4.1.5).
    assert_eq!(
        mam(&mut alice, &[("urn:example:no-such-field", "x")], "", "")
            .await
            .err()
            .as_deref(),
        Some("feature-not-implemented")
    );

    // Unknown ids: item-not-found (§4.1.4).
    for field in ["after-id", "before-id", "ids"] {
        assert_eq!(
            mam(&mut alice, &[(field, "no-such-id")], "", "")
                .await
                .err()
                .as_deref(),
            Some("item-not-found"),
            "unknown {field}"
        );
    }
}

#[tokio::test]
async fn rsm_paging_count_complete_and_flip() {
    let (_s, mut alice, all) = fixture().await;
    let id = |i: usize| all.items[i].id.clone();
    assert_eq!(all.count(), Some(10), "count for an unfiltered query");

    // Forward paging with <after/>: complete only on the last page.
    let p = mam(&mut alice, &[], "<max>4</max>", "").await.unwrap();
    p.check_page(&pick(&all, &[0, 1, 2, 3]), Some(0));
    assert!(!p.complete(), "{}", xml(&p.fin));
    assert_eq!(p.fin.attr("complete").unwrap_or("false"), "false");
    assert_eq!(p.count(), Some(10));
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>4</max><after>{}</after>", p.last().unwrap()),
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[4, 5, 6, 7]), Some(4));
    assert!(!p.complete());
    assert_eq!(p.count(), Some(10), "count is the whole set's");
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>4</max><after>{}</after>", p.last().unwrap()),
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[8, 9]), Some(8));
    assert!(p.complete(), "last page: {}", xml(&p.fin));

    // After the last item: an empty, complete page without first/last (XEP-0059 §2.5).
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>4</max><after>{}</after>", id(9)),
        "",
    )
    .await
    .unwrap();
    assert!(p.items.is_empty() && p.complete(), "{}", xml(&p.fin));
    assert_eq!((p.first(), p.last()), (None, None), "{}", xml(&p.fin));
    assert_eq!(p.count(), Some(10));

    // A page holding exactly the rest is complete too: it was not limited.
    let p = mam(&mut alice, &[], "<max>10</max>", "").await.unwrap();
    assert_eq!(p.ids(), all.ids());
    assert!(p.complete());

    // Empty <before/>: the last page, in chronological order; then backwards with <before/>.
    let p = mam(&mut alice, &[], "<max>3</max><before/>", "")
        .await
        .unwrap();
    p.check_page(&pick(&all, &[7, 8, 9]), Some(7));
    assert!(!p.complete(), "{}", xml(&p.fin));
    assert_eq!(p.count(), Some(10));
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>3</max><before>{}</before>", p.first().unwrap()),
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[4, 5, 6]), Some(4));
    assert!(!p.complete());
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>3</max><before>{}</before>", id(2)),
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[0, 1]), Some(0));
    assert!(p.complete(), "paging backwards reached the start");

    // RSM inside a filter: count is the filtered set's.
    let p = mam(
        &mut alice,
        &[("with", "bob@localhost")],
        "<max>2</max><before/>",
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[8, 9]), Some(5));
    assert_eq!(p.count(), Some(7));
    let p = mam(
        &mut alice,
        &[("with", "bob@localhost")],
        &format!("<max>3</max><after>{}</after>", id(3)),
        "",
    )
    .await
    .unwrap();
    p.check_page(&pick(&all, &[5, 6, 8]), Some(3));
    assert!(!p.complete());

    // <max>0</max>: no items, just the count (XEP-0059 §2.6).
    let p = mam(&mut alice, &[], "<max>0</max>", "").await.unwrap();
    assert!(p.items.is_empty());
    assert_eq!(p.count(), Some(10));

    // Flipped pages: same page, transmitted newest first (XEP-0313 §4.3.3).
    let p = mam(&mut alice, &[], "<max>3</max><before/>", "<flip-page/>")
        .await
        .unwrap();
    assert_eq!(p.ids(), pick(&all, &[9, 8, 7]));
    let p = mam(&mut alice, &[], "<max>3</max>", "<flip-page/>")
        .await
        .unwrap();
    assert_eq!(p.ids(), pick(&all, &[2, 1, 0]));
    assert!(!p.complete());

    // Unknown RSM ids: item-not-found (§4.3.2).
    for set in ["<after>no-such-id</after>", "<before>no-such-id</before>"] {
        assert_eq!(
            mam(&mut alice, &[], set, "").await.err().as_deref(),
            Some("item-not-found"),
            "{set}"
        );
    }
}

#[tokio::test]
async fn page_size_defaults_and_is_clamped_to_max_page() {
    let s = server_cfg(&["alice", "bob"], |c| {
        c.archive.max_page = 10;
        c.archive.default_page = 4;
        c.c2s.outbound_queue = 64;
    })
    .await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    for i in 0..12 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("c{i}"),
            &format!("n{i}"),
        )
        .await;
    }
    sync(&mut alice, "a").await;

    let p = mam(&mut alice, &[], "<max>100</max>", "").await.unwrap();
    let want: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    assert_eq!(p.bodies(), want, "a max above max_page is clamped");
    assert!(!p.complete(), "the clamped page is not complete");
    assert_eq!(p.count(), Some(12));
    let p = mam(
        &mut alice,
        &[],
        &format!("<max>100</max><after>{}</after>", p.last().unwrap()),
        "",
    )
    .await
    .unwrap();
    assert_eq!(p.bodies(), strs(&["n10", "n11"]));
    assert!(p.complete());

    // Without <max/>: the default page.
    let p = mam(&mut alice, &[], "", "").await.unwrap();
    assert_eq!(p.bodies(), strs(&["n0", "n1", "n2", "n3"]));
    assert!(!p.complete());
    let p = mam(&mut alice, &[], "<before/>", "").await.unwrap();
    assert_eq!(p.bodies(), strs(&["n8", "n9", "n10", "n11"]));
}

#[tokio::test]
async fn query_form_metadata_disco_and_access() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;

    // The query form (§4.1.5).
    let r = iq(
        &mut alice,
        "form",
        &format!("<iq type='get' id='form'><query xmlns='{MAM}'/></iq>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let x = r
        .get_child("query", MAM)
        .and_then(|q| q.get_child("x", DATA))
        .unwrap_or_else(|| panic!("a data form: {}", xml(&r)));
    assert_eq!(x.attr("type"), Some("form"));
    let field = |var: &str| {
        x.children()
            .find(|f| f.is("field", DATA) && f.attr("var") == Some(var))
            .unwrap_or_else(|| panic!("field {var} in {}", xml(x)))
    };
    let ft = field("FORM_TYPE");
    assert_eq!(ft.attr("type"), Some("hidden"));
    assert_eq!(
        ft.get_child("value", DATA).map(|v| v.text()).as_deref(),
        Some(MAM)
    );
    assert_eq!(field("with").attr("type"), Some("jid-single"));
    assert_eq!(field("start").attr("type"), Some("text-single"));
    assert_eq!(field("end").attr("type"), Some("text-single"));
    for extended in ["before-id", "after-id", "ids"] {
        field(extended);
    }

    // Disco on the account: MAM, the extended features and stanza-ids (§7, XEP-0359 §4).
    let r = iq(
        &mut alice,
        "disco",
        &format!(
            "<iq type='get' id='disco' to='alice@localhost'><query xmlns='{DISCO_INFO}'/></iq>"
        ),
    )
    .await;
    let features: Vec<String> = r
        .get_child("query", DISCO_INFO)
        .map(|q| {
            q.children()
                .filter(|f| f.is("feature", DISCO_INFO))
                .filter_map(|f| f.attr("var").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for f in [MAM, MAM_EXTENDED, SID] {
        assert!(
            features.iter().any(|g| g == f),
            "{f} advertised: {}",
            xml(&r)
        );
    }

    // Metadata (§5): empty for an empty archive, then the first and last messages.
    let meta = format!("<iq type='get' id='meta'><metadata xmlns='{MAM}'/></iq>");
    let r = iq(&mut alice, "meta", &meta).await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let m = r
        .get_child("metadata", MAM)
        .unwrap_or_else(|| panic!("{}", xml(&r)));
    assert!(
        m.children().next().is_none(),
        "an empty archive has no start/end: {}",
        xml(m)
    );
    for i in 0..3 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("x{i}"),
            &format!("t{i}"),
        )
        .await;
    }
    sync(&mut alice, "a").await;
    let all = archive(&mut alice).await;
    assert_eq!(all.items.len(), 3);
    let r = iq(&mut alice, "meta", &meta).await;
    let m = r
        .get_child("metadata", MAM)
        .unwrap_or_else(|| panic!("{}", xml(&r)));
    for (name, item) in [("start", &all.items[0]), ("end", &all.items[2])] {
        let e = m
            .get_child(name, MAM)
            .unwrap_or_else(|| panic!("<{name}/> in {}", xml(m)));
        assert_eq!(e.attr("id"), Some(item.id.as_str()), "{}", xml(m));
        assert_eq!(
            e.attr("timestamp").and_then(parse_utc),
            parse_utc(&item.stamp),
            "{}",
            xml(m)
        );
    }

    // Only the owner reads or configures an archive: bob asks about alice's.
    assert_eq!(
        mam_to(&mut bob, Some("alice@localhost"), &[], "", "")
            .await
            .err()
            .as_deref(),
        Some("forbidden")
    );
    for (id, payload) in [
        ("m1", format!("<metadata xmlns='{MAM}'/>")),
        ("p1", format!("<prefs xmlns='{MAM}'/>")),
    ] {
        let r = iq(
            &mut bob,
            id,
            &format!("<iq type='get' id='{id}' to='alice@localhost'>{payload}</iq>"),
        )
        .await;
        assert_eq!(r.attr("type"), Some("error"), "{}", xml(&r));
        assert_eq!(
            stanza_error(&r).as_deref(),
            Some("forbidden"),
            "{}",
            xml(&r)
        );
    }
    assert_nothing(&mut bob, "no results leak to another user").await;
    // Bob's own archive has the three messages alice sent him.
    assert_eq!(archive_bodies(&mut bob).await, strs(&["t0", "t1", "t2"]));
}

// --- Preferences (XEP-0441 in urn:xmpp:mam:2) ---------------------------------------------------

/// Sets `c`'s preferences and returns what the server answered.
async fn set_prefs(c: &mut RawClient, default: &str, always: &[&str], never: &[&str]) -> Element {
    let list = |jids: &[&str]| {
        jids.iter()
            .map(|j| format!("<jid>{j}</jid>"))
            .collect::<String>()
    };
    let r = iq(
        c,
        "prefs-set",
        &format!(
            "<iq type='set' id='prefs-set'><prefs xmlns='{MAM}' default='{default}'><always>{}</always><never>{}</never></prefs></iq>",
            list(always),
            list(never)
        ),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    r
}

async fn get_prefs(c: &mut RawClient) -> Element {
    let r = iq(
        c,
        "prefs-get",
        &format!("<iq type='get' id='prefs-get'><prefs xmlns='{MAM}'/></iq>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    r.get_child("prefs", MAM)
        .unwrap_or_else(|| panic!("prefs: {}", xml(&r)))
        .clone()
}

fn pref_list(p: &Element, name: &str) -> Vec<String> {
    p.get_child(name, MAM)
        .map(|l| {
            l.children()
                .filter(|j| j.is("jid", MAM))
                .map(|j| j.text())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn preferences_default_always_and_never() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;

    let p = get_prefs(&mut bob).await;
    assert_eq!(p.attr("default"), Some("always"), "{}", xml(&p));

    let got = exchange(&mut alice, &mut bob, "bob@localhost", "p1", "kept").await;
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));

    // never: bob's side stops archiving; alice's does not.
    let r = set_prefs(&mut bob, "never", &[], &[]).await;
    assert_eq!(
        r.get_child("prefs", MAM).and_then(|p| p.attr("default")),
        Some("never"),
        "the set answers the stored preferences: {}",
        xml(&r)
    );
    assert_eq!(get_prefs(&mut bob).await.attr("default"), Some("never"));
    let got = exchange(&mut alice, &mut bob, "bob@localhost", "p2", "unarchived").await;
    assert!(
        stanza_ids(&got, "bob@localhost").is_empty(),
        "no stanza-id for a message bob's archive did not take: {}",
        xml(&got)
    );
    exchange(&mut bob, &mut alice, "alice@localhost", "p3", "bob writes").await;

    // always list: alice overrides default never.
    let r = set_prefs(&mut bob, "never", &["alice@localhost"], &[]).await;
    assert_eq!(
        r.get_child("prefs", MAM)
            .map(|p| pref_list(p, "always"))
            .unwrap_or_default(),
        strs(&["alice@localhost"]),
        "{}",
        xml(&r)
    );
    let got = exchange(&mut alice, &mut bob, "bob@localhost", "p4", "listed").await;
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));
    sync(&mut alice, "a").await;
    sync(&mut bob, "b").await;

    assert_eq!(archive_bodies(&mut bob).await, strs(&["kept", "listed"]));
    assert_eq!(
        archive_bodies(&mut alice).await,
        strs(&["kept", "unarchived", "bob writes", "listed"]),
        "the other side archives regardless"
    );
}

#[tokio::test]
async fn preferences_roster_default_and_lists() {
    let s = server_with(&["alice", "bob", "carol"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    let mut carol = online(&s, "carol", "c").await;

    // Alice is in bob's roster; carol is not.
    let r = iq(
        &mut bob,
        "r1",
        &format!("<iq type='set' id='r1'><query xmlns='{ROSTER}'><item jid='alice@localhost'/></query></iq>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    sync(&mut bob, "roster").await;

    set_prefs(&mut bob, "roster", &[], &[]).await;
    exchange(&mut alice, &mut bob, "bob@localhost", "r1", "from alice").await;
    let got = exchange(&mut carol, &mut bob, "bob@localhost", "r2", "from carol").await;
    assert!(
        stanza_ids(&got, "bob@localhost").is_empty(),
        "not archived, so no stanza-id: {}",
        xml(&got)
    );
    exchange(&mut bob, &mut carol, "carol@localhost", "r3", "to carol").await;

    // The always list brings carol in.
    set_prefs(&mut bob, "roster", &["carol@localhost"], &[]).await;
    let got = exchange(&mut carol, &mut bob, "bob@localhost", "r4", "carol listed").await;
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));

    // The never list keeps alice out, even with default always.
    set_prefs(&mut bob, "always", &[], &["alice@localhost"]).await;
    let p = get_prefs(&mut bob).await;
    assert_eq!(p.attr("default"), Some("always"));
    assert_eq!(pref_list(&p, "never"), strs(&["alice@localhost"]));
    exchange(&mut alice, &mut bob, "bob@localhost", "r5", "alice never").await;
    exchange(&mut carol, &mut bob, "bob@localhost", "r6", "carol always").await;
    sync(&mut bob, "b").await;

    assert_eq!(
        archive_bodies(&mut bob).await,
        strs(&["from alice", "carol listed", "carol always"])
    );
    assert_eq!(
        archive_bodies(&mut carol).await,
        strs(&["from carol", "to carol", "carol listed", "carol always"]),
        "carol's own archive follows her preferences"
    );
}

// --- Hints (XEP-0334) --------------------------------------------------------------------------

#[tokio::test]
async fn storage_hints_and_chat_states() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;

    let cases = [
        ("h0", "<body>plain</body>", true),
        (
            "h1",
            "<body>no-store</body><no-store xmlns='urn:xmpp:hints'/>",
            false,
        ),
        (
            "h2",
            "<body>no-permanent-store</body><no-permanent-store xmlns='urn:xmpp:hints'/>",
            false,
        ),
        (
            "h3",
            "<payload xmlns='urn:example:custom'>stored</payload><store xmlns='urn:xmpp:hints'/>",
            true,
        ),
        (
            "h4",
            "<payload xmlns='urn:example:custom'>not stored</payload>",
            false,
        ),
        (
            "h5",
            "<composing xmlns='http://jabber.org/protocol/chatstates'/>",
            false,
        ),
    ];
    for (id, inner, archived) in cases {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat' id='{id}'>{inner}</message>"
            ))
            .await;
        let got = recv_msg(&mut bob).await;
        assert_eq!(got.attr("id"), Some(id), "delivered live: {}", xml(&got));
        assert_eq!(
            stanza_ids(&got, "bob@localhost").len(),
            usize::from(archived),
            "stanza-id iff archived ({id}): {}",
            xml(&got)
        );
    }
    sync(&mut alice, "a").await;
    let want = vec![Some("h0".to_string()), Some("h3".to_string())];
    for (who, c) in [("bob", &mut bob), ("alice", &mut alice)] {
        let a = archive(c).await;
        let ids: Vec<Option<String>> = a
            .items
            .iter()
            .map(|i| i.msg.attr("id").map(str::to_owned))
            .collect();
        assert_eq!(ids, want, "{who}'s archive");
        let custom = a.items[1]
            .msg
            .get_child("payload", "urn:example:custom")
            .map(|p| p.text());
        assert_eq!(custom.as_deref(), Some("stored"), "{who}");
    }

    // Bob goes offline. no-store: nothing may keep it, so the sender gets an error.
    logout(bob).await;
    alice
        .send("<message to='bob@localhost' type='chat' id='o1'><body>gone</body><no-store xmlns='urn:xmpp:hints'/></message>")
        .await;
    let e = alice
        .recv_until(|e| e.name() == "message" && e.attr("id") == Some("o1"))
        .await;
    assert_eq!(e.attr("type"), Some("error"), "{}", xml(&e));
    assert_eq!(
        stanza_error(&e).as_deref(),
        Some("service-unavailable"),
        "{}",
        xml(&e)
    );
    // no-permanent-store: temporary (offline) storage is fine, the archive is not.
    alice
        .send("<message to='bob@localhost' type='chat' id='o2'><body>temporary</body><no-permanent-store xmlns='urn:xmpp:hints'/></message>")
        .await;
    // A chat state alone is not stored offline (XEP-0160 §3) and needs no error.
    alice
        .send("<message to='bob@localhost' type='chat' id='o3'><paused xmlns='http://jabber.org/protocol/chatstates'/></message>")
        .await;
    let errors = drain(&mut alice, "a2").await;
    assert!(
        errors.is_empty(),
        "no error for stored or dropped messages: {:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );

    let (mut bob, msgs) = online_collect(&s, "bob", "b2").await;
    let got: Vec<Option<String>> = msgs
        .iter()
        .map(|m| m.attr("id").map(str::to_owned))
        .collect();
    assert_eq!(got, vec![Some("o2".to_string())], "offline delivery");
    assert!(
        msgs[0].get_child("delay", DELAY).is_some(),
        "{}",
        xml(&msgs[0])
    );
    assert_nothing(&mut bob, "nothing else").await;
    let a = archive(&mut bob).await;
    assert_eq!(a.items.len(), 2, "nothing new archived: {:?}", a.bodies());
    let a = archive(&mut alice).await;
    assert_eq!(a.items.len(), 2, "nothing new archived: {:?}", a.bodies());
}

/// Logs in, sends initial presence and returns the session with the messages that arrived
/// before the presence was processed (offline delivery happens then).
async fn online_collect(s: &TestServer, user: &str, res: &str) -> (RawClient, Vec<Element>) {
    let mut c = bound(s, user, res).await;
    c.send("<presence/><iq type='get' id='after-presence' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let mut msgs = Vec::new();
    loop {
        let e = c.recv().await;
        match e.name() {
            "message" => msgs.push(e),
            "iq" if e.attr("id") == Some("after-presence") => return (c, msgs),
            _ => {}
        }
    }
}

// --- Offline messages (XEP-0160) ---------------------------------------------------------------

#[tokio::test]
async fn offline_messages_are_delivered_at_initial_presence_once() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let t0 = now_micros();
    for i in 0..3 {
        send_chat(
            &mut alice,
            "bob@localhost",
            &format!("o{i}"),
            &format!("off {i}"),
        )
        .await;
    }
    let errors = settle(&mut alice, "a").await;
    assert!(
        errors.is_empty(),
        "no error for messages stored offline: {:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );

    // Binding alone delivers nothing (XEP-0160 §2: at non-negative available presence), and a
    // message to the bare JID of a bound but unavailable account waits too.
    let mut bob = bound(&s, "bob", "b").await;
    sync(&mut bob, "bound").await;
    send_chat(&mut alice, "bob@localhost", "o3", "off 3").await;
    let errors = settle(&mut alice, "a2").await;
    let t1 = now_micros();
    assert!(
        errors.is_empty(),
        "no error for messages stored offline: {:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );
    assert_nothing(&mut alice, "no error for messages stored offline").await;
    assert_nothing(&mut bob, "a bound resource without presence").await;
    bob.send("<presence><priority>-1</priority></presence>")
        .await;
    sync(&mut bob, "negative").await;
    assert_nothing(&mut bob, "a negative-priority resource").await;

    bob.send("<presence/>").await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(recv_msg(&mut bob).await);
    }
    let bodies: Vec<Option<String>> = got.iter().map(body).collect();
    assert_eq!(
        bodies,
        (0..4).map(|i| Some(format!("off {i}"))).collect::<Vec<_>>(),
        "oldest first"
    );
    let mut last = 0;
    for m in &got {
        assert_eq!(m.attr("from"), Some("alice@localhost/a"), "{}", xml(m));
        let d = m
            .get_child("delay", DELAY)
            .unwrap_or_else(|| panic!("XEP-0203 delay: {}", xml(m)));
        assert_eq!(d.attr("from"), Some("localhost"), "{}", xml(m));
        let stamp = d
            .attr("stamp")
            .and_then(parse_utc)
            .unwrap_or_else(|| panic!("UTC stamp: {}", xml(m)));
        assert!(
            stamp >= t0 - 1_000_000 && stamp <= t1 + 1_000_000,
            "stamp is when the message was stored: {}",
            xml(m)
        );
        assert!(stamp >= last);
        last = stamp;
    }
    assert_nothing(&mut bob, "each stored message once").await;

    // They are in bob's archive, under the stanza-ids they were delivered with.
    let a = archive(&mut bob).await;
    assert_eq!(a.bodies(), strs(&["off 0", "off 1", "off 2", "off 3"]));
    let delivered: Vec<Vec<String>> = got.iter().map(|m| stanza_ids(m, "bob@localhost")).collect();
    assert_eq!(
        delivered,
        a.ids().into_iter().map(|i| vec![i]).collect::<Vec<_>>(),
        "stanza-ids of the offline copies"
    );

    // The next login gets nothing again.
    logout(bob).await;
    let (mut bob, msgs) = online_collect(&s, "bob", "b2").await;
    assert!(
        msgs.is_empty(),
        "delivered messages are removed: {:?}",
        msgs.iter().map(xml).collect::<Vec<_>>()
    );
    assert_nothing(&mut bob, "second login").await;
}

/// A `<delay/>` a sender claims the server added.
const FORGED_DELAY: &str =
    "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2001-01-01T00:00:00Z'/>";

/// XEP-0203 §6: the recipient's server SHOULD discard a delay notation claiming to be from
/// itself (or refuse the stanza with not-acceptable). Offline delivery: only the server's own.
#[tokio::test]
async fn a_forged_server_delay_is_replaced_in_offline_delivery() {
    const FORGED: &str = FORGED_DELAY;
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let t0 = now_micros();
    alice
        .send(&format!(
            "<message to='bob@localhost' type='chat' id='d1'><body>offline</body>{FORGED}</message>"
        ))
        .await;
    let errors = settle(&mut alice, "a").await;
    assert!(
        errors.is_empty(),
        "{:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );
    let (_bob, msgs) = online_collect(&s, "bob", "b").await;
    assert_eq!(msgs.len(), 1);
    let delays: Vec<&Element> = msgs[0]
        .children()
        .filter(|c| c.is("delay", DELAY) && c.attr("from") == Some("localhost"))
        .collect();
    assert_eq!(
        delays.len(),
        1,
        "one delay from the server: {}",
        xml(&msgs[0])
    );
    assert!(
        delays[0]
            .attr("stamp")
            .and_then(parse_utc)
            .is_some_and(|t| t >= t0 - 1_000_000),
        "the server's own stamp: {}",
        xml(&msgs[0])
    );
}

/// XEP-0203 §6, for a message delivered live.
#[tokio::test]
async fn a_forged_server_delay_is_not_passed_on_live() {
    const FORGED: &str = FORGED_DELAY;
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    alice
        .send(&format!(
            "<message to='bob@localhost' type='chat' id='d2'><body>live</body>{FORGED}</message>"
        ))
        .await;
    let errors = drain(&mut alice, "a2").await;
    if errors.is_empty() {
        let got = recv_msg(&mut bob).await;
        assert_eq!(body(&got).as_deref(), Some("live"));
        assert!(
            got.children()
                .all(|c| !(c.is("delay", DELAY) && c.attr("from") == Some("localhost"))),
            "a live message carries no delay claimed by the server: {}",
            xml(&got)
        );
    } else {
        assert_eq!(errors.len(), 1);
        assert_eq!(
            stanza_error(&errors[0]).as_deref(),
            Some("not-acceptable"),
            "{}",
            xml(&errors[0])
        );
    }
}

#[tokio::test]
async fn offline_quota_bounces_but_the_archive_keeps_everything() {
    let s = server_cfg(&["alice", "bob"], |c| c.offline.quota = 3).await;
    let mut alice = online(&s, "alice", "a").await;
    for i in 1..=4 {
        send_chat(
            &mut alice,
            "bob@localhost",
            &format!("q{i}"),
            &format!("quota {i}"),
        )
        .await;
    }
    let errors = drain(&mut alice, "a").await;
    assert_eq!(
        errors.len(),
        1,
        "only the 4th is refused: {:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );
    assert_eq!(errors[0].attr("id"), Some("q4"), "{}", xml(&errors[0]));
    assert_eq!(errors[0].attr("type"), Some("error"));
    assert_eq!(
        stanza_error(&errors[0]).as_deref(),
        Some("service-unavailable")
    );

    let (mut bob, msgs) = online_collect(&s, "bob", "b").await;
    let bodies: Vec<Option<String>> = msgs.iter().map(body).collect();
    assert_eq!(
        bodies,
        (1..=3)
            .map(|i| Some(format!("quota {i}")))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        archive_bodies(&mut bob).await,
        strs(&["quota 1", "quota 2", "quota 3", "quota 4"]),
        "the archive has the refused one too"
    );
    assert_eq!(
        archive_bodies(&mut alice).await,
        strs(&["quota 1", "quota 2", "quota 3", "quota 4"]),
        "the sender's too, and not the error she got back"
    );

    // Delivery freed the queue: three more fit, the fourth does not.
    logout(bob).await;
    for i in 5..=8 {
        send_chat(
            &mut alice,
            "bob@localhost",
            &format!("q{i}"),
            &format!("quota {i}"),
        )
        .await;
    }
    let errors = drain(&mut alice, "a2").await;
    assert_eq!(
        errors.iter().map(|e| e.attr("id")).collect::<Vec<_>>(),
        vec![Some("q8")],
        "{:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );
}

// --- Carbons (XEP-0280) ------------------------------------------------------------------------

async fn carbons(c: &mut RawClient, id: &str, what: &str) {
    let r = iq(
        c,
        id,
        &format!("<iq type='set' id='{id}'><{what} xmlns='{CARBONS}'/></iq>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

/// The message wrapped in a `kind` carbon addressed to `to` (from the user's bare JID).
fn carbon<'a>(el: &'a Element, kind: &str, user: &str, to: &str) -> &'a Element {
    assert_eq!(el.name(), "message", "{}", xml(el));
    assert_eq!(
        el.attr("from"),
        Some(user),
        "a carbon comes from the user's bare JID: {}",
        xml(el)
    );
    assert_eq!(el.attr("to"), Some(to), "{}", xml(el));
    assert_eq!(
        el.attr("type"),
        Some("chat"),
        "the original's type: {}",
        xml(el)
    );
    assert!(body(el).is_none(), "the wrapper has no body: {}", xml(el));
    el.get_child(kind, CARBONS)
        .and_then(|c| c.get_child("forwarded", FORWARD))
        .and_then(|f| f.get_child("message", NS_CLIENT))
        .unwrap_or_else(|| panic!("a <{kind}/> carbon: {}", xml(el)))
}

#[tokio::test]
async fn carbons_copy_sent_and_received_messages_to_enabled_resources() {
    let s = server_with(&["alice", "bob"]).await;
    let mut a1 = online(&s, "alice", "a1").await;
    let mut a2 = online(&s, "alice", "a2").await;
    let mut a3 = online(&s, "alice", "a3").await;
    let mut bob = online(&s, "bob", "b").await;

    let r = iq(
        &mut a1,
        "disco",
        &format!("<iq type='get' id='disco' to='localhost'><query xmlns='{DISCO_INFO}'/></iq>"),
    )
    .await;
    assert!(
        r.get_child("query", DISCO_INFO)
            .is_some_and(|q| q.children().any(|f| f.attr("var") == Some(CARBONS))),
        "carbons advertised: {}",
        xml(&r)
    );
    carbons(&mut a2, "c-on", "enable").await;

    // Sent carbon (§8): a2 sees what a1 sent, without bob's archive id.
    let got = exchange(&mut a1, &mut bob, "bob@localhost", "s1", "from a1").await;
    assert_eq!(stanza_ids(&got, "bob@localhost").len(), 1, "{}", xml(&got));
    let c = recv_msg(&mut a2).await;
    let inner = carbon(&c, "sent", "alice@localhost", "alice@localhost/a2");
    assert_eq!(body(inner).as_deref(), Some("from a1"), "{}", xml(&c));
    assert_eq!(
        inner.attr("from"),
        Some("alice@localhost/a1"),
        "{}",
        xml(&c)
    );
    assert_eq!(inner.attr("to"), Some("bob@localhost"));
    assert_eq!(inner.attr("id"), Some("s1"));
    assert!(
        stanza_ids(inner, "bob@localhost").is_empty(),
        "bob's archive id is not copied to alice: {}",
        xml(&c)
    );
    assert_nothing(&mut a3, "a3 never enabled carbons").await;
    assert_nothing(&mut a1, "the sending resource gets no carbon").await;

    // Received carbon (§7): bob writes to a1; a1 gets the message, a2 a copy.
    let got = exchange(&mut bob, &mut a1, "alice@localhost/a1", "r1", "to a1").await;
    assert_eq!(got.attr("from"), Some("bob@localhost/b"));
    let c = recv_msg(&mut a2).await;
    let inner = carbon(&c, "received", "alice@localhost", "alice@localhost/a2");
    assert_eq!(body(inner).as_deref(), Some("to a1"), "{}", xml(&c));
    assert_eq!(inner.attr("from"), Some("bob@localhost/b"));
    assert_eq!(inner.attr("to"), Some("alice@localhost/a1"));
    assert_eq!(
        stanza_ids(inner, "alice@localhost"),
        stanza_ids(&got, "alice@localhost"),
        "the copy is the message as delivered: {}",
        xml(&c)
    );
    assert_nothing(&mut a3, "a3 never enabled carbons").await;
    assert_nothing(&mut a1, "a1 gets the message once").await;

    // To the bare JID with all three at the same priority: each gets the message itself, and
    // a2 no copy on top (§7: none to a resource that received the original).
    let got = exchange(&mut bob, &mut a1, "alice@localhost", "r3", "to all").await;
    assert_eq!(got.attr("id"), Some("r3"));
    let got = recv_msg(&mut a2).await;
    assert!(
        got.get_child("received", CARBONS).is_none() && body(&got).as_deref() == Some("to all"),
        "a2 gets the original: {}",
        xml(&got)
    );
    assert_eq!(body(&recv_msg(&mut a3).await).as_deref(), Some("to all"));
    assert_nothing(&mut a2, "one copy only").await;
    // a1 above the others: it alone gets the message, a2 a received carbon.
    a1.send("<presence><priority>5</priority></presence>").await;
    sync(&mut a1, "prio").await;
    sync(&mut a2, "prio").await;
    sync(&mut a3, "prio").await;
    exchange(&mut bob, &mut a1, "alice@localhost", "r4", "to the top").await;
    let c = recv_msg(&mut a2).await;
    let inner = carbon(&c, "received", "alice@localhost", "alice@localhost/a2");
    assert_eq!(body(inner).as_deref(), Some("to the top"), "{}", xml(&c));
    assert_eq!(inner.attr("to"), Some("alice@localhost"));
    assert_nothing(&mut a3, "a3 never enabled carbons").await;
    assert_nothing(&mut a1, "a1 gets the message once").await;

    // <private/> and <no-copy/>: no carbons either way.
    for (id, mark) in [
        ("p", "<private xmlns='urn:xmpp:carbons:2'/>"),
        ("n", "<no-copy xmlns='urn:xmpp:hints'/>"),
    ] {
        a1.send(&format!(
            "<message to='bob@localhost' type='chat' id='{id}1'><body>secret</body>{mark}</message>"
        ))
        .await;
        let got = recv_msg(&mut bob).await;
        assert_eq!(got.attr("id"), Some(format!("{id}1").as_str()));
        bob.send(&format!(
            "<message to='alice@localhost/a1' type='chat' id='{id}2'><body>secret</body>{mark}</message>"
        ))
        .await;
        let got = recv_msg(&mut a1).await;
        assert_eq!(got.attr("id"), Some(format!("{id}2").as_str()));
        assert_nothing(&mut a2, mark).await;
    }

    // Disabled: no more carbons.
    carbons(&mut a2, "c-off", "disable").await;
    exchange(&mut a1, &mut bob, "bob@localhost", "s2", "after disable").await;
    exchange(
        &mut bob,
        &mut a1,
        "alice@localhost/a1",
        "r2",
        "after disable",
    )
    .await;
    assert_nothing(&mut a2, "carbons disabled").await;
    assert_nothing(&mut a3, "a3 never enabled carbons").await;
}

/// XEP-0313 §3.5: the archive id SHOULD be in the forwarded message of a carbon. For a sent
/// carbon the archive the copy's reader can read is the sender's own.
#[tokio::test]
async fn sent_carbon_carries_the_senders_archive_id() {
    let s = server_with(&["alice", "bob"]).await;
    let mut a1 = online(&s, "alice", "a1").await;
    let mut a2 = online(&s, "alice", "a2").await;
    let mut bob = online(&s, "bob", "b").await;
    carbons(&mut a2, "c-on", "enable").await;
    exchange(&mut a1, &mut bob, "bob@localhost", "s1", "archived twice").await;
    let c = recv_msg(&mut a2).await;
    let inner = carbon(&c, "sent", "alice@localhost", "alice@localhost/a2").clone();
    sync(&mut a1, "a1").await;
    let all = archive(&mut a1).await;
    assert_eq!(all.bodies(), strs(&["archived twice"]));
    assert_eq!(
        stanza_ids(&inner, "alice@localhost"),
        vec![all.items[0].id.clone()],
        "the sent carbon carries alice's archive id: {}",
        xml(&c)
    );
}

/// XEP-0280 §4: carbons are enabled for a session; a new session with the same resource starts
/// without them.
#[tokio::test]
async fn carbons_end_with_the_session() {
    let s = server_with(&["alice", "bob"]).await;
    let mut a1 = online(&s, "alice", "a1").await;
    let mut a2 = online(&s, "alice", "a2").await;
    let mut bob = online(&s, "bob", "b").await;
    carbons(&mut a2, "c-on", "enable").await;
    exchange(&mut a1, &mut bob, "bob@localhost", "s1", "copied").await;
    let c = recv_msg(&mut a2).await;
    carbon(&c, "sent", "alice@localhost", "alice@localhost/a2");
    // Archive results are for the querying session only: never carbon-copied.
    sync(&mut a1, "a1").await;
    assert_eq!(archive_bodies(&mut a1).await, strs(&["copied"]));
    assert_nothing(&mut a2, "no copies of a1's archive results").await;
    logout(a2).await;

    let mut a2 = online(&s, "alice", "a2").await;
    exchange(&mut a1, &mut bob, "bob@localhost", "s2", "not copied").await;
    exchange(&mut bob, &mut a1, "alice@localhost/a1", "r1", "not copied").await;
    assert_nothing(&mut a2, "a new session has carbons off").await;
}

// --- Retention and administration ---------------------------------------------------------------

/// Starts a server on an existing data folder, retrying while the previous server's store is
/// still letting go of its lock.
async fn restart_on(dir: std::path::PathBuf, tweak: fn(&mut Config)) -> TestServer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let d = dir.clone();
        let started = tokio::spawn(TestServer::start_with(move |c| {
            c.data_dir = d;
            tweak(c);
        }))
        .await;
        match started {
            Ok(s) => return s,
            Err(e) if e.is_panic() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the server does not restart on {dir:?}: {e}"),
        }
    }
}

#[tokio::test]
async fn expire_after_empties_the_archive_at_restart_but_keeps_accounts_and_rosters() {
    let data = tempfile::tempdir().expect("tempdir");
    let dir = data.path().join("data");
    let d = dir.clone();
    let s = server_cfg(&["alice", "bob"], move |c| c.data_dir = d).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    let r = iq(
        &mut alice,
        "r1",
        &format!("<iq type='set' id='r1'><query xmlns='{ROSTER}'><item jid='bob@localhost' name='Bob'/></query></iq>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    for i in 0..3 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("e{i}"),
            &format!("old {i}"),
        )
        .await;
    }
    sync(&mut alice, "a").await;
    assert_eq!(archive(&mut bob).await.items.len(), 3);
    drop(alice);
    drop(bob);
    s.stop().await;

    tokio::time::sleep(Duration::from_millis(1300)).await;
    let s = restart_on(dir.clone(), |c| c.archive.expire_after = 1).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    // Retention runs in the background from startup: wait for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let b = archive(&mut bob).await;
        let a = archive(&mut alice).await;
        if a.items.is_empty() && b.items.is_empty() {
            assert_eq!(b.count(), Some(0), "{}", xml(&b.fin));
            assert_eq!(a.count(), Some(0), "{}", xml(&a.fin));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages older than expire_after are still archived: bob {:?}, alice {:?}",
            b.bodies(),
            a.bodies()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Accounts (the logins above) and the roster survived.
    let r = iq(
        &mut alice,
        "rg",
        &format!("<iq type='get' id='rg'><query xmlns='{ROSTER}'/></iq>"),
    )
    .await;
    let items: Vec<(Option<String>, Option<String>)> = r
        .get_child("query", ROSTER)
        .map(|q| {
            q.children()
                .filter(|i| i.is("item", ROSTER))
                .map(|i| {
                    (
                        i.attr("jid").map(str::to_owned),
                        i.attr("name").map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        items,
        vec![(Some("bob@localhost".into()), Some("Bob".into()))],
        "{}",
        xml(&r)
    );
    // New messages are archived as usual.
    exchange(&mut alice, &mut bob, "bob@localhost", "e9", "new").await;
    sync(&mut alice, "a2").await;
    assert_eq!(archive_bodies(&mut bob).await, strs(&["new"]));
    drop(alice);
    drop(bob);
    s.stop().await;
}

/// The line `ArchiveSize` prints for `jid`.
async fn archive_size(s: &TestServer, jid: &str) -> String {
    let r = s.admin(Request::ArchiveSize { jid: jid.into() }).await;
    assert!(r.error.is_none(), "archive size: {:?}", r.error);
    r.lines.join("\n")
}

#[tokio::test]
async fn admin_prune_and_size() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    for i in 0..3 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("o{i}"),
            &format!("old {i}"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for i in 0..2 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("n{i}"),
            &format!("new {i}"),
        )
        .await;
    }
    sync(&mut alice, "a").await;

    let size = archive_size(&s, "bob@localhost").await;
    assert!(size.contains("5 messages"), "{size}");

    // One account's messages older than 1 s.
    let r = s
        .admin(Request::ArchivePrune {
            jid: Some("bob@localhost".into()),
            older_than: "1s".into(),
        })
        .await;
    assert!(r.error.is_none(), "prune: {:?}", r.error);
    assert!(
        r.lines.join(" ").contains('3'),
        "prune reports what it removed: {:?}",
        r.lines
    );
    let size = archive_size(&s, "bob@localhost").await;
    assert!(size.contains("2 messages"), "{size}");
    let size = archive_size(&s, "alice@localhost").await;
    assert!(size.contains("5 messages"), "alice untouched: {size}");
    let a = archive(&mut bob).await;
    assert_eq!(a.bodies(), strs(&["new 0", "new 1"]));
    assert_eq!(a.count(), Some(2), "counts follow the prune");
    let a = mam(&mut bob, &[("with", "alice@localhost")], "", "")
        .await
        .unwrap();
    assert_eq!(a.count(), Some(2), "per-contact counts follow the prune");
    assert_eq!(archive(&mut alice).await.items.len(), 5);

    // Every account.
    let r = s
        .admin(Request::ArchivePrune {
            jid: None,
            older_than: "1s".into(),
        })
        .await;
    assert!(r.error.is_none(), "prune: {:?}", r.error);
    assert_eq!(archive_bodies(&mut alice).await, strs(&["new 0", "new 1"]));
    let size = archive_size(&s, "alice@localhost").await;
    assert!(size.contains("2 messages"), "{size}");
    assert_eq!(archive(&mut bob).await.items.len(), 2);
}

#[tokio::test]
async fn account_removal_removes_the_archive() {
    let s = server_with(&["alice", "bob"]).await;
    let mut alice = online(&s, "alice", "a").await;
    let mut bob = online(&s, "bob", "b").await;
    for i in 0..2 {
        exchange(
            &mut alice,
            &mut bob,
            "bob@localhost",
            &format!("k{i}"),
            &format!("before {i}"),
        )
        .await;
    }
    set_prefs(&mut bob, "roster", &[], &[]).await;
    logout(bob).await;
    // One waiting offline too.
    send_chat(&mut alice, "bob@localhost", "k9", "waiting").await;
    let errors = settle(&mut alice, "a").await;
    assert!(
        errors.is_empty(),
        "stored offline: {:?}",
        errors.iter().map(xml).collect::<Vec<_>>()
    );

    let r = s
        .admin(Request::UserRemove {
            jid: "bob@localhost".into(),
        })
        .await;
    assert!(r.error.is_none(), "user remove: {:?}", r.error);
    s.add_user("bob", PW).await;

    let (mut bob, msgs) = online_collect(&s, "bob", "b").await;
    assert!(
        msgs.is_empty(),
        "the old account's offline messages are gone: {:?}",
        msgs.iter().map(xml).collect::<Vec<_>>()
    );
    let a = archive(&mut bob).await;
    assert!(a.items.is_empty(), "archive emptied: {:?}", a.bodies());
    assert_eq!(a.count(), Some(0));
    let r = iq(
        &mut bob,
        "meta",
        &format!("<iq type='get' id='meta'><metadata xmlns='{MAM}'/></iq>"),
    )
    .await;
    assert!(
        r.get_child("metadata", MAM)
            .is_some_and(|m| m.children().next().is_none()),
        "{}",
        xml(&r)
    );
    assert_eq!(
        get_prefs(&mut bob).await.attr("default"),
        Some("always"),
        "preferences went with the account"
    );
    // Alice's own archive is hers: untouched.
    assert_eq!(
        archive_bodies(&mut alice).await,
        strs(&["before 0", "before 1", "waiting"])
    );
}
