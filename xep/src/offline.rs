//! XEP-0160: Best Practices for Handling Offline Messages, with XEP-0203 delayed-delivery
//! stamps, following RFC 6121 §8.5.2.2 and the XEP-0334 `<no-store/>` and `<store/>` hints.
//!
//! - Storage: a message of type `normal` or `chat` to a local account that has no resource the
//!   router would deliver it to right now ([`Host::delivery_targets`] is empty: no available
//!   resource with non-negative priority, and no bound resource matching a full-JID `to`) is
//!   stored, as the earlier hooks left it (the archive's `<stanza-id/>` included), and made
//!   durable before the sender's next stanza is read. A full queue (`[offline] quota`) answers the
//!   sender `service-unavailable` (XEP-0160 §2); a store that cannot write it (or flush it)
//!   answers `resource-constraint` when the disk is full, `internal-server-error` otherwise.
//!   `groupchat`, `headline` and `error` messages are never stored (XEP-0160 §3; the router
//!   errors or drops them per RFC 6121 §8.5.2.2.1).
//! - Not stored: messages with a `<no-store/>` hint (the router then answers
//!   `service-unavailable`, RFC 6121 §8.5.2.2.1 option b); messages carrying only XEP-0085 chat
//!   states (XEP-0160 §3), which are dropped silently unless they carry a `<store/>` hint.
//! - Delivery: when a resource sends non-negative available presence while it was unavailable
//!   (initial presence) or had a negative priority, once the presence module has recorded it as
//!   available (`SessionHook::available`), every waiting message is delivered to it, oldest
//!   first (a message stored while that runs is delivered right after it, not at the next
//!   login), with `<delay xmlns='urn:xmpp:delay' from='DOMAIN' stamp='…'/>` (XEP-0160 §2,
//!   XEP-0203), and removed from the store (on disk before the session's next stanza is read).
//!   A negative-priority resource never gets them (RFC 6121 §8.5.2.1, XEP-0160 §2 step 2). A
//!   `<delay/>` claiming to be from this server that the sender put in is removed first
//!   (XEP-0203 §4).
//! - Discovery: the server advertises `msgoffline` (XEP-0160 §4). There is no retrieval protocol
//!   (XEP-0013 is not supported).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;

use crate::host::Host;
use crate::ns;
use crate::registry::{Flow, Registry, SessionHook, StanzaHook, Target};
use crate::stanza::{n, Stanza, StanzaError};

/// The disco feature of XEP-0160 §4.
pub const FEATURE: &str = "msgoffline";
/// XEP-0334 message processing hints.
pub const HINTS: &str = "urn:xmpp:hints";
/// XEP-0085 chat state notifications.
pub const CHATSTATES: &str = "http://jabber.org/protocol/chatstates";
/// XEP-0359 unique and stable stanza ids.
const SID: &str = "urn:xmpp:sid:0";

/// The message hook's priority: after the archive (100) and carbons (50), before the router's
/// default delivery.
pub const MESSAGE_PRIORITY: i32 = 10;

/// The text of the error a sender gets when the recipient's queue is full.
pub const QUOTA_TEXT: &str = "offline storage quota reached";

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether the message carries the XEP-0334 hint `name`.
pub fn has_hint(el: &Element, name: &str) -> bool {
    el.has_child(name, HINTS)
}

/// A message whose only content is an XEP-0085 chat state: no body, at least one chat-state
/// element, and nothing else but a thread, stanza ids and hints.
pub fn is_chat_state_only(el: &Element) -> bool {
    let mut state = false;
    for child in el.children() {
        if child.has_ns(CHATSTATES) {
            state = true;
        } else if !(child.is("thread", ns::CLIENT) || child.has_ns(SID) || child.has_ns(HINTS)) {
            return false;
        }
    }
    state
}

/// The local account a message is for: its `to`, or the sender's own account without one
/// (RFC 6120 §10.3). `None` for the server itself and for other domains.
fn recipient(host: &dyn Host, st: &Stanza, target: Target) -> Option<BareJid> {
    if target == Target::Host {
        return None;
    }
    let bare = match &st.to {
        Some(to) => to.to_bare(),
        None => st.from.to_bare(),
    };
    (bare.node().is_some() && host.is_local_domain(bare.domain().as_str())).then_some(bare)
}

/// Sends an error for `st` to its sender: delivered to a local session, routed otherwise.
async fn reply_error(host: &dyn Host, st: &Stanza, err: StanzaError) {
    let Some(reply) = st.error_reply(err) else {
        return;
    };
    match st.from.try_as_full() {
        Ok(full) if host.is_local_domain(full.domain().as_str()) => {
            host.deliver(full, &reply);
        }
        _ => host.route(reply).await,
    }
}

struct Store {
    flushing: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait]
impl StanzaHook for Store {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, target: Target) -> Flow {
        if !matches!(st.type_(), "normal" | "chat") {
            return Flow::Pass;
        }
        let Some(owner) = recipient(host, st, target) else {
            return Flow::Pass;
        };
        if !host.delivery_targets(st).is_empty() {
            return Flow::Pass;
        }
        if has_hint(&st.el, "no-store") {
            tracing::debug!(%owner, "offline: no-store hint, not stored");
            return Flow::Pass;
        }
        if is_chat_state_only(&st.el) && !has_hint(&st.el, "store") {
            tracing::debug!(%owner, "offline: chat state for an offline user dropped");
            return Flow::Handled;
        }
        let quota = host.settings().offline.quota;
        let xml = String::from(&st.el);
        match host.offline().push(&owner, now_micros(), &xml, quota).await {
            Ok(true) => {
                if let Err(e) = host.durable().await {
                    // Not on disk: the sender must not count on it. Taken back out (best
                    // effort) so that a later flush does not deliver what was reported failed.
                    tracing::warn!(error = %e, %owner, "offline: flush failed; the sender is told");
                    unstore(host, &owner, &xml).await;
                    reply_error(host, st, not_stored(&e)).await;
                    return Flow::Handled;
                }
                tracing::debug!(%owner, "offline: message stored");
                // A resource may have become available while this was stored, after its flush
                // read the queue: deliver the queue to it now rather than at its next login.
                let targets = host.delivery_targets(st);
                if !targets.is_empty() {
                    let _one_at_a_time = self.flushing.lock().await;
                    for full in &targets {
                        flush(host, &owner, full).await;
                    }
                }
                Flow::Handled
            }
            Ok(false) => {
                tracing::debug!(%owner, quota, "offline: quota reached");
                reply_error(
                    host,
                    st,
                    StanzaError::ServiceUnavailable(Some(QUOTA_TEXT.into())),
                )
                .await;
                Flow::Handled
            }
            Err(e) => {
                // Not stored: the sender learns why (not the router's "not online").
                tracing::warn!(error = %e, %owner, "offline: store failed");
                reply_error(host, st, not_stored(&e)).await;
                Flow::Handled
            }
        }
    }
}

/// The error a sender gets when its message could not be stored: `resource-constraint` when
/// the disk is full (try later), `internal-server-error` otherwise.
fn not_stored(e: &crate::host::StoreError) -> StanzaError {
    if e.is_storage_full() {
        StanzaError::ResourceConstraint(Some(
            "the message could not be stored: the server's storage is full".into(),
        ))
    } else {
        StanzaError::InternalServerError(Some("the message could not be stored".into()))
    }
}

/// Removes a message just pushed to `owner`'s queue whose flush failed (the newest row with
/// exactly this XML).
async fn unstore(host: &dyn Host, owner: &BareJid, xml: &str) {
    let seq = match host.offline().list(owner).await {
        Ok(list) => list
            .into_iter()
            .rev()
            .find(|m| m.stanza == xml)
            .map(|m| m.seq),
        Err(_) => None,
    };
    if let Some(seq) = seq {
        if let Err(e) = host.offline().remove(owner, &[seq]).await {
            tracing::warn!(error = %e, %owner, "offline: could not take back an unflushed message");
        }
    }
}

/// What becomes of a stanza that was queued for a session which then ended without
/// acknowledging it (XEP-0198 §5: the server must not silently drop it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rerouted {
    /// Delivered to other resources of the same account.
    Delivered,
    /// Another resource already has it as a carbon copy.
    AlreadyCopied,
    /// Stored offline, delivered at the next login.
    Stored,
    /// The sender was told it was not delivered (iq requests, a full offline queue).
    Bounced,
    /// Nothing to do: presence, errors, copies (carbons, archive results) the user has elsewhere.
    Dropped,
}

/// Reroutes a stanza that `session` never acknowledged: a message goes to the account's other
/// available resources, or else to offline storage (it is archived already); an iq request is
/// answered with `service-unavailable` on the session's behalf; presence is state that the
/// session's end updates anyway.
pub async fn reroute(host: &dyn Host, session: &FullJid, el: Element) -> Rerouted {
    // `from` was stamped by the router (or a module) before the stanza was queued.
    let sender = el.attr("from").and_then(|f| jid::Jid::new(f).ok());
    let bounce = |el: &Element| {
        let to = el.attr("from").unwrap_or_default().to_string();
        crate::stanza::error_reply(
            el,
            &to,
            session.as_str(),
            StanzaError::ServiceUnavailable(Some("the session ended before it got this".into())),
        )
    };
    match el.name() {
        "iq" if matches!(el.attr("type"), Some("get" | "set")) => {
            if let Some(reply) = bounce(&el) {
                host.route(reply).await;
            }
            Rerouted::Bounced
        }
        "message" => {
            let typ = el.attr("type").unwrap_or("normal");
            let copy = el.children().any(|c| {
                c.ns() == "urn:xmpp:carbons:2"
                    || (c.name() == "result" && c.ns() == "urn:xmpp:mam:2")
            });
            if !matches!(typ, "normal" | "chat") || copy || sender.is_none() {
                return Rerouted::Dropped;
            }
            let owner = session.to_bare();
            let others: Vec<_> = host
                .resources(&owner)
                .into_iter()
                .filter(|r| r.jid != *session && r.is_available() && r.priority >= 0)
                .collect();
            if typ == "chat" && others.iter().any(|r| r.carbons) {
                return Rerouted::AlreadyCopied;
            }
            let mut delivered = false;
            for r in &others {
                delivered |= host.deliver(&r.jid, &el);
            }
            if delivered {
                return Rerouted::Delivered;
            }
            if is_chat_state_only(&el) {
                return Rerouted::Dropped;
            }
            let quota = host.settings().offline.quota;
            match host
                .offline()
                .push(&owner, now_micros(), &String::from(&el), quota)
                .await
            {
                Ok(true) => Rerouted::Stored,
                Ok(false) | Err(_) => {
                    tracing::warn!(%owner, "offline: an unacknowledged message could not be stored");
                    if let Some(reply) = bounce(&el) {
                        host.route(reply).await;
                    }
                    Rerouted::Bounced
                }
            }
        }
        _ => Rerouted::Dropped,
    }
}

/// `el` as delivered from offline storage: a `<delay/>` from this server in place of any the
/// sender may have forged (XEP-0203 §4).
fn stamped(mut el: Element, domain: &str, ts_micros: u64) -> Element {
    crate::stanza::remove_children(&mut el, |c| {
        c.is("delay", ns::DELAY) && c.attr("from") == Some(domain)
    });
    el.append_child(
        Element::builder("delay", ns::DELAY)
            .attr(n("from"), domain)
            .attr(n("stamp"), crate::datetime::format_datetime(ts_micros))
            .append("Offline Storage")
            .build(),
    );
    el
}

/// Delivers `owner`'s waiting messages to `full`, oldest first, and removes those delivered.
/// Stops at the first one the session refuses, so that order is kept for the next attempt.
async fn flush(host: &dyn Host, owner: &BareJid, full: &FullJid) {
    let waiting = match host.offline().list(owner).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, %owner, "offline: list failed");
            return;
        }
    };
    if waiting.is_empty() {
        return;
    }
    let domain = owner.domain().as_str();
    let mut done = Vec::with_capacity(waiting.len());
    for msg in waiting {
        let el = match msg.stanza.parse::<Element>() {
            Ok(el) => el,
            Err(e) => {
                // Undeliverable forever: dropped so it does not hold a place in the quota.
                tracing::warn!(error = %e, %owner, seq = msg.seq, "offline: stored message unreadable, dropped");
                done.push(msg.seq);
                continue;
            }
        };
        if !host.deliver(full, &stamped(el, domain, msg.ts_micros)) {
            tracing::debug!(%full, "offline: session refused delivery, the rest waits");
            break;
        }
        done.push(msg.seq);
    }
    tracing::debug!(%full, count = done.len(), "offline: messages delivered");
    if done.is_empty() {
        return;
    }
    // On disk before the session's next stanza is read, so that what the client has seen is
    // not delivered again after a crash (only a crash between delivery and this flush can).
    let removed = match host.offline().remove(owner, &done).await {
        Ok(()) => host.durable().await,
        Err(e) => Err(e),
    };
    if let Err(e) = removed {
        tracing::warn!(error = %e, %owner, "offline: remove failed; messages may be delivered again");
    }
}

/// Delivers the queue to a resource that just became available. Flushes run one at a time
/// (they are rare: one per login), so a message stored while one runs is either in the list it
/// reads or finds the resource available and flushes again itself; never in neither.
struct Deliver {
    flushing: Arc<tokio::sync::Mutex<()>>,
}

#[async_trait]
impl SessionHook for Deliver {
    async fn available(&self, host: &dyn Host, full: &FullJid) {
        let _one_at_a_time = self.flushing.lock().await;
        flush(host, &full.to_bare(), full).await;
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0160");
    let flushing = Arc::new(tokio::sync::Mutex::new(()));
    reg.message_hook(
        MESSAGE_PRIORITY,
        Arc::new(Store {
            flushing: flushing.clone(),
        }),
    );
    reg.session_hook(Arc::new(Deliver { flushing }));
    reg.server_feature(FEATURE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bare, full, TestHost};

    const MODULES: &[fn(&mut Registry)] = &[
        crate::roster::register,
        crate::presence::register,
        crate::carbons::register,
        crate::offline::register,
    ];

    /// Stands in for the archive: adds a `<stanza-id/>` before the other hooks, as mam does.
    fn stanza_ids(reg: &mut Registry) {
        struct AddId;
        #[async_trait]
        impl StanzaHook for AddId {
            async fn handle(&self, _: &dyn Host, st: &mut Stanza, _: Target) -> Flow {
                st.el.append_child(
                    Element::builder("stanza-id", SID)
                        .attr(n("id"), "sid-1")
                        .attr(n("by"), "b@example.com")
                        .build(),
                );
                Flow::Pass
            }
        }
        reg.message_hook(100, Arc::new(AddId));
    }

    fn host() -> TestHost {
        TestHost::with_modules(&["a", "b"], MODULES)
    }

    async fn online(h: &TestHost, jid: &str, presence: &str) {
        h.bind(jid);
        assert!(h.presence(jid, presence).await);
        h.take();
    }

    async fn stored(h: &TestHost, user: &str) -> Vec<String> {
        h.offline()
            .list(&bare(user))
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.stanza)
            .collect()
    }

    /// The messages delivered to `to` (presence and the rest left out).
    fn messages(log: &[(FullJid, Element)], to: &str) -> Vec<Element> {
        log.iter()
            .filter(|(j, el)| *j == full(to) && el.name() == "message")
            .map(|(_, el)| el.clone())
            .collect()
    }

    fn body(el: &Element) -> String {
        el.get_child("body", ns::CLIENT)
            .map(|b| b.text())
            .unwrap_or_default()
    }

    fn delay(el: &Element) -> &Element {
        el.get_child("delay", ns::DELAY).expect("a delay")
    }

    #[test]
    fn chat_state_only() {
        let m = |s: &str| crate::testing::xml(s);
        let active = "<active xmlns='http://jabber.org/protocol/chatstates'/>";
        assert!(is_chat_state_only(&m(&format!(
            "<message>{active}</message>"
        ))));
        assert!(is_chat_state_only(&m(&format!(
            "<message>{active}<thread>t</thread><origin-id xmlns='urn:xmpp:sid:0' id='x'/></message>"
        ))));
        assert!(!is_chat_state_only(&m(&format!(
            "<message>{active}<body>hi</body></message>"
        ))));
        assert!(!is_chat_state_only(&m(&format!(
            "<message>{active}<request xmlns='urn:xmpp:receipts'/></message>"
        ))));
        assert!(!is_chat_state_only(&m("<message/>")));
    }

    #[tokio::test]
    async fn stored_while_offline_and_delivered_with_delay_at_the_next_initial_presence() {
        let h = host();
        online(&h, "a/r", "<presence/>").await;
        let (handled, _) = h
            .message(
                "a/r",
                "<message type='chat' to='b' id='m1'><body>one</body></message>",
            )
            .await;
        assert!(handled);
        let (handled, _) = h
            .message(
                "a/r",
                "<message to='b/gone' id='m2'><body>two</body></message>",
            )
            .await;
        assert!(
            handled,
            "a full JID whose resource is not bound counts as the bare JID"
        );
        assert!(h.take().is_empty(), "nothing goes back to the sender");
        assert_eq!(stored(&h, "b").await.len(), 2);

        // A bound resource that has not sent presence yet does not get them.
        h.bind("b/r");
        assert!(h.take().is_empty());
        assert!(h.presence("b/r", "<presence/>").await);
        let got = messages(&h.take(), "b/r");
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["one", "two"]);
        assert_eq!(got[0].attr("id"), Some("m1"));
        assert_eq!(got[0].attr("from"), Some("a@example.com/r"));
        assert_eq!(got[1].attr("to"), Some("b@example.com/gone"));
        for el in &got {
            let d = delay(el);
            assert_eq!(d.attr("from"), Some("example.com"));
            let stamp = d.attr("stamp").expect("stamp");
            assert!(
                crate::datetime::parse_datetime(stamp).is_some(),
                "XEP-0082 stamp: {stamp}"
            );
        }
        assert!(delay(&got[0]).attr("stamp") <= delay(&got[1]).attr("stamp"));
        assert!(stored(&h, "b").await.is_empty(), "removed once delivered");

        // Not again: neither on a presence update nor at another login.
        h.offline()
            .push(
                &bare("b"),
                1,
                "<message xmlns='jabber:client' to='b@example.com'><body>late</body></message>",
                10,
            )
            .await
            .expect("push");
        assert!(
            h.presence("b/r", "<presence><show>away</show></presence>")
                .await
        );
        assert!(
            messages(&h.take(), "b/r").is_empty(),
            "an update does not deliver"
        );
        h.offline().remove(&bare("b"), &[3]).await.expect("remove");
        h.bind("b/r2");
        assert!(h.presence("b/r2", "<presence/>").await);
        assert!(messages(&h.take(), "b/r2").is_empty());
    }

    #[tokio::test]
    async fn negative_priority_never_gets_offline_messages() {
        let h = host();
        online(&h, "a/r", "<presence/>").await;
        h.message("a/r", "<message to='b'><body>one</body></message>")
            .await;
        online(&h, "b/r", "<presence><priority>-1</priority></presence>").await;
        assert_eq!(
            stored(&h, "b").await.len(),
            1,
            "kept for a non-negative resource"
        );
        // Still offline for the purpose of delivery.
        let (handled, _) = h
            .message("a/r", "<message to='b'><body>two</body></message>")
            .await;
        assert!(handled);
        assert_eq!(stored(&h, "b").await.len(), 2);
        // Becoming eligible counts like an initial presence.
        assert!(
            h.presence("b/r", "<presence><priority>0</priority></presence>")
                .await
        );
        let got = messages(&h.take(), "b/r");
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["one", "two"]);
        assert!(stored(&h, "b").await.is_empty());
        // An invalid priority delivers nothing (the presence module refuses it).
        h.message("a/r", "<message to='b/x'><body>three</body></message>")
            .await;
        assert!(
            stored(&h, "b").await.is_empty(),
            "b/r is online: delivered by the router"
        );
    }

    #[tokio::test]
    async fn invalid_priority_does_not_deliver() {
        let h = host();
        online(&h, "a/r", "<presence/>").await;
        h.message("a/r", "<message to='b'><body>one</body></message>")
            .await;
        h.bind("b/r");
        h.presence("b/r", "<presence><priority>high</priority></presence>")
            .await;
        assert!(messages(&h.take(), "b/r").is_empty());
        assert_eq!(stored(&h, "b").await.len(), 1);
    }

    #[tokio::test]
    async fn not_stored_while_a_resource_can_take_it() {
        let h = host();
        online(&h, "a/r", "<presence/>").await;
        online(&h, "b/r", "<presence/>").await;
        let (handled, _) = h
            .message("a/r", "<message to='b'><body>hi</body></message>")
            .await;
        assert!(!handled, "left to the router's delivery");
        // A bound resource addressed by its full JID gets it even before its presence.
        h.bind("b/quiet");
        h.end("b/r").await;
        let (handled, _) = h
            .message("a/r", "<message to='b/quiet'><body>hi</body></message>")
            .await;
        assert!(!handled);
        assert!(stored(&h, "b").await.is_empty());
    }

    #[tokio::test]
    async fn quota_reached_answers_the_sender() {
        let mut h = host();
        h.settings.offline.quota = 1;
        online(&h, "a/r", "<presence/>").await;
        assert!(
            h.message("a/r", "<message to='b' id='1'><body>one</body></message>")
                .await
                .0
        );
        assert!(h.take().is_empty());
        assert!(
            h.message(
                "a/r",
                "<message to='b' id='2' type='chat'><body>two</body></message>"
            )
            .await
            .0
        );
        let log = h.take();
        assert_eq!(log.len(), 1);
        let (to, err) = &log[0];
        assert_eq!(*to, full("a/r"));
        assert_eq!(
            (err.attr("type"), err.attr("id"), err.attr("from")),
            (Some("error"), Some("2"), Some("b@example.com"))
        );
        let e = err.get_child("error", ns::CLIENT).expect("error");
        assert!(e.has_child("service-unavailable", ns::STANZAS));
        assert_eq!(
            e.get_child("text", ns::STANZAS).map(|t| t.text()),
            Some(QUOTA_TEXT.into())
        );
        assert_eq!(stored(&h, "b").await.len(), 1);
    }

    #[tokio::test]
    async fn hints_types_and_chat_states() {
        let h = host();
        online(&h, "a/r", "<presence/>").await;
        let cases = [
            ("<message to='b'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>", false),
            ("<message to='b' type='headline'><body>news</body></message>", false),
            ("<message to='b' type='headline'><body>news</body><store xmlns='urn:xmpp:hints'/></message>", false),
            ("<message to='b' type='groupchat'><body>x</body></message>", false),
            ("<message to='b' type='error'><body>x</body></message>", false),
            ("<message to='b' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>", true),
        ];
        for (xml, handled) in cases {
            assert_eq!(h.message("a/r", xml).await.0, handled, "{xml}");
        }
        assert!(stored(&h, "b").await.is_empty());
        assert!(h.take().is_empty(), "the chat state is dropped silently");

        // Kept: a chat state with a body or a store hint, and a message without a body.
        for xml in [
            "<message to='b' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/><body>hi</body></message>",
            "<message to='b' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/><store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b'><received xmlns='urn:xmpp:receipts' id='x'/></message>",
        ] {
            assert!(h.message("a/r", xml).await.0, "{xml}");
        }
        assert_eq!(stored(&h, "b").await.len(), 3);
    }

    #[tokio::test]
    async fn stored_as_the_hooks_left_it_without_forged_delays() {
        let h = TestHost::with_modules(
            &["a", "b"],
            &[stanza_ids, MODULES[0], MODULES[1], MODULES[2], MODULES[3]],
        );
        online(&h, "a/r", "<presence/>").await;
        h.message(
            "a/r",
            "<message to='b'><body>x</body>\
             <delay xmlns='urn:xmpp:delay' from='example.com' stamp='2000-01-01T00:00:00Z'/>\
             <delay xmlns='urn:xmpp:delay' from='elsewhere.example' stamp='2001-01-01T00:00:00Z'/></message>",
        )
        .await;
        assert!(stored(&h, "b").await[0].contains("sid-1"));
        h.bind("b/r");
        h.presence("b/r", "<presence/>").await;
        let got = messages(&h.take(), "b/r");
        assert_eq!(got.len(), 1);
        let el = &got[0];
        assert_eq!(body(el), "x");
        assert!(el.has_child("stanza-id", SID));
        let delays: Vec<_> = el
            .children()
            .filter(|c| c.is("delay", ns::DELAY))
            .map(|d| (d.attr("from").unwrap_or_default(), d.text()))
            .collect();
        assert_eq!(
            delays,
            [
                ("elsewhere.example", String::new()),
                ("example.com", "Offline Storage".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn unreadable_entries_are_dropped_and_the_rest_delivered() {
        let h = host();
        h.offline()
            .push(&bare("b"), 1, "<message", 10)
            .await
            .expect("push");
        h.offline()
            .push(
                &bare("b"),
                2,
                "<message xmlns='jabber:client' to='b@example.com'><body>ok</body></message>",
                10,
            )
            .await
            .expect("push");
        h.bind("b/r");
        h.presence("b/r", "<presence/>").await;
        let got = messages(&h.take(), "b/r");
        assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["ok"]);
        assert_eq!(
            delay(&got[0]).attr("stamp"),
            Some("1970-01-01T00:00:00.000002Z")
        );
        assert!(stored(&h, "b").await.is_empty());
    }

    #[test]
    fn advertises_msgoffline() {
        let mut reg = Registry::new();
        register(&mut reg);
        assert!(reg.server_features().any(|f| f == "msgoffline"));
        assert_eq!(reg.modules(), ["XEP-0160"]);
    }

    #[tokio::test]
    async fn reroute_what_a_session_never_acknowledged() {
        use crate::testing::xml;
        let h = host();
        h.bind("b/phone");
        let msg = || {
            xml("<message from='a@example.com/x' to='b@example.com/phone' type='chat'><body>hi</body></message>")
        };
        // No other resource: offline storage.
        assert_eq!(reroute(&h, &full("b/phone"), msg()).await, Rerouted::Stored);
        assert_eq!(stored(&h, "b").await.len(), 1);
        // Another available resource without carbons gets it.
        online(&h, "b/laptop", "<presence/>").await;
        assert_eq!(
            reroute(&h, &full("b/phone"), msg()).await,
            Rerouted::Delivered
        );
        assert_eq!(body(&messages(&h.take(), "b/laptop")[0]), "hi");
        // With carbons it has a copy already.
        h.set_carbons(&full("b/laptop"), true);
        assert_eq!(
            reroute(&h, &full("b/phone"), msg()).await,
            Rerouted::AlreadyCopied
        );
        assert!(h.take().is_empty());
        // Copies, presence and chat states alone are not rerouted.
        let carbon = xml("<message from='b@example.com' to='b@example.com/phone' type='chat'><received xmlns='urn:xmpp:carbons:2'/></message>");
        assert_eq!(
            reroute(&h, &full("b/phone"), carbon).await,
            Rerouted::Dropped
        );
        let p = xml("<presence from='a@example.com/x' to='b@example.com/phone'/>");
        assert_eq!(reroute(&h, &full("b/phone"), p).await, Rerouted::Dropped);
        // An iq request is answered on the session's behalf.
        let iq = xml("<iq from='a@example.com/x' to='b@example.com/phone' type='get' id='q'><query xmlns='jabber:iq:version'/></iq>");
        assert_eq!(reroute(&h, &full("b/phone"), iq).await, Rerouted::Bounced);
        let routed = h.routed();
        let err = routed.last().expect("an error reply");
        assert_eq!(err.attr("type"), Some("error"));
        assert_eq!(err.attr("to"), Some("a@example.com/x"));
        assert_eq!(err.attr("id"), Some("q"));
    }
}
