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
        let own_account = iq
            .to
            .as_ref()
            .is_none_or(|to| to.to_bare() == full.to_bare());
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
            .append(
                Element::builder("forwarded", FORWARD)
                    .append(original.clone())
                    .build(),
            )
            .build(),
    )
    .build()
}

/// Removes `<stanza-id by='by'/>` elements (XEP-0359).
fn strip_stanza_ids_by(el: &mut Element, by: &str) {
    crate::stanza::remove_children(el, |c| {
        c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("by") == Some(by)
    });
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
        // Who gets copies is decided first: the stanza is cloned only for them (most messages
        // have no carbon-enabled resource to copy to).
        let sent_to: Vec<FullJid> = match &sender {
            Some(sender) if sender.to_bare() != recipient => host
                .resources(&sender.to_bare())
                .into_iter()
                .filter(|r| r.carbons && r.jid != *sender)
                .map(|r| r.jid)
                .collect(),
            _ => Vec::new(),
        };
        let local_recipient = recipient.node().is_some()
            && host.is_local_domain(recipient.domain().as_str())
            && !from_muc_occupant(&st.el);
        let mut received_to: Vec<FullJid> = Vec::new();
        if local_recipient {
            let resources = host.resources(&recipient);
            if resources.iter().any(|r| r.carbons) {
                let targets = host.delivery_targets(st);
                if !(targets.is_empty() && has_hint(&st.el, "no-store")) {
                    received_to = resources
                        .into_iter()
                        .filter(|r| {
                            r.carbons
                                && !targets.contains(&r.jid)
                                && sender.as_ref() != Some(&r.jid)
                                && (!targets.is_empty() || r.is_available())
                        })
                        .map(|r| r.jid)
                        .collect();
                }
            }
        }
        if sent_to.is_empty() && received_to.is_empty() {
            return Flow::Pass;
        }
        let mut original = st.el.clone();
        original.set_attr(Namespace::NONE, n("from"), st.from.to_string());

        if let Some(sender) = &sender {
            let user = sender.to_bare();
            if !sent_to.is_empty() {
                // The sender's copies must not reveal the recipient's archive id (XEP-0313
                // §3.5: ids go only to those who can read that archive).
                let mut sent = original.clone();
                strip_stanza_ids_by(&mut sent, recipient.as_str());
                for to in &sent_to {
                    host.deliver(to, &wrap("sent", &sent, &user, to));
                }
            }
            // The recipient's copies carry the recipient's archive id, never the sender's.
            if user != recipient {
                strip_stanza_ids_by(&mut original, user.as_str());
            }
        }
        for to in &received_to {
            host.deliver(to, &wrap("received", &original, &recipient, to));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{full, TestHost};

    fn host() -> TestHost {
        TestHost::with_modules(
            &["a", "b"],
            &[
                crate::roster::register,
                crate::presence::register,
                crate::carbons::register,
                crate::offline::register,
            ],
        )
    }

    async fn enable(h: &TestHost, jid: &str) {
        let r = h
            .iq(
                jid,
                "<iq type='set' id='c'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
        assert!(matches!(r, IqReply::Result(None)), "{r:?}");
    }

    /// Binds `jid` with this presence (none for `None`), carbons on when `carbons`.
    async fn online(h: &TestHost, jid: &str, presence: Option<&str>, carbons: bool) {
        h.bind(jid);
        if let Some(p) = presence {
            assert!(h.presence(jid, p).await);
        }
        if carbons {
            enable(h, jid).await;
        }
        h.take();
    }

    /// The carbons delivered, as `resource: kind body`; asserts the wrapper's addresses.
    fn carbons(h: &TestHost) -> Vec<String> {
        h.take()
            .into_iter()
            .filter_map(|(to, el)| {
                let (kind, fwd) = ["sent", "received"]
                    .into_iter()
                    .find_map(|k| el.get_child(k, NS).map(|c| (k, c)))?;
                assert_eq!(
                    el.attr("from"),
                    Some(to.to_bare().as_str()),
                    "from the bare JID"
                );
                assert_eq!(el.attr("to"), Some(to.as_str()));
                let inner = fwd
                    .get_child("forwarded", FORWARD)
                    .and_then(|f| f.get_child("message", ns::CLIENT))
                    .expect("forwarded message");
                let body = inner
                    .get_child("body", ns::CLIENT)
                    .map(|b| b.text())
                    .unwrap_or_default();
                Some(format!("{}: {kind} {body}", to.resource()))
            })
            .collect()
    }

    /// Runs the message hooks for a stanza from any address (`TestHost::message` takes a full
    /// JID).
    async fn run(h: &TestHost, from: &str, xml: &str) {
        let mut el = crate::testing::xml(xml);
        el.set_attr(Namespace::NONE, n("from"), from);
        let to = el.attr("to").map(|t| Jid::new(t).expect("to"));
        let target = match &to {
            Some(t) if t.is_full() => Target::Full,
            _ => Target::Bare,
        };
        let mut st = Stanza {
            kind: crate::Kind::Message,
            from: Jid::new(from).expect("from"),
            to,
            el,
        };
        for hook in h.registry().message_hooks() {
            if hook.handle(h, &mut st, target).await == Flow::Handled {
                break;
            }
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[tokio::test]
    async fn enable_and_disable() {
        let h = host();
        h.bind("a/r");
        enable(&h, "a/r").await;
        assert!(h.session("a/r").is_some_and(|s| s.carbons));
        enable(&h, "a/r").await;
        let r = h
            .iq(
                "a/r",
                "<iq type='set' id='d' to='a'><disable xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
        assert!(matches!(r, IqReply::Result(None)));
        assert!(h.session("a/r").is_some_and(|s| !s.carbons));

        let err = |r: IqReply| match r {
            IqReply::Error(e) => e.condition(),
            IqReply::Result(_) => "result",
        };
        let get = h
            .iq(
                "a/r",
                "<iq type='get' id='g'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
        assert_eq!(err(get), "bad-request");
        let other = h
            .iq(
                "a/r",
                "<iq type='set' id='o' to='b'><enable xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
        assert_eq!(err(other), "not-allowed");
        let unknown = h
            .iq(
                "a/r",
                "<iq type='set' id='u'><sent xmlns='urn:xmpp:carbons:2'/></iq>",
            )
            .await;
        assert_eq!(err(unknown), "bad-request");
        assert!(h.session("a/r").is_some_and(|s| !s.carbons));
    }

    #[test]
    fn advertised_on_the_server() {
        let mut reg = Registry::new();
        register(&mut reg);
        assert!(reg.server_features().any(|f| f == NS));
        assert!(reg.iq_handler(IqScope::Account, NS).is_some());
    }

    #[tokio::test]
    async fn sent_carbons_go_to_the_senders_other_enabled_resources() {
        let h = host();
        online(&h, "a/r1", Some("<presence/>"), true).await;
        online(&h, "a/r2", Some("<presence/>"), true).await;
        online(&h, "a/off", Some("<presence/>"), false).await;
        online(&h, "a/quiet", None, true).await;
        online(&h, "b/r", Some("<presence/>"), false).await;

        let (handled, _) = h
            .message(
                "a/r1",
                "<message type='chat' to='b' id='m'><body>hi</body></message>",
            )
            .await;
        assert!(!handled, "carbons never consume the message");
        let log = h.take();
        let (to, el) = log
            .iter()
            .find(|(to, _)| *to == full("a/r2"))
            .expect("a/r2 copy");
        assert_eq!(el.attr("type"), Some("chat"));
        let inner = el
            .get_child("sent", NS)
            .and_then(|s| s.get_child("forwarded", FORWARD))
            .and_then(|f| f.get_child("message", ns::CLIENT))
            .expect("sent/forwarded/message");
        assert_eq!(
            (inner.attr("from"), inner.attr("to"), inner.attr("id")),
            (Some("a@example.com/r1"), Some("b@example.com"), Some("m"))
        );
        assert_eq!(to.as_str(), "a@example.com/r2");
        assert_eq!(log.len(), 2, "a/r2 and a/quiet: {log:?}");
        h.message(
            "a/r1",
            "<message type='chat' to='b'><body>again</body></message>",
        )
        .await;
        assert_eq!(sorted(carbons(&h)), ["quiet: sent again", "r2: sent again"]);

        // The sender need not have enabled carbons itself; a normal message with no type keeps none.
        h.message("a/off", "<message to='b'><body>plain</body></message>")
            .await;
        let log = h.take();
        assert!(log.iter().all(|(_, el)| el.attr("type").is_none()));
        h.message("a/off", "<message to='b'><body>plain</body></message>")
            .await;
        assert_eq!(
            sorted(carbons(&h)),
            ["quiet: sent plain", "r1: sent plain", "r2: sent plain"]
        );
    }

    #[tokio::test]
    async fn received_carbons_go_to_enabled_resources_the_message_does_not_reach() {
        let h = host();
        online(&h, "a/r", Some("<presence/>"), false).await;
        online(
            &h,
            "b/top",
            Some("<presence><priority>5</priority></presence>"),
            true,
        )
        .await;
        online(&h, "b/low", Some("<presence/>"), true).await;
        online(&h, "b/off", Some("<presence/>"), false).await;
        online(
            &h,
            "b/neg",
            Some("<presence><priority>-1</priority></presence>"),
            true,
        )
        .await;
        online(&h, "b/quiet", None, true).await;

        h.message(
            "a/r",
            "<message type='chat' to='b'><body>bare</body></message>",
        )
        .await;
        assert_eq!(
            sorted(carbons(&h)),
            [
                "low: received bare",
                "neg: received bare",
                "quiet: received bare"
            ]
        );
        h.message(
            "a/r",
            "<message type='chat' to='b/low'><body>full</body></message>",
        )
        .await;
        assert_eq!(
            sorted(carbons(&h)),
            [
                "neg: received full",
                "quiet: received full",
                "top: received full"
            ]
        );
        // The wrapper is from the recipient's bare JID and keeps the type.
        h.message(
            "a/r",
            "<message type='chat' to='b/low'><body>x</body></message>",
        )
        .await;
        let log = h.take();
        let (_, el) = log
            .iter()
            .find(|(to, _)| *to == full("b/top"))
            .expect("copy");
        assert_eq!(
            (el.attr("from"), el.attr("type")),
            (Some("b@example.com"), Some("chat"))
        );
        assert!(el.has_child("received", NS));
    }

    #[tokio::test]
    async fn received_carbons_when_the_message_goes_offline() {
        let h = host();
        online(&h, "a/r", Some("<presence/>"), false).await;
        online(
            &h,
            "b/neg",
            Some("<presence><priority>-1</priority></presence>"),
            true,
        )
        .await;
        online(&h, "b/quiet", None, true).await;
        let (handled, _) = h
            .message(
                "a/r",
                "<message type='chat' to='b'><body>x</body></message>",
            )
            .await;
        assert!(handled, "stored offline");
        // b/quiet gets it from offline storage at its initial presence instead.
        assert_eq!(carbons(&h), ["neg: received x"]);
        // A message that will bounce is not copied.
        h.message("a/r", "<message type='chat' to='b'><body>y</body><no-store xmlns='urn:xmpp:hints'/></message>")
            .await;
        assert!(carbons(&h).is_empty());
    }

    #[tokio::test]
    async fn private_no_copy_carbons_and_other_types_are_not_copied() {
        let h = host();
        online(&h, "a/r1", Some("<presence/>"), true).await;
        online(&h, "a/r2", Some("<presence/>"), true).await;
        online(
            &h,
            "b/r1",
            Some("<presence><priority>1</priority></presence>"),
            true,
        )
        .await;
        online(&h, "b/r2", Some("<presence/>"), true).await;

        for xml in [
            "<message type='chat' to='b'><body>x</body><private xmlns='urn:xmpp:carbons:2'/></message>",
            "<message type='chat' to='b/r1'><body>x</body><no-copy xmlns='urn:xmpp:hints'/></message>",
            "<message type='chat' to='b'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'><body>x</body></message></forwarded></received></message>",
            "<message type='chat' to='b'><sent xmlns='urn:xmpp:carbons:2'/></message>",
            "<message type='error' to='b'><body>x</body><error type='cancel'><gone xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            "<message type='groupchat' to='b'><body>x</body></message>",
            "<message type='headline' to='b'><body>x</body></message>",
            "<message to='b'><subject>no body</subject></message>",
            "<message to='example.com'><body>to the server</body></message>",
        ] {
            h.message("a/r1", xml).await;
            assert!(carbons(&h).is_empty(), "{xml}");
        }
        // The private element stays on the message.
        let (_, el) = h
            .message("a/r1", "<message type='chat' to='b'><body>x</body><private xmlns='urn:xmpp:carbons:2'/></message>")
            .await;
        assert!(el.has_child("private", NS));

        // IM payloads make a bodiless normal message eligible.
        for (xml, what) in [
            ("<message to='b/r1'><received xmlns='urn:xmpp:receipts' id='1'/></message>", "receipt"),
            ("<message to='b/r1'><displayed xmlns='urn:xmpp:chat-markers:0' id='1'/></message>", "marker"),
            ("<message to='b/r1'><x xmlns='jabber:x:conference' jid='room@muc.example.com'/></message>", "invite"),
        ] {
            h.message("a/r1", xml).await;
            // a/r2 gets the sent copy, b/r2 the received one.
            assert_eq!(sorted(carbons(&h)), ["r2: received ", "r2: sent "], "{what}");
        }
    }

    #[tokio::test]
    async fn generated_remote_muc_and_self_messages() {
        let h = host();
        online(
            &h,
            "a/r1",
            Some("<presence><priority>1</priority></presence>"),
            true,
        )
        .await;
        online(&h, "a/r2", Some("<presence/>"), true).await;
        online(&h, "a/r3", Some("<presence/>"), true).await;

        // From the server (a domain JID) or a module on the user's behalf (the bare JID).
        h.message(
            "example.com/announce",
            "<message type='chat' to='a/r1'><body>x</body></message>",
        )
        .await;
        assert!(carbons(&h).is_empty());
        run(
            &h,
            "a@example.com",
            "<message type='chat' to='a/r1'><body>x</body></message>",
        )
        .await;
        assert!(carbons(&h).is_empty());

        // From another server: received carbons only.
        h.message(
            "juliet@capulet.example/balcony",
            "<message type='chat' to='a/r1'><body>remote</body></message>",
        )
        .await;
        assert_eq!(
            sorted(carbons(&h)),
            ["r2: received remote", "r3: received remote"]
        );
        // A private message from a MUC occupant is not copied; a mediated invitation is.
        h.message(
            "room@muc.capulet.example/nurse",
            "<message type='chat' to='a/r1'><body>pm</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>",
        )
        .await;
        assert!(carbons(&h).is_empty());
        run(
            &h,
            "room@muc.capulet.example",
            "<message to='a'><x xmlns='http://jabber.org/protocol/muc#user'><invite from='b@example.com'/></x></message>",
        )
        .await;
        assert_eq!(sorted(carbons(&h)), ["r2: received ", "r3: received "]);

        // To one's own other resource: received carbons to the rest, no sent carbons.
        h.message(
            "a/r1",
            "<message type='chat' to='a/r2'><body>self</body></message>",
        )
        .await;
        assert_eq!(carbons(&h), ["r3: received self"]);
    }

    #[tokio::test]
    async fn copies_carry_the_hooks_additions() {
        fn stanza_id(reg: &mut Registry) {
            struct AddId;
            #[async_trait]
            impl StanzaHook for AddId {
                async fn handle(&self, _: &dyn Host, st: &mut Stanza, _: Target) -> Flow {
                    st.el
                        .append_child(Element::bare("stanza-id", "urn:xmpp:sid:0"));
                    Flow::Pass
                }
            }
            reg.message_hook(100, Arc::new(AddId));
        }
        let h = TestHost::with_modules(
            &["a", "b"],
            &[
                crate::roster::register,
                crate::presence::register,
                stanza_id,
                register,
            ],
        );
        online(&h, "a/r", Some("<presence/>"), false).await;
        online(
            &h,
            "b/r1",
            Some("<presence><priority>1</priority></presence>"),
            false,
        )
        .await;
        online(&h, "b/r2", Some("<presence/>"), true).await;
        h.message(
            "a/r",
            "<message type='chat' to='b'><body>x</body></message>",
        )
        .await;
        let log = h.take();
        let inner = log[0]
            .1
            .get_child("received", NS)
            .and_then(|r| r.get_child("forwarded", FORWARD))
            .and_then(|f| f.get_child("message", ns::CLIENT))
            .expect("copy");
        assert!(inner.has_child("stanza-id", "urn:xmpp:sid:0"));
    }
}
