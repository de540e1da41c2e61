//! RFC 6121 §2: Roster management (jabber:iq:roster) — roster get (marking the resource
//! interested), roster set (add/update one item; name and groups validated per §2.3.3) and roster
//! remove (§2.5, cancelling the subscriptions both ways through [`crate::presence`]), roster pushes
//! to every interested resource after each change, and roster versioning (§2.6: the store's
//! counter as `ver`; a get with the current `ver` gets an empty result). Pre-approval (§3.4) is
//! advertised here, with versioning, as a stream feature; the `approved` flag is processed in
//! [`crate::presence`]. Only the account itself may read or change its roster (`forbidden`).
//! Halyard policy: roster items are bare JIDs, and the user's own JID cannot be added
//! (`not-allowed`, as Prosody does).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use jid::BareJid;
use minidom::Element;

use crate::host::{Host, RosterItem, StoreResult};
use crate::ns;
use crate::presence;
use crate::registry::{IqHandler, IqReply, IqScope, Registry};
use crate::stanza::{n, Stanza, StanzaError};

/// Longest accepted item name or group name, in bytes (the "server-configured limit" of §2.3.3).
pub const MAX_NAME_LEN: usize = 1023;

/// What a roster push announces.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// The item was added or changed.
    Set(&'a RosterItem),
    /// The contact was removed (`subscription='remove'`).
    Remove(&'a BareJid),
}

/// The `<item/>` for a roster result or push (RFC 6121 §2.1.2).
pub fn item_element(item: &RosterItem) -> Element {
    let mut b = Element::builder("item", ns::ROSTER)
        .attr(n("jid"), item.jid.as_str())
        .attr(n("subscription"), item.subscription.as_str());
    if let Some(name) = &item.name {
        b = b.attr(n("name"), name.as_str());
    }
    if item.ask {
        b = b.attr(n("ask"), "subscribe");
    }
    if item.approved {
        b = b.attr(n("approved"), "true");
    }
    for g in &item.groups {
        b = b.append(
            Element::builder("group", ns::ROSTER)
                .append(g.as_str())
                .build(),
        );
    }
    b.build()
}

/// Sends a roster push (RFC 6121 §2.1.6) for `change` at version `ver` to each of `user`'s
/// interested resources.
pub async fn push(host: &dyn Host, user: &BareJid, change: Change<'_>, ver: u64) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let item = match change {
        Change::Set(item) => item_element(item),
        Change::Remove(contact) => Element::builder("item", ns::ROSTER)
            .attr(n("jid"), contact.to_string())
            .attr(n("subscription"), "remove")
            .build(),
    };
    let query = Element::builder("query", ns::ROSTER)
        .attr(n("ver"), ver.to_string())
        .append(item)
        .build();
    for r in host
        .resources(user)
        .into_iter()
        .filter(|r| r.roster_interested)
    {
        let iq = Element::builder("iq", ns::CLIENT)
            .attr(n("type"), "set")
            .attr(
                n("id"),
                format!("push{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
            )
            .attr(n("from"), user.to_string())
            .attr(n("to"), r.jid.to_string())
            .append(query.clone())
            .build();
        host.deliver(&r.jid, &iq);
    }
}

/// `user`'s item for `contact`, or a blank one (not in the roster, no subscription) when the store
/// has none.
pub async fn load(host: &dyn Host, user: &BareJid, contact: &BareJid) -> StoreResult<RosterItem> {
    Ok(host
        .roster()
        .item(user, contact)
        .await?
        .unwrap_or_else(|| RosterItem {
            jid: contact.to_string(),
            ..RosterItem::default()
        }))
}

/// What the owner sees of an item: nothing when it only holds a pending inbound request.
fn shown(item: &RosterItem) -> Option<RosterItem> {
    item.in_roster.then(|| RosterItem {
        pending_in: None,
        ..item.clone()
    })
}

/// Stores `new` in place of `old` (both `user`'s item for `contact`), dropping an item that no
/// longer holds any state, and pushes the change when it is visible in the roster.
pub async fn save(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    old: &RosterItem,
    new: &RosterItem,
) -> StoreResult<()> {
    if old == new {
        return Ok(());
    }
    let blank = RosterItem {
        jid: new.jid.clone(),
        ..RosterItem::default()
    };
    let ver = if *new == blank {
        host.roster().remove(user, contact).await?
    } else {
        host.roster().put(user, new).await?
    };
    if shown(old) != shown(new) {
        let change = if new.in_roster {
            Change::Set(new)
        } else {
            Change::Remove(contact)
        };
        push(host, user, change, ver).await;
    }
    Ok(())
}

fn store_failed(e: impl std::fmt::Display) -> IqReply {
    tracing::warn!(error = %e, "roster: store failed");
    IqReply::Error(StanzaError::InternalServerError(None))
}

async fn get(host: &dyn Host, iq: &Stanza, user: &BareJid, query: &Element) -> IqReply {
    if let Ok(full) = iq.from.try_as_full() {
        host.set_roster_interested(full);
    }
    let ver = match host.roster().version(user).await {
        Ok(v) => v.to_string(),
        Err(e) => return store_failed(e),
    };
    if query.attr("ver") == Some(ver.as_str()) {
        // §2.6.3: the client's copy is current; changes will come as pushes.
        return IqReply::Result(None);
    }
    let items = match host.roster().items(user).await {
        Ok(items) => items,
        Err(e) => return store_failed(e),
    };
    let mut b = Element::builder("query", ns::ROSTER).attr(n("ver"), ver);
    for item in items.iter().filter(|i| i.in_roster) {
        b = b.append(item_element(item));
    }
    IqReply::Result(Some(b.build()))
}

/// The name and groups of a roster set's item, validated per RFC 6121 §2.3.3.
fn name_and_groups(item: &Element) -> Result<(Option<String>, Vec<String>), StanzaError> {
    let name = item.attr("name").filter(|s| !s.is_empty());
    if name.is_some_and(|s| s.len() > MAX_NAME_LEN) {
        return Err(StanzaError::NotAcceptable(Some("name too long".into())));
    }
    let mut seen = HashSet::new();
    let mut groups = Vec::new();
    for g in item.children().filter(|c| c.is("group", ns::ROSTER)) {
        let g = g.text();
        if g.is_empty() || g.len() > MAX_NAME_LEN {
            return Err(StanzaError::NotAcceptable(Some(
                "group name empty or too long".into(),
            )));
        }
        if !seen.insert(g.clone()) {
            return Err(StanzaError::BadRequest(Some("duplicate group".into())));
        }
        groups.push(g);
    }
    Ok((name.map(str::to_owned), groups))
}

/// The contact a roster set is about.
fn contact_of(item: &Element, user: &BareJid) -> Result<BareJid, StanzaError> {
    let raw = item
        .attr("jid")
        .ok_or_else(|| StanzaError::BadRequest(Some("item without jid".into())))?;
    let jid = crate::stanza::parse_jid(raw).map_err(|e| StanzaError::JidMalformed(Some(e)))?;
    let contact = BareJid::try_from(jid)
        .map_err(|_| StanzaError::BadRequest(Some("roster items are bare JIDs".into())))?;
    if &contact == user {
        return Err(StanzaError::NotAllowed(Some(
            "cannot add yourself to your roster".into(),
        )));
    }
    Ok(contact)
}

async fn set(host: &dyn Host, user: &BareJid, query: &Element) -> IqReply {
    let mut items = query.children().filter(|c| c.is("item", ns::ROSTER));
    let (Some(item), None) = (items.next(), items.next()) else {
        return IqReply::Error(StanzaError::BadRequest(Some(
            "a roster set carries exactly one item".into(),
        )));
    };
    let contact = match contact_of(item, user) {
        Ok(c) => c,
        Err(e) => return IqReply::Error(e),
    };
    let mut stored = match load(host, user, &contact).await {
        Ok(i) => i,
        Err(e) => return store_failed(e),
    };
    if item.attr("subscription") == Some("remove") {
        // An item holding only a pending inbound request is not in the user's roster.
        if !stored.in_roster {
            return IqReply::Error(StanzaError::ItemNotFound(None));
        }
        let ver = match host.roster().remove(user, &contact).await {
            Ok(v) => v,
            Err(e) => return store_failed(e),
        };
        tracing::debug!(%user, %contact, "roster: item removed");
        push(host, user, Change::Remove(&contact), ver).await;
        if let Err(e) = presence::removed(host, user, &contact, &stored).await {
            return store_failed(e);
        }
        return IqReply::Result(None);
    }
    // Any other 'subscription' value, 'ask' and 'approved' are the server's to set (§2.1.2, §2.1.5).
    let (name, groups) = match name_and_groups(item) {
        Ok(v) => v,
        Err(e) => return IqReply::Error(e),
    };
    if !stored.in_roster {
        let max = host.settings().roster.max_items;
        let held = match host.roster().items(user).await {
            Ok(items) => items.iter().filter(|i| i.in_roster).count(),
            Err(e) => return store_failed(e),
        };
        if held >= max {
            return IqReply::Error(StanzaError::NotAllowed(Some(format!(
                "the roster holds its limit of {max} contacts (roster.max_items)"
            ))));
        }
    }
    stored.name = name;
    stored.groups = groups;
    stored.in_roster = true;
    match host.roster().put(user, &stored).await {
        Ok(ver) => {
            tracing::debug!(%user, %contact, "roster: item set");
            push(host, user, Change::Set(&stored), ver).await;
            IqReply::Result(None)
        }
        Err(e) => store_failed(e),
    }
}

struct RosterIq;

#[async_trait]
impl IqHandler for RosterIq {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        let user = iq.from.to_bare();
        // §2.1.5 security warning: only the account itself may manage its roster.
        if iq.to.as_ref().is_some_and(|to| to.to_bare() != user) {
            return IqReply::Error(StanzaError::Forbidden(None));
        }
        let Some(query) = iq.payload().filter(|q| q.is("query", ns::ROSTER)) else {
            return IqReply::Error(StanzaError::BadRequest(None));
        };
        match iq.type_() {
            "get" => get(host, iq, &user, query).await,
            "set" => set(host, &user, query).await,
            _ => IqReply::Error(StanzaError::BadRequest(None)),
        }
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("RFC6121-roster");
    reg.iq(IqScope::Account, ns::ROSTER, Arc::new(RosterIq));
    reg.stream_feature(Element::bare("ver", ns::ROSTER_VER));
    reg.stream_feature(Element::bare("sub", ns::PRE_APPROVAL));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Subscription;
    use crate::testing::{addr, TestHost};

    const GET: &str = "<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>";

    fn set_iq(items: &str) -> String {
        format!("<iq type='set' id='s'><query xmlns='jabber:iq:roster'>{items}</query></iq>")
    }

    fn ok(reply: IqReply) -> Option<Element> {
        match reply {
            IqReply::Result(p) => p,
            IqReply::Error(e) => panic!("unexpected error {e:?}"),
        }
    }

    fn err(reply: IqReply) -> &'static str {
        match reply {
            IqReply::Error(e) => e.condition(),
            IqReply::Result(p) => panic!("unexpected result {p:?}"),
        }
    }

    fn item(contact: &str, subscription: Subscription) -> RosterItem {
        RosterItem {
            jid: addr(contact),
            subscription,
            in_roster: true,
            ..RosterItem::default()
        }
    }

    /// Binds `jid` and makes it interested and available, then clears the delivery log.
    async fn online(h: &TestHost, jid: &str) {
        h.bind(jid);
        ok(h.iq(jid, GET).await);
        h.presence(jid, "<presence/>").await;
        h.take();
    }

    #[tokio::test]
    async fn a_full_roster_refuses_new_contacts_but_edits_old_ones() {
        let mut h = TestHost::new(&["a", "b", "c", "d"]);
        h.settings.roster.max_items = 2;
        h.bind("a/r");
        for c in ["b", "c"] {
            let set = set_iq(&format!("<item jid='{c}@example.com'/>"));
            ok(h.iq("a/r", &set).await);
        }
        let r = h.iq("a/r", &set_iq("<item jid='d@example.com'/>")).await;
        let IqReply::Error(e) = r else {
            panic!("a third contact was accepted")
        };
        assert_eq!(e.condition(), "not-allowed");
        let shown = String::from(&e.to_element());
        assert!(shown.contains("roster.max_items"), "{shown}");
        // Renaming a contact it holds is no addition.
        ok(h.iq("a/r", &set_iq("<item jid='b@example.com' name='B'/>"))
            .await);
        let roster = ok(h.iq("a/r", GET).await).expect("a roster");
        assert_eq!(roster.children().count(), 2);
    }

    /// Issue 7: ℻ prepares to FAX, then to fax; such a contact is jid-malformed, not stored.
    #[tokio::test]
    async fn set_with_an_unstable_jid_is_jid_malformed() {
        let h = TestHost::new(&["a", "b"]);
        h.bind("a/r");
        let r = h
            .iq("a/r", &set_iq("<item jid='\u{213b}@example.com'/>"))
            .await;
        assert_eq!(err(r), "jid-malformed");
        let roster = ok(h.iq("a/r", GET).await).expect("a roster");
        assert_eq!(roster.children().count(), 0, "nothing stored");
    }

    #[tokio::test]
    async fn get_lists_the_visible_roster_and_marks_the_resource_interested() {
        let h = TestHost::new(&["a", "b", "c"]);
        h.bind("a/r");
        h.put_item(
            "a",
            RosterItem {
                name: Some("Bee".into()),
                groups: vec!["Friends".into()],
                ..item("b", Subscription::Both)
            },
        );
        h.put_item(
            "a",
            RosterItem {
                pending_in: Some("<presence/>".into()),
                in_roster: false,
                ..item("c", Subscription::None)
            },
        );
        let q = ok(h.iq("a/r", GET).await).expect("a query");
        assert_eq!(q.attr("ver"), Some("2"));
        let items: Vec<_> = q.children().collect();
        assert_eq!(items.len(), 1, "the pending-only item is hidden");
        assert_eq!(items[0].attr("jid"), Some("b@example.com"));
        assert_eq!(items[0].attr("name"), Some("Bee"));
        assert_eq!(items[0].attr("subscription"), Some("both"));
        assert_eq!(
            items[0].get_child("group", ns::ROSTER).map(|g| g.text()),
            Some("Friends".into())
        );
        assert!(h.session("a/r").is_some_and(|s| s.interested));
        assert!(h.take().is_empty());
    }

    #[tokio::test]
    async fn versioning_answers_a_current_version_with_an_empty_result() {
        let h = TestHost::new(&["a", "b"]);
        h.bind("a/r");
        h.put_item("a", item("b", Subscription::To));
        let current = "<iq type='get' id='g'><query xmlns='jabber:iq:roster' ver='1'/></iq>";
        assert!(ok(h.iq("a/r", current).await).is_none());
        let stale = "<iq type='get' id='g'><query xmlns='jabber:iq:roster' ver='0'/></iq>";
        let q = ok(h.iq("a/r", stale).await).expect("the full roster");
        assert_eq!((q.attr("ver"), q.children().count()), (Some("1"), 1));
        let features: Vec<_> = h
            .registry()
            .stream_features()
            .iter()
            .map(|f| (f.name().to_owned(), f.ns()))
            .collect();
        assert!(features.contains(&("ver".into(), ns::ROSTER_VER.into())));
        assert!(features.contains(&("sub".into(), ns::PRE_APPROVAL.into())));
    }

    #[tokio::test]
    async fn set_pushes_to_interested_resources_only_and_keeps_subscription_state() {
        let h = TestHost::new(&["a", "b"]);
        h.bind("a/r1");
        h.bind("a/r2");
        ok(h.iq("a/r1", GET).await);
        let add = set_iq("<item jid='b@example.com' name='Bee'><group>G</group></item>");
        assert!(ok(h.iq("a/r2", &add).await).is_none());
        let log = h.take();
        assert_eq!(log.len(), 1);
        let (to, push) = &log[0];
        assert_eq!(to.as_str(), "a@example.com/r1");
        assert_eq!(
            (push.attr("type"), push.attr("from")),
            (Some("set"), Some("a@example.com"))
        );
        let q = push.get_child("query", ns::ROSTER).expect("query");
        assert_eq!(q.attr("ver"), Some("1"));
        let pushed = q.get_child("item", ns::ROSTER).expect("item");
        assert_eq!(
            (pushed.attr("name"), pushed.attr("subscription")),
            (Some("Bee"), Some("none"))
        );
        assert_eq!(
            pushed.get_child("group", ns::ROSTER).map(|g| g.text()),
            Some("G".into())
        );

        // A set cannot change the subscription; an update keeps it.
        h.put_item(
            "a",
            RosterItem {
                approved: true,
                ..item("b", Subscription::From)
            },
        );
        ok(h.iq(
            "a/r1",
            &set_iq("<item jid='b@example.com' subscription='both'/>"),
        )
        .await);
        assert_eq!(h.lines(), ["a/r1: push b from approved"]);
        let stored = h.item("a", "b").expect("item");
        assert_eq!(
            (stored.subscription, stored.name, stored.groups.len()),
            (Subscription::From, None, 0)
        );
    }

    #[tokio::test]
    async fn invalid_sets_are_refused() {
        let h = TestHost::new(&["a", "b"]);
        h.bind("a/r");
        ok(h.iq("a/r", GET).await);
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for (items, condition) in [
            (
                "<item jid='b@example.com'/><item jid='c@example.com'/>",
                "bad-request",
            ),
            ("", "bad-request"),
            ("<item name='no jid'/>", "bad-request"),
            ("<item jid='@example.com'/>", "jid-malformed"),
            ("<item jid='b@example.com/r'/>", "bad-request"),
            ("<item jid='a@example.com'/>", "not-allowed"),
            (
                "<item jid='b@example.com'><group>G</group><group>G</group></item>",
                "bad-request",
            ),
            (
                "<item jid='b@example.com'><group/></item>",
                "not-acceptable",
            ),
            (
                &format!("<item jid='b@example.com' name='{long}'/>"),
                "not-acceptable",
            ),
            (
                "<item jid='b@example.com' subscription='remove'/>",
                "item-not-found",
            ),
        ] {
            assert_eq!(err(h.iq("a/r", &set_iq(items)).await), condition, "{items}");
        }
        // Only the account itself manages its roster (§2.1.5).
        let foreign = "<iq type='set' to='b' id='s'><query xmlns='jabber:iq:roster'><item jid='c@example.com'/></query></iq>";
        assert_eq!(err(h.iq("a/r", foreign).await), "forbidden");
        assert_eq!(
            err(h
                .iq(
                    "a/r",
                    "<iq type='get' to='b' id='g'><query xmlns='jabber:iq:roster'/></iq>"
                )
                .await),
            "forbidden"
        );
        assert!(h.take().is_empty());
        assert!(h.item("a", "b").is_none() && h.item("b", "c").is_none());
    }

    #[tokio::test]
    async fn remove_cancels_the_subscriptions_both_ways() {
        let h = TestHost::new(&["a", "b"]);
        h.put_item("a", item("b", Subscription::Both));
        h.put_item("b", item("a", Subscription::Both));
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        h.take();
        let remove = set_iq("<item jid='b@example.com' subscription='remove'/>");
        assert!(ok(h.iq("a/r", &remove).await).is_none());
        assert_eq!(
            h.lines(),
            [
                "a/r: push b remove",
                "b/r: unsubscribe a -> b",
                "b/r: push a to",
                "a/r: unavailable b/r -> a",
                "b/r: unavailable a/r -> b",
                "b/r: unsubscribed a -> b",
                "b/r: push a none",
            ]
        );
        assert!(h.item("a", "b").is_none());
        assert_eq!(
            h.item("b", "a").map(|i| (i.subscription, i.ask)),
            Some((Subscription::None, false))
        );
    }

    #[tokio::test]
    async fn remove_withdraws_pending_requests() {
        let h = TestHost::new(&["a", "b"]);
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        // a asks b, b asks a; then a removes b: both requests go.
        h.presence("a/r", "<presence type='subscribe' to='b'/>")
            .await;
        h.presence("b/r", "<presence type='subscribe' to='a'/>")
            .await;
        h.take();
        ok(h.iq(
            "a/r",
            &set_iq("<item jid='b@example.com' subscription='remove'/>"),
        )
        .await);
        assert_eq!(
            h.lines(),
            [
                "a/r: push b remove",
                "b/r: unsubscribe a -> b",
                "b/r: unsubscribed a -> b",
                "b/r: push a none"
            ]
        );
        assert!(h.item("a", "b").is_none());
        let b_item = h.item("b", "a").expect("b keeps its item");
        assert!(!b_item.ask && b_item.pending_in.is_none() && b_item.in_roster);
    }
}
