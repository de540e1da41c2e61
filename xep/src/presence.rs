//! RFC 6121 §3 (presence subscriptions) and §4 (exchanging presence) for local accounts. There is
//! no federation yet, so the sender's outbound and the contact's inbound processing both run in
//! the hook call that receives the client's stanza.
//!
//! - Subscriptions: `subscribe`, `subscribed`, `unsubscribe` and `unsubscribed` through every state
//!   of Appendix A, pending in/out included, with roster pushes on both sides; subscription
//!   stanzas always travel from bare JID to bare JID. A request waits in the contact's roster store
//!   until answered and is delivered again at each initial presence (§3.1.3). Pre-approval (§3.4)
//!   and the auto-reply for an existing subscription (§3.1.3) are supported. Roster removal
//!   (§2.5.2) cancels subscriptions through [`removed`].
//! - Presence: initial presence (answering the implicit probes from the contacts' and other own
//!   resources' current presence, and delivering pending requests), broadcasts to `from` contacts
//!   and to all of the user's available resources, sender included (§4.2.2, §4.4.2), unavailable
//!   (also to directed-presence recipients, §4.6.3) and on session end, directed presence with
//!   tracking (§4.6), client probes (§4.3.2, answered only for subscribed users) and error presence.
//!
//! Halyard choices: an out-of-range or non-numeric `<priority/>` gets a `bad-request` presence
//! error (RFC 6120 §8.3.3.1) and the presence is dropped; the auto-reply to a request for an
//! existing subscription is delivered to the requester even though its state does not change
//! (Appendix A.3.2 would drop it, leaving the request unanswered); unauthorized probes are
//! ignored; subscription stanzas to one's own JID are ignored.

use std::sync::Arc;

use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use minidom::rxml::Namespace;
use minidom::Element;

use crate::host::{Host, RosterItem, StoreResult};
use crate::ns;
use crate::registry::{Flow, Registry, SessionHook, StanzaHook, Target};
use crate::roster::{load, save};
use crate::stanza::{n, Stanza, StanzaError};

/// The presence hook's priority: low, so that filtering modules (blocking, privacy) run first.
pub const HOOK_PRIORITY: i32 = 0;

/// `el` with its addresses replaced.
fn stamp(el: &Element, from: &Jid, to: &Jid) -> Element {
    let mut el = el.clone();
    el.set_attr(Namespace::NONE, n("from"), from.to_string());
    el.set_attr(Namespace::NONE, n("to"), to.to_string());
    el
}

/// A presence stanza of `type_` with no payload.
fn presence(type_: &str, from: &Jid, to: &Jid) -> Element {
    let el = Element::builder("presence", ns::CLIENT)
        .attr(n("type"), type_)
        .build();
    stamp(&el, from, to)
}

fn available(host: &dyn Host, user: &BareJid) -> Vec<FullJid> {
    host.resources(user)
        .into_iter()
        .filter(|r| r.is_available())
        .map(|r| r.jid)
        .collect()
}

fn interested(host: &dyn Host, user: &BareJid) -> Vec<FullJid> {
    host.resources(user)
        .into_iter()
        .filter(|r| r.roster_interested)
        .map(|r| r.jid)
        .collect()
}

fn deliver_all(host: &dyn Host, to: &[FullJid], el: &Element) {
    for jid in to {
        host.deliver(jid, el);
    }
}

/// Delivers `el` to `to` (RFC 6121 §8.5): that resource for a full JID, if bound; each available
/// resource for a bare JID.
fn deliver_to(host: &dyn Host, to: &Jid, el: &Element) {
    match to.try_as_full() {
        Ok(full) => {
            host.deliver(full, el);
        }
        Err(bare) => deliver_all(host, &available(host, bare), el),
    }
}

/// Sends the current presence of each of `owner`'s available resources to `to` (except to `to`
/// itself): the answer to a probe (§4.3.2) or the presence following an approval (§3.1.5).
fn send_current(host: &dyn Host, owner: &BareJid, to: &Jid) {
    for r in host.resources(owner) {
        if let Some(p) = r.presence.as_ref().filter(|_| *r.jid != *to) {
            deliver_to(host, to, &stamp(p, &r.jid, to));
        }
    }
}

/// Sends `unavailable` from each of `owner`'s available resources to `to` (§3.2.2, §3.3.3).
fn send_unavailable(host: &dyn Host, owner: &BareJid, to: &BareJid) {
    for jid in available(host, owner) {
        deliver_to(host, to, &presence("unavailable", &jid, to));
    }
}

/// Whether `jid` is an account of this server, i.e. whether its side of a subscription is
/// processed here.
async fn is_local_account(host: &dyn Host, jid: &BareJid) -> StoreResult<bool> {
    Ok(jid.node().is_some()
        && host.is_local_domain(jid.domain().as_str())
        && host.account_exists(jid).await?)
}

/// The contacts of the items matching `pred`.
fn contacts(items: &[RosterItem], pred: impl Fn(&RosterItem) -> bool) -> Vec<BareJid> {
    items
        .iter()
        .filter(|i| pred(i))
        // Roster items come from our store: their JIDs were checked by the roster set.
        .filter_map(|i| match BareJid::new(&i.jid) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(error = %e, "presence: invalid JID in roster store");
                None
            }
        })
        .collect()
}

// --- Subscriptions (§3). `user` is always the owner of the roster being changed first. ---

/// §3.1.2 then §3.1.3: `user` asks to subscribe to `contact`'s presence.
async fn subscribe(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    let old = load(host, user, contact).await?;
    let ask = old.ask || !old.subscription.has_to();
    save(
        host,
        user,
        contact,
        &old,
        &RosterItem {
            in_roster: true,
            ask,
            ..old.clone()
        },
    )
    .await?;
    if !is_local_account(host, contact).await? {
        return Ok(());
    }
    let theirs = load(host, contact, user).await?;
    if theirs.subscription.has_from() {
        return subscribed_in(
            host,
            user,
            contact,
            &presence("subscribed", contact, user),
            true,
        )
        .await;
    }
    if theirs.approved {
        tracing::debug!(%user, %contact, "presence: subscription pre-approved");
        return approve(
            host,
            contact,
            user,
            &theirs,
            &presence("subscribed", contact, user),
        )
        .await;
    }
    save(
        host,
        contact,
        user,
        &theirs,
        &RosterItem {
            pending_in: Some(String::from(el)),
            ..theirs.clone()
        },
    )
    .await?;
    deliver_all(host, &available(host, contact), el);
    Ok(())
}

/// §3.1.5 (or §3.4 automatically): `user` approves `contact`'s pending request; `old` is the
/// user's item for the contact.
async fn approve(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    old: &RosterItem,
    el: &Element,
) -> StoreResult<()> {
    let new = RosterItem {
        subscription: old.subscription.with_from(true),
        pending_in: None,
        approved: false,
        in_roster: true,
        ..old.clone()
    };
    subscribed_in(host, contact, user, el, false).await?;
    save(host, user, contact, old, &new).await?;
    send_current(host, user, contact);
    Ok(())
}

/// `user` sends `subscribed` to `contact`: an approval if the contact asked (§3.1.5), else a
/// pre-approval (§3.4); ignored when the contact is already subscribed.
async fn subscribed(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    let old = load(host, user, contact).await?;
    if old.subscription.has_from() {
        tracing::debug!(%user, %contact, "presence: subscribed for an existing subscription ignored");
        return Ok(());
    }
    if old.pending_in.is_some() {
        return approve(host, user, contact, &old, el).await;
    }
    save(
        host,
        user,
        contact,
        &old,
        &RosterItem {
            approved: true,
            in_roster: true,
            ..old.clone()
        },
    )
    .await
}

/// §3.1.6: `user` receives `contact`'s approval. `auto_reply` marks the contact's server's answer to
/// a request for a subscription that exists already (§3.1.3), shown even when nothing changes.
async fn subscribed_in(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
    auto_reply: bool,
) -> StoreResult<()> {
    if !is_local_account(host, user).await? {
        return Ok(());
    }
    let old = load(host, user, contact).await?;
    let pending = old.ask && !old.subscription.has_to();
    if pending || auto_reply {
        // Delivered before the roster push (§3.1.6).
        deliver_all(host, &interested(host, user), el);
    }
    if pending {
        let new = RosterItem {
            subscription: old.subscription.with_to(true),
            ask: false,
            ..old.clone()
        };
        save(host, user, contact, &old, &new).await?;
    }
    Ok(())
}

/// §3.3.2: `user` unsubscribes from `contact`'s presence.
async fn unsubscribe(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    let old = load(host, user, contact).await?;
    let new = RosterItem {
        subscription: old.subscription.with_to(false),
        ask: false,
        ..old.clone()
    };
    save(host, user, contact, &old, &new).await?;
    unsubscribe_in(host, contact, user, el).await
}

/// §3.3.3: `contact` no longer wants `user`'s presence (or withdraws its pending request).
async fn unsubscribe_in(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    if !is_local_account(host, user).await? {
        return Ok(());
    }
    let old = load(host, user, contact).await?;
    if !old.subscription.has_from() && old.pending_in.is_none() {
        return Ok(());
    }
    deliver_all(host, &interested(host, user), el);
    let new = RosterItem {
        subscription: old.subscription.with_from(false),
        pending_in: None,
        ..old.clone()
    };
    save(host, user, contact, &old, &new).await?;
    if old.subscription.has_from() {
        send_unavailable(host, user, contact);
    }
    Ok(())
}

/// §3.2.2 and §3.4: `user` cancels or refuses `contact`'s subscription, or withdraws a
/// pre-approval (which is not routed).
async fn unsubscribed(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    let old = load(host, user, contact).await?;
    if old.subscription.has_from() {
        // While the contact is still subscribed (§3.2.2).
        send_unavailable(host, user, contact);
    }
    let new = RosterItem {
        subscription: old.subscription.with_from(false),
        pending_in: None,
        approved: false,
        ..old.clone()
    };
    save(host, user, contact, &old, &new).await?;
    if old.subscription.has_from() || old.pending_in.is_some() {
        unsubscribed_in(host, contact, user, el).await?;
    }
    Ok(())
}

/// §3.2.3: `user` loses its subscription to (or its pending request for) `contact`'s presence.
async fn unsubscribed_in(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    el: &Element,
) -> StoreResult<()> {
    if !is_local_account(host, user).await? {
        return Ok(());
    }
    let old = load(host, user, contact).await?;
    if !old.subscription.has_to() && !old.ask {
        return Ok(());
    }
    deliver_all(host, &interested(host, user), el);
    let new = RosterItem {
        subscription: old.subscription.with_to(false),
        ask: false,
        ..old.clone()
    };
    save(host, user, contact, &old, &new).await
}

/// RFC 6121 §2.5.2: `user` removed `contact` from the roster (`old` is the removed item, already
/// gone from the store and pushed): the subscriptions it held are cancelled on the contact's side
/// as if the user had sent `unsubscribe` and `unsubscribed`.
pub async fn removed(
    host: &dyn Host,
    user: &BareJid,
    contact: &BareJid,
    old: &RosterItem,
) -> StoreResult<()> {
    if old.subscription.has_to() || old.ask {
        unsubscribe_in(host, contact, user, &presence("unsubscribe", user, contact)).await?;
    }
    if old.subscription.has_from() || old.pending_in.is_some() {
        if old.subscription.has_from() {
            send_unavailable(host, user, contact);
        }
        unsubscribed_in(
            host,
            contact,
            user,
            &presence("unsubscribed", user, contact),
        )
        .await?;
    }
    Ok(())
}

// --- Presence (§4). ---

/// The `<priority/>` of an available presence (§4.7.2.3), 0 when absent.
fn priority(el: &Element) -> Result<i8, StanzaError> {
    match el.get_child("priority", ns::CLIENT) {
        None => Ok(0),
        Some(p) => p.text().trim().parse().map_err(|_| {
            StanzaError::BadRequest(Some("priority must be an integer from -128 to 127".into()))
        }),
    }
}

/// Delivers `el` (sent by `full`) to the contacts subscribed to the user's presence and to the
/// user's available resources, `full` itself when `reflect`. Returns the contacts reached.
fn broadcast_to(
    host: &dyn Host,
    full: &FullJid,
    items: &[RosterItem],
    el: &Element,
    reflect: bool,
) -> Vec<BareJid> {
    let user = full.to_bare();
    let subscribers = contacts(items, |i| i.subscription.has_from());
    for contact in &subscribers {
        deliver_to(host, contact, &stamp(el, full, contact));
    }
    let mut own = available(host, &user);
    own.retain(|j| j != full);
    if reflect {
        own.push(full.clone());
    }
    deliver_all(host, &own, &stamp(el, full, &user));
    subscribers
}

/// Available presence without `to`: initial presence (§4.2) or an update (§4.4).
async fn available_broadcast(host: &dyn Host, full: &FullJid, st: &Stanza) -> StoreResult<()> {
    let prio = match priority(&st.el) {
        Ok(p) => p,
        Err(e) => {
            reply_error(host, full, st, e);
            return Ok(());
        }
    };
    let user = full.to_bare();
    let before = host.resources(&user).into_iter().find(|r| &r.jid == full);
    let initial = !before.as_ref().is_some_and(|r| r.is_available());
    let became_eligible = prio >= 0
        && before
            .as_ref()
            .is_none_or(|r| !r.is_available() || r.priority < 0);
    let items = host.roster().items(&user).await?;
    let mut el = st.el.clone();
    el.set_attr(Namespace::NONE, n("from"), full.to_string());
    host.set_presence(full, Some((el.clone(), prio)));
    if became_eligible {
        for hook in host.registry().session_hooks() {
            hook.available(host, full).await;
        }
    }
    broadcast_to(host, full, &items, &el, true);
    if initial {
        tracing::debug!(%full, "presence: initial presence");
        let me = Jid::from(full.clone());
        for contact in contacts(&items, |i| i.subscription.has_to()) {
            send_current(host, &contact, &me);
        }
        send_current(host, &user, &me);
        for req in items.iter().filter_map(|i| i.pending_in.as_deref()) {
            match req.parse::<Element>() {
                Ok(req) => {
                    host.deliver(full, &req);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "presence: stored subscription request unreadable")
                }
            }
        }
    }
    Ok(())
}

/// `full` becomes unavailable (§4.5.2): its broadcast audience (if it was available) and every
/// entity it sent directed presence to (§4.6.3) get `el`, or a plain unavailable presence.
/// `reflect` when the resource is still connected.
async fn unavailable(
    host: &dyn Host,
    full: &FullJid,
    el: Option<&Element>,
    was_available: bool,
    reflect: bool,
    directed: Vec<Jid>,
) -> StoreResult<()> {
    let mut el = el
        .cloned()
        .unwrap_or_else(|| Element::builder("presence", ns::CLIENT).build());
    el.set_attr(Namespace::NONE, n("type"), "unavailable");
    host.set_presence(full, None);
    for to in &directed {
        host.remove_directed_presence(full, to);
    }
    let reached = if was_available {
        let items = host.roster().items(&full.to_bare()).await?;
        broadcast_to(host, full, &items, &el, reflect)
    } else {
        Vec::new()
    };
    for to in directed
        .iter()
        .filter(|to| !reached.contains(&to.to_bare()))
    {
        deliver_to(host, to, &stamp(&el, full, to));
    }
    Ok(())
}

/// Directed presence (§4.6): delivered to `to`, and remembered when the target does not get the
/// user's presence through a subscription, so that it hears of the user going offline.
async fn directed(host: &dyn Host, full: &FullJid, to: &Jid, st: &Stanza) -> StoreResult<()> {
    deliver_to(host, to, &stamp(&st.el, full, to));
    let (user, target) = (full.to_bare(), to.to_bare());
    if target == user {
        return Ok(());
    }
    if st.type_() == "unavailable" {
        host.remove_directed_presence(full, to);
    } else if !host
        .roster()
        .item(&user, &target)
        .await?
        .is_some_and(|i| i.subscription.has_from())
    {
        host.add_directed_presence(full, to);
    }
    Ok(())
}

/// A probe sent by a client (§4.3.2): answered only if the contact allows the user its presence.
async fn probe(host: &dyn Host, full: &FullJid, contact: &BareJid) -> StoreResult<()> {
    let user = full.to_bare();
    let allowed = *contact == user
        || host
            .roster()
            .item(contact, &user)
            .await?
            .is_some_and(|i| i.subscription.has_from());
    if !allowed {
        tracing::debug!(%full, %contact, "presence: unauthorized probe ignored");
        return Ok(());
    }
    let me = Jid::from(full.clone());
    if available(host, contact).is_empty() {
        host.deliver(full, &presence("unavailable", contact, &me));
    } else {
        send_current(host, contact, &me);
    }
    Ok(())
}

fn reply_error(host: &dyn Host, full: &FullJid, st: &Stanza, err: StanzaError) {
    if let Some(reply) = st.error_reply(err) {
        host.deliver(full, &reply);
    }
}

async fn process(host: &dyn Host, full: &FullJid, st: &Stanza) -> StoreResult<()> {
    let user = full.to_bare();
    match (st.type_(), &st.to) {
        (t @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed"), Some(to)) => {
            let contact = to.to_bare();
            if contact == user {
                tracing::debug!(%full, "presence: subscription to self ignored");
                return Ok(());
            }
            tracing::debug!(%user, %contact, kind = t, "presence: subscription");
            let el = stamp(&st.el, &user, &contact);
            match t {
                "subscribe" => subscribe(host, &user, &contact, &el).await,
                "subscribed" => subscribed(host, &user, &contact, &el).await,
                "unsubscribe" => unsubscribe(host, &user, &contact, &el).await,
                _ => unsubscribed(host, &user, &contact, &el).await,
            }
        }
        ("probe", Some(to)) => probe(host, full, &to.to_bare()).await,
        ("available", None) => available_broadcast(host, full, st).await,
        ("unavailable", None) => {
            let was_available = host
                .resources(&user)
                .iter()
                .any(|r| &r.jid == full && r.is_available());
            unavailable(
                host,
                full,
                Some(&st.el),
                was_available,
                true,
                host.directed_presence(full),
            )
            .await
        }
        ("available" | "unavailable", Some(to)) => directed(host, full, to, st).await,
        ("error", Some(to)) => {
            deliver_to(host, to, &stamp(&st.el, full, to));
            Ok(())
        }
        ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" | "probe" | "error", None) => {
            tracing::debug!(%full, "presence: no addressee, ignored");
            Ok(())
        }
        (_, _) => {
            reply_error(
                host,
                full,
                st,
                StanzaError::BadRequest(Some("unknown presence type".into())),
            );
            Ok(())
        }
    }
}

struct PresenceHook;

#[async_trait]
impl StanzaHook for PresenceHook {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, target: Target) -> Flow {
        // Presence to the server itself is left to other hooks and the router's default.
        let (Ok(full), false) = (st.from.try_as_full(), target == Target::Host) else {
            return Flow::Pass;
        };
        if let Err(e) = process(host, full, st).await {
            tracing::warn!(error = %e, "presence: store failed");
            reply_error(host, full, st, StanzaError::InternalServerError(None));
        }
        Flow::Handled
    }
}

struct SessionEnd;

#[async_trait]
impl SessionHook for SessionEnd {
    async fn ended(
        &self,
        host: &dyn Host,
        full: &FullJid,
        presence: Option<&Element>,
        directed: &[Jid],
    ) {
        let was_available = presence.is_some()
            || host
                .resources(&full.to_bare())
                .iter()
                .any(|r| &r.jid == full && r.is_available());
        if let Err(e) = unavailable(host, full, None, was_available, false, directed.to_vec()).await
        {
            tracing::warn!(error = %e, "presence: store failed at session end");
        }
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("RFC6121-presence");
    reg.presence_hook(HOOK_PRIORITY, Arc::new(PresenceHook));
    reg.session_hook(Arc::new(SessionEnd));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Subscription;
    use crate::testing::{addr, TestHost};

    fn item(contact: &str, subscription: Subscription) -> RosterItem {
        RosterItem {
            jid: addr(contact),
            subscription,
            in_roster: true,
            ..RosterItem::default()
        }
    }

    /// `a` and `b` subscribed to each other.
    fn friends(h: &TestHost, a: &str, b: &str) {
        h.put_item(a, item(b, Subscription::Both));
        h.put_item(b, item(a, Subscription::Both));
    }

    /// Binds `jid`, fetches the roster and sends initial presence, then clears the delivery log.
    async fn online(h: &TestHost, jid: &str) {
        h.bind(jid);
        h.iq(
            jid,
            "<iq type='get' id='g'><query xmlns='jabber:iq:roster'/></iq>",
        )
        .await;
        assert!(h.presence(jid, "<presence/>").await);
        h.take();
    }

    fn state(h: &TestHost, user: &str, contact: &str) -> Option<(Subscription, bool, bool, bool)> {
        h.item(user, contact)
            .map(|i| (i.subscription, i.ask, i.pending_in.is_some(), i.approved))
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[tokio::test]
    async fn subscription_flow_from_none_to_both() {
        let h = TestHost::new(&["a", "b"]);
        online(&h, "a/r").await;
        online(&h, "b/r").await;

        h.presence(
            "a/r",
            "<presence type='subscribe' to='b/elsewhere' id='s1'/>",
        )
        .await;
        assert_eq!(h.lines(), ["a/r: push b none ask", "b/r: subscribe a -> b"]);
        assert_eq!(
            state(&h, "b", "a"),
            Some((Subscription::None, false, true, false))
        );
        assert!(!h.item("b", "a").is_some_and(|i| i.in_roster));

        h.presence("b/r", "<presence type='subscribed' to='a'/>")
            .await;
        assert_eq!(
            h.lines(),
            [
                "a/r: subscribed b -> a",
                "a/r: push b to",
                "b/r: push a from",
                "a/r: available b/r -> a"
            ]
        );

        h.presence("b/r", "<presence type='subscribe' to='a'/>")
            .await;
        assert_eq!(h.lines(), ["b/r: push a from ask", "a/r: subscribe b -> a"]);
        h.presence("a/r", "<presence type='subscribed' to='b'/>")
            .await;
        assert_eq!(
            h.lines(),
            [
                "b/r: subscribed a -> b",
                "b/r: push a both",
                "a/r: push b both",
                "b/r: available a/r -> b"
            ]
        );
        assert_eq!(
            state(&h, "a", "b"),
            Some((Subscription::Both, false, false, false))
        );
        assert_eq!(
            state(&h, "b", "a"),
            Some((Subscription::Both, false, false, false))
        );
        assert!(h.routed().is_empty());
    }

    #[tokio::test]
    async fn unsubscribe_and_unsubscribed() {
        let h = TestHost::new(&["a", "b"]);
        friends(&h, "a", "b");
        online(&h, "a/r").await;
        online(&h, "b/r").await;

        h.presence("a/r", "<presence type='unsubscribe' to='b'/>")
            .await;
        assert_eq!(
            h.lines(),
            [
                "a/r: push b from",
                "b/r: unsubscribe a -> b",
                "b/r: push a to",
                "a/r: unavailable b/r -> a"
            ]
        );

        h.presence("a/r", "<presence type='unsubscribed' to='b'/>")
            .await;
        assert_eq!(
            h.lines(),
            [
                "b/r: unavailable a/r -> b",
                "a/r: push b none",
                "b/r: unsubscribed a -> b",
                "b/r: push a none"
            ]
        );
        assert_eq!(
            state(&h, "a", "b"),
            Some((Subscription::None, false, false, false))
        );
        assert_eq!(
            state(&h, "b", "a"),
            Some((Subscription::None, false, false, false))
        );

        // Nothing left to cancel: no state change, nothing routed.
        h.presence("a/r", "<presence type='unsubscribed' to='b'/>")
            .await;
        h.presence("a/r", "<presence type='unsubscribe' to='b'/>")
            .await;
        assert!(h.lines().is_empty());
    }

    #[tokio::test]
    async fn refusing_a_request_forgets_it() {
        let h = TestHost::new(&["a", "b"]);
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        h.presence("a/r", "<presence type='subscribe' to='b'/>")
            .await;
        h.take();
        h.presence("b/r", "<presence type='unsubscribed' to='a'/>")
            .await;
        assert_eq!(h.lines(), ["a/r: unsubscribed b -> a", "a/r: push b none"]);
        assert!(
            h.item("b", "a").is_none(),
            "the request-only item is dropped"
        );
        // A 'subscribed' without a request is a pre-approval, not an approval.
        h.presence("b/r", "<presence type='subscribed' to='a'/>")
            .await;
        assert_eq!(h.lines(), ["b/r: push a none approved"]);
        assert_eq!(
            state(&h, "a", "b"),
            Some((Subscription::None, false, false, false))
        );
    }

    #[tokio::test]
    async fn pre_approval() {
        let h = TestHost::new(&["a", "b", "c"]);
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        online(&h, "c/r").await;

        h.presence("b/r", "<presence type='subscribed' to='a'/>")
            .await;
        assert_eq!(h.lines(), ["b/r: push a none approved"]);
        h.presence("a/r", "<presence type='subscribe' to='b'/>")
            .await;
        assert_eq!(
            h.lines(),
            [
                "a/r: push b none ask",
                "a/r: subscribed b -> a",
                "a/r: push b to",
                "b/r: push a from",
                "a/r: available b/r -> a",
            ]
        );
        assert_eq!(
            state(&h, "b", "a"),
            Some((Subscription::From, false, false, false))
        );

        // A withdrawn pre-approval is not routed (§3.4).
        h.presence("b/r", "<presence type='subscribed' to='c'/>")
            .await;
        h.presence("b/r", "<presence type='unsubscribed' to='c'/>")
            .await;
        assert_eq!(h.lines(), ["b/r: push c none approved", "b/r: push c none"]);
        // Already subscribed: 'subscribed' is ignored.
        h.presence("b/r", "<presence type='subscribed' to='a'/>")
            .await;
        assert!(h.lines().is_empty());
    }

    #[tokio::test]
    async fn a_request_is_delivered_at_each_login_until_answered() {
        let h = TestHost::new(&["a", "b"]);
        online(&h, "a/r").await;
        h.presence(
            "a/r",
            "<presence type='subscribe' to='b'><status>it is me</status></presence>",
        )
        .await;
        assert_eq!(h.lines(), ["a/r: push b none ask"]);

        h.bind("b/r1");
        h.presence("b/r1", "<presence/>").await;
        let log = h.take();
        let req = log
            .iter()
            .find(|(_, el)| el.attr("type") == Some("subscribe"))
            .map(|(_, el)| el)
            .expect("request");
        assert_eq!(
            (req.attr("from"), req.attr("to")),
            (Some("a@example.com"), Some("b@example.com"))
        );
        assert_eq!(
            req.get_child("status", ns::CLIENT).map(|s| s.text()),
            Some("it is me".into())
        );

        h.bind("b/r2");
        h.presence("b/r2", "<presence/>").await;
        assert!(h.lines().contains(&"b/r2: subscribe a -> b".to_string()));

        h.presence("b/r2", "<presence type='subscribed' to='a'/>")
            .await;
        h.take();
        h.bind("b/r3");
        h.presence("b/r3", "<presence/>").await;
        assert!(!h.lines().iter().any(|l| l.contains("subscribe ")));
    }

    #[tokio::test]
    async fn a_request_for_an_existing_subscription_is_answered_by_the_server() {
        let h = TestHost::new(&["a", "b"]);
        h.put_item("a", item("b", Subscription::To));
        h.put_item("b", item("a", Subscription::From));
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        h.presence("a/r", "<presence type='subscribe' to='b'/>")
            .await;
        assert_eq!(h.lines(), ["a/r: subscribed b -> a"]);
        assert_eq!(
            state(&h, "a", "b"),
            Some((Subscription::To, false, false, false))
        );
    }

    #[tokio::test]
    async fn initial_presence_probes_and_broadcasts() {
        let h = TestHost::new(&["a", "b", "c", "d"]);
        friends(&h, "a", "b");
        h.put_item("a", item("c", Subscription::From));
        h.put_item("c", item("a", Subscription::To));
        for r in ["b/r", "c/r", "d/r", "a/other"] {
            online(&h, r).await;
        }
        h.bind("a/r");
        h.presence(
            "a/r",
            "<presence><show>away</show><priority>5</priority><status>here</status></presence>",
        )
        .await;
        let log = h.take();
        let lines = sorted(
            log.iter()
                .map(|(to, el)| crate::testing::summary(to, el))
                .collect(),
        );
        assert_eq!(
            lines,
            [
                "a/other: available a/r -> a",
                "a/r: available a/other -> a/r",
                "a/r: available a/r -> a",
                "a/r: available b/r -> a/r",
                "b/r: available a/r -> b",
                "c/r: available a/r -> c",
            ]
        );
        let to_b = log
            .iter()
            .find(|(to, _)| to.as_str() == "b@example.com/r")
            .map(|(_, el)| el)
            .expect("b");
        assert_eq!(
            to_b.get_child("status", ns::CLIENT).map(|s| s.text()),
            Some("here".into())
        );
        assert_eq!(
            to_b.get_child("show", ns::CLIENT).map(|s| s.text()),
            Some("away".into())
        );
        let s = h.session("a/r").expect("session");
        assert_eq!((s.priority, s.presence.is_some()), (5, true));

        // An update goes to the same audience, without probes.
        h.presence("a/r", "<presence><show>dnd</show></presence>")
            .await;
        assert_eq!(
            sorted(h.lines()),
            [
                "a/other: available a/r -> a",
                "a/r: available a/r -> a",
                "b/r: available a/r -> b",
                "c/r: available a/r -> c",
            ]
        );
        assert_eq!(h.session("a/r").map(|s| s.priority), Some(0));
    }

    #[tokio::test]
    async fn an_invalid_priority_is_refused() {
        let h = TestHost::new(&["a"]);
        h.bind("a/r");
        h.presence("a/r", "<presence><priority>128</priority></presence>")
            .await;
        assert_eq!(h.lines(), ["a/r: error bad-request"]);
        assert!(h.session("a/r").is_some_and(|s| s.presence.is_none()));
    }

    #[tokio::test]
    async fn directed_presence_and_session_end() {
        let h = TestHost::new(&["a", "b", "c"]);
        friends(&h, "a", "b");
        for r in ["a/r", "a/other", "b/r", "c/r"] {
            online(&h, r).await;
        }
        h.presence("a/r", "<presence to='c'><status>psst</status></presence>")
            .await;
        h.presence("a/r", "<presence to='b/r'/>").await;
        assert_eq!(
            h.lines(),
            ["c/r: available a/r -> c", "b/r: available a/r -> b/r"]
        );
        assert_eq!(
            h.directed("a/r"),
            [Jid::new("c@example.com").expect("jid")],
            "b is subscribed: not tracked"
        );

        h.end("a/r").await;
        assert_eq!(
            h.lines(),
            [
                "b/r: unavailable a/r -> b",
                "a/other: unavailable a/r -> a",
                "c/r: unavailable a/r -> c"
            ]
        );

        // The same when the core runs the hooks before unbinding; directed unavailable untracks.
        online(&h, "a/r2").await;
        h.presence("a/r2", "<presence to='c/r'/>").await;
        h.presence("a/r2", "<presence to='c'/>").await;
        h.presence("a/r2", "<presence type='unavailable' to='c/r'/>")
            .await;
        h.take();
        assert_eq!(
            h.directed("a/r2"),
            [Jid::new("c@example.com").expect("jid")]
        );
        h.end("a/r2").await;
        assert_eq!(
            h.lines(),
            [
                "b/r: unavailable a/r2 -> b",
                "a/other: unavailable a/r2 -> a",
                "c/r: unavailable a/r2 -> c"
            ]
        );
    }

    #[tokio::test]
    async fn unavailable_broadcast() {
        let h = TestHost::new(&["a", "b", "c"]);
        friends(&h, "a", "b");
        for r in ["a/r", "b/r", "c/r"] {
            online(&h, r).await;
        }
        h.presence("a/r", "<presence to='c'/>").await;
        h.take();
        h.presence(
            "a/r",
            "<presence type='unavailable'><status>bye</status></presence>",
        )
        .await;
        let log = h.take();
        let lines: Vec<_> = log
            .iter()
            .map(|(to, el)| crate::testing::summary(to, el))
            .collect();
        assert_eq!(
            lines,
            [
                "b/r: unavailable a/r -> b",
                "a/r: unavailable a/r -> a",
                "c/r: unavailable a/r -> c"
            ]
        );
        assert!(log.iter().all(|(_, el)| el
            .get_child("status", ns::CLIENT)
            .is_some_and(|s| s.text() == "bye")));
        assert!(h.session("a/r").is_some_and(|s| s.presence.is_none()));
        assert!(h.directed("a/r").is_empty());
        // Already unavailable: the session's end tells nobody.
        h.end("a/r").await;
        assert!(h.lines().is_empty());
    }

    #[tokio::test]
    async fn probes_are_answered_for_subscribers_only() {
        let h = TestHost::new(&["a", "b", "c"]);
        h.put_item("a", item("b", Subscription::To));
        h.put_item("b", item("a", Subscription::From));
        for r in ["a/r", "b/r", "c/r"] {
            online(&h, r).await;
        }
        h.presence("a/r", "<presence type='probe' to='b'/>").await;
        assert_eq!(h.lines(), ["a/r: available b/r -> a/r"]);
        h.presence("c/r", "<presence type='probe' to='b'/>").await;
        assert!(h.lines().is_empty());
        h.end("b/r").await;
        h.take();
        h.presence("a/r", "<presence type='probe' to='b'/>").await;
        assert_eq!(h.lines(), ["a/r: unavailable b -> a/r"]);
    }

    #[tokio::test]
    async fn other_presence() {
        let h = TestHost::new(&["a", "b"]);
        online(&h, "a/r").await;
        online(&h, "b/r").await;
        assert!(
            !h.presence("a/r", "<presence to='example.com'/>").await,
            "presence to the server is passed on"
        );
        h.presence("a/r", "<presence type='error' to='b/r'><error type='cancel'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>").await;
        h.presence("a/r", "<presence type='bogus'/>").await;
        h.presence("a/r", "<presence type='subscribe'/>").await;
        h.presence("a/r", "<presence type='subscribe' to='a'/>")
            .await;
        assert_eq!(h.lines(), ["b/r: error gone", "a/r: error bad-request"]);
        assert!(h.item("a", "a").is_none());
    }
}
