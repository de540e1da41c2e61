//! XEP-0280: Message Carbons (`urn:xmpp:carbons:2`), with the XEP-0334 `<no-copy/>` hint and
//! XEP-0297 forwarding.
//!
//! - Enabling (§4, §5): a resource sends `<enable/>` or `<disable/>` in an iq set to its own
//!   account (or with no `to`); repeated requests just succeed (§9.1). A request about another
//!   account, or from an address that is not a session of this server, gets `not-allowed`.
//! - Eligibility (§6.1): type `chat`; type `normal` with a `<body/>`; or any non-`groupchat`,
//!   non-`headline`, non-`error` message carrying IM payloads (XEP-0184 receipts, XEP-0085 chat
//!   states, XEP-0333 markers) or an XEP-0249 / mediated XEP-0045 invitation. Never: messages
//!   with `<private xmlns='urn:xmpp:carbons:2'/>` (§7; the element is left in place) or a
//!   `<no-copy/>` hint, carbons themselves (a `<sent/>` or `<received/>` child), and messages the
//!   server or a module generates (from this server's domain or a local bare JID, e.g. archive
//!   results). Halyard choices: `error` messages are not copied, since Halyard cannot tell whether
//!   they answer an eligible message (so `urn:xmpp:carbons:rules:0` is not advertised); a
//!   `headline` is not instant messaging.
//! - Sent carbons (§8): a local user's eligible message goes, wrapped in
//!   `<sent><forwarded/></sent>` from the bare JID, to each of the user's other carbons-enabled
//!   resources, whether or not the sender enabled carbons. Not for messages to the user's own
//!   account (those get received carbons only).
//! - Received carbons (§7): an eligible message to a local user goes, wrapped in
//!   `<received><forwarded/></received>` and as it will be delivered (archive `<stanza-id/>`
//!   included), to each carbons-enabled resource of the recipient the router does not deliver it
//!   to ([`Host::delivery_targets`]) — also when it goes to offline storage, then only to
//!   resources that are available (with a negative priority: they never get offline messages),
//!   since an unavailable one gets the message from the store at its initial presence. A private
//!   message from a MUC occupant (`<x xmlns='http://jabber.org/protocol/muc#user'/>`) is not
//!   copied (§6.1: the MUC service already reaches every joined client). A `<no-store/>`
//!   message that nobody can take now bounces, so it is not copied either.
//!
//! The hook observes only: delivery of the original is left to the hooks after it and the router.

use std::sync::Arc;

use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use minidom::rxml::Namespace;
use minidom::Element;

use crate::host::Host;
use crate::ns;
use crate::offline::{has_hint, CHATSTATES};
use crate::registry::{Flow, IqHandler, IqReply, IqScope, Registry, StanzaHook, Target};
use crate::stanza::{n, Stanza, StanzaError};

pub const NS: &str = "urn:xmpp:carbons:2";
/// XEP-0297 stanza forwarding.
pub const FORWARD: &str = "urn:xmpp:forward:0";
const RECEIPTS: &str = "urn:xmpp:receipts";
const MARKERS: &str = "urn:xmpp:chat-markers:0";
const CONFERENCE: &str = "jabber:x:conference";
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// The message hook's priority: after the archive (100), which adds the `<stanza-id/>` the
/// copies carry, and before offline storage (10).
pub const MESSAGE_PRIORITY: i32 = 50;

struct Toggle;

#[async_trait]
impl IqHandler for Toggle {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        let Ok(full) = iq.from.try_as_full() else {
            return IqReply::Error(StanzaError::NotAllowed(None));
        };
        let own_account = iq.to.as_ref().is_none_or(|to| to.to_bare() == full.to_bare());
        if !own_account || !host.is_local_domain(full.domain().as_str()) {
            // §4.1, §5.1: only a client of this server, for itself.
            return IqReply::Error(StanzaError::NotAllowed(None));
        }
        if iq.type_() != "set" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        let on = match iq.payload().map(|p| p.name()) {
            Some("enable") => true,
            Some("disable") => false,
            _ => return IqReply::Error(StanzaError::BadRequest(None)),
        };
        host.set_carbons(full, on);
        tracing::debug!(%full, on, "carbons: toggled");
        IqReply::Result(None)
    }
}

/// Whether a message of `type_` is eligible for carbons (§6.1, with Halyard's choices: see the
/// module notes).
pub fn eligible(el: &Element, type_: &str) -> bool {
    if matches!(type_, "error" | "groupchat" | "headline") {
        return false;
    }
    if el.has_child("private", NS) || has_hint(el, "no-copy") {
        return false;
    }
    if el.has_child("sent", NS) || el.has_child("received", NS) {
        return false;
    }
    if type_ == "chat" || el.has_child("body", ns::CLIENT) {
        return true;
    }
    el.children().any(|c| {
        c.has_ns(RECEIPTS)
            || c.has_ns(CHATSTATES)
            || c.has_ns(MARKERS)
            || c.is("x", CONFERENCE)
            || (c.is("x", MUC_USER) && c.has_child("invite", MUC_USER))
    })
}

/// A private message from a MUC occupant to a local user (§6.1: not copied).
fn from_muc_occupant(el: &Element) -> bool {
    el.get_child("x", MUC_USER)
        .is_some_and(|x| !x.has_child("invite", MUC_USER))
}

/// `original` wrapped as a carbon: `<message from=user to=resource type=…><kind><forwarded>`.
pub fn wrap(kind: &'static str, original: &Element, user: &BareJid, to: &FullJid) -> Element {
    let mut b = Element::builder("message", ns::CLIENT)
        .attr(n("from"), user.as_str())
        .attr(n("to"), to.as_str());
    if let Some(t) = original.attr("type") {
        b = b.attr(n("type"), t);
    }
    b.append(
        Element::builder(kind, NS)
            .append(Element::builder("forwarded", FORWARD).append(original.clone()).build())
            .build(),
    )
    .build()
}

/// A local user's session: a full JID of an account on this server.
fn local_session<'a>(host: &dyn Host, jid: &'a Jid) -> Option<&'a FullJid> {
    let full = jid.try_as_full().ok()?;
    (full.node().is_some() && host.is_local_domain(full.domain().as_str())).then_some(full)
}

/// Generated by the server or a module on a user's behalf: from this server's domain or from a
/// local bare JID (a session always sends from its full JID).
fn server_generated(host: &dyn Host, from: &Jid) -> bool {
    host.is_local_domain(from.domain().as_str()) && (from.node().is_none() || !from.is_full())
}

struct Carbons;

#[async_trait]
impl StanzaHook for Carbons {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, target: Target) -> Flow {
        if target == Target::Host || server_generated(host, &st.from) {
            return Flow::Pass;
        }
        if !eligible(&st.el, st.type_()) {
            return Flow::Pass;
        }
        let sender = local_session(host, &st.from).cloned();
        let recipient = match &st.to {
            Some(to) => to.to_bare(),
            None => st.from.to_bare(),
        };
        let mut original = st.el.clone();
        original.set_attr(Namespace::NONE, n("from"), st.from.to_string());

        if let Some(sender) = &sender {
            let user = sender.to_bare();
            if user != recipient {
                for r in host.resources(&user) {
                    if r.carbons && r.jid != *sender {
                        host.deliver(&r.jid, &wrap("sent", &original, &user, &r.jid));
                    }
                }
            }
        }

        let local_recipient =
            recipient.node().is_some() && host.is_local_domain(recipient.domain().as_str());
        if !local_recipient || from_muc_occupant(&st.el) {
            return Flow::Pass;
        }
        let targets = host.delivery_targets(st);
        if targets.is_empty() && has_hint(&st.el, "no-store") {
            return Flow::Pass;
        }
        for r in host.resources(&recipient) {
            let copy = r.carbons
                && !targets.contains(&r.jid)
                && sender.as_ref() != Some(&r.jid)
                && (!targets.is_empty() || r.is_available());
            if copy {
                host.deliver(&r.jid, &wrap("received", &original, &recipient, &r.jid));
            }
        }
        Flow::Pass
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0280");
    reg.iq(IqScope::Account, NS, Arc::new(Toggle));
    reg.message_hook(MESSAGE_PRIORITY, Arc::new(Carbons));
    reg.server_feature(NS);
}
