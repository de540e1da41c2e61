//! XEP-0160: Best Practices for Handling Offline Messages, with XEP-0203 delayed-delivery
//! stamps, following RFC 6121 §8.5.2.2 and the XEP-0334 `<no-store/>` and `<store/>` hints.
//!
//! - Storage: a message of type `normal` or `chat` to a local account that has no resource the
//!   router would deliver it to right now ([`Host::delivery_targets`] is empty: no available
//!   resource with non-negative priority, and no bound resource matching a full-JID `to`) is
//!   stored, as the earlier hooks left it (the archive's `<stanza-id/>` included), and made
//!   durable before the sender's next stanza is read. A full queue (`[offline] quota`) answers the
//!   sender `service-unavailable` (XEP-0160 §2). `groupchat`, `headline` and `error` messages are
//!   never stored (XEP-0160 §3; the router errors or drops them per RFC 6121 §8.5.2.2.1).
//! - Not stored: messages with a `<no-store/>` hint (the router then answers
//!   `service-unavailable`, RFC 6121 §8.5.2.2.1 option b); messages carrying only XEP-0085 chat
//!   states (XEP-0160 §3), which are dropped silently unless they carry a `<store/>` hint.
//! - Delivery: when a resource sends non-negative available presence while it was unavailable
//!   (initial presence) or had a negative priority, every waiting message is delivered to it,
//!   oldest first, with `<delay xmlns='urn:xmpp:delay' from='DOMAIN' stamp='…'/>` (XEP-0160 §2,
//!   XEP-0203), and removed from the store. A negative-priority resource never gets them
//!   (RFC 6121 §8.5.2.1, XEP-0160 §2 step 2). A `<delay/>` claiming to be from this server that
//!   the sender put in is removed first (XEP-0203 §4).
//! - Discovery: the server advertises `msgoffline` (XEP-0160 §4). There is no retrieval protocol
//!   (XEP-0013 is not supported).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::{Element, Node};

use crate::host::Host;
use crate::ns;
use crate::registry::{Flow, Registry, StanzaHook, Target};
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
/// The presence hook's priority: before the presence module, which handles the stanza.
pub const PRESENCE_PRIORITY: i32 = crate::presence::HOOK_PRIORITY + 20;

/// The text of the error a sender gets when the recipient's queue is full.
pub const QUOTA_TEXT: &str = "offline storage quota reached";

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A time in microseconds since the Unix epoch as an XEP-0082 DateTime in UTC with
/// milliseconds, e.g. `2002-09-10T23:08:25.000Z`.
pub fn datetime(micros: u64) -> String {
    let secs = micros / 1_000_000;
    let millis = (micros / 1000) % 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
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

struct Store;

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
                    // It is in the store; only a crash before the next flush would lose it.
                    tracing::warn!(error = %e, %owner, "offline: flush failed");
                }
                tracing::debug!(%owner, "offline: message stored");
                Flow::Handled
            }
            Ok(false) => {
                tracing::debug!(%owner, quota, "offline: quota reached");
                reply_error(host, st, StanzaError::ServiceUnavailable(Some(QUOTA_TEXT.into()))).await;
                Flow::Handled
            }
            Err(e) => {
                // Not stored: the router's default tells the sender it was not delivered.
                tracing::warn!(error = %e, %owner, "offline: store failed");
                Flow::Pass
            }
        }
    }
}

/// The `<priority/>` of an available presence, 0 when absent; `None` when invalid (the presence
/// module refuses it).
fn priority(el: &Element) -> Option<i8> {
    match el.get_child("priority", ns::CLIENT) {
        None => Some(0),
        Some(p) => p.text().trim().parse().ok(),
    }
}

/// `el` as delivered from offline storage: a `<delay/>` from this server in place of any the
/// sender may have forged (XEP-0203 §4).
fn stamped(mut el: Element, domain: &str, ts_micros: u64) -> Element {
    for node in el.take_nodes() {
        match &node {
            Node::Element(c) if c.is("delay", ns::DELAY) && c.attr("from") == Some(domain) => {}
            _ => el.append_node(node),
        }
    }
    el.append_child(
        Element::builder("delay", ns::DELAY)
            .attr(n("from"), domain)
            .attr(n("stamp"), datetime(ts_micros))
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
    if let Err(e) = host.offline().remove(owner, &done).await {
        tracing::warn!(error = %e, %owner, "offline: remove failed; messages may be delivered again");
    }
}

struct Deliver;

#[async_trait]
impl StanzaHook for Deliver {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, _target: Target) -> Flow {
        if st.to.is_some() || st.type_() != "available" {
            return Flow::Pass;
        }
        let Ok(full) = st.from.try_as_full() else {
            return Flow::Pass;
        };
        if !priority(&st.el).is_some_and(|p| p >= 0) {
            return Flow::Pass;
        }
        let owner = full.to_bare();
        // Only a resource that could not receive messages until now: unavailable (initial
        // presence) or available with a negative priority.
        let became_eligible = host
            .resources(&owner)
            .iter()
            .any(|r| r.jid == *full && (r.presence.is_none() || r.priority < 0));
        if became_eligible {
            flush(host, &owner, full).await;
        }
        Flow::Pass
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0160");
    reg.message_hook(MESSAGE_PRIORITY, Arc::new(Store));
    reg.presence_hook(PRESENCE_PRIORITY, Arc::new(Deliver));
    reg.server_feature(FEATURE);
}
