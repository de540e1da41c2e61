//! XEP-0352: Client State Indication (`urn:xmpp:csi:0`).
//!
//! A client that says `<inactive/>` (a phone with the screen off) does not need every presence
//! change and typing notification the moment it happens: each one wakes the radio. The session
//! (core, `src/c2s/csi.rs`) holds such stanzas back while the client is inactive and sends them,
//! in order, before the next stanza that matters, or when the client says `<active/>`. This
//! module advertises the feature and decides what matters ([`classify`]), like Prosody's
//! mod_csi_simple: messages with a body (or an encrypted payload, or such a message forwarded
//! by carbons or an archive query), message errors and every iq go at once; presence,
//! chat states, receipts and markers wait. Presence is coalesced per sender (only the latest
//! presence of each full JID is kept) and so are chat states per conversation.

use minidom::Element;

use crate::ns;
use crate::registry::Registry;

pub const NS: &str = "urn:xmpp:csi:0";

/// What an inactive client gets for a stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// Send now, after whatever is held.
    Urgent,
    /// Hold back; a later held stanza with the same key replaces this one.
    Hold(Option<String>),
}

const ENCRYPTED: &[(&str, &str)] = &[
    ("encrypted", "eu.siacs.conversations.axolotl"),
    ("encrypted", "urn:xmpp:omemo:2"),
    ("openpgp", "urn:xmpp:openpgp:0"),
    ("x", "jabber:x:encrypted"),
];

/// A message a user would want to see: it has a body or an encrypted payload.
fn has_content(m: &Element) -> bool {
    m.get_child("body", ns::CLIENT).is_some()
        || ENCRYPTED
            .iter()
            .any(|(name, xmlns)| m.get_child(*name, *xmlns).is_some())
}

/// Messages forwarded inside `m`: carbons (XEP-0280) and archive results (XEP-0313).
fn forwarded(m: &Element) -> impl Iterator<Item = &Element> {
    m.children()
        .filter(|c| c.name() == "sent" || c.name() == "received" || c.name() == "result")
        .filter_map(|c| c.get_child("forwarded", "urn:xmpp:forward:0"))
        .flat_map(|f| f.children().filter(|c| c.name() == "message"))
}

fn is_chat_state_only(m: &Element) -> bool {
    let mut any = false;
    for c in m.children() {
        if c.ns() == "http://jabber.org/protocol/chatstates" {
            any = true;
        } else if c.ns() != "urn:xmpp:hints" && c.ns() != "urn:xmpp:sid:0" {
            return false;
        }
    }
    any
}

/// Whether `el` (a stanza about to be sent to an inactive client) goes now or waits.
pub fn classify(el: &Element) -> Class {
    match el.name() {
        "message" => {
            if el.attr("type") == Some("error") || has_content(el) || forwarded(el).any(has_content)
            {
                return Class::Urgent;
            }
            if is_chat_state_only(el) {
                let from = el.attr("from").unwrap_or("");
                let bare = from.split('/').next().unwrap_or(from);
                return Class::Hold(Some(format!("cs\u{0}{bare}")));
            }
            Class::Hold(None)
        }
        "presence" => match el.attr("type") {
            // Subscription requests and answers each matter on their own.
            Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" | "error") => {
                Class::Hold(None)
            }
            _ => Class::Hold(Some(format!("p\u{0}{}", el.attr("from").unwrap_or("")))),
        },
        _ => Class::Urgent,
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0352");
    reg.stream_feature(Element::bare("csi", NS));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(s: &str) -> Element {
        s.parse().unwrap()
    }

    #[test]
    fn what_waits_and_what_goes() {
        let urgent = [
            "<message xmlns='jabber:client' from='a@x/r'><body>hi</body></message>",
            "<message xmlns='jabber:client' type='error' from='a@x'/>",
            "<message xmlns='jabber:client'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
            "<message xmlns='jabber:client'><received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client'><body>x</body></message></forwarded></received></message>",
            "<iq xmlns='jabber:client' type='get' id='1'/>",
        ];
        for s in urgent {
            assert_eq!(classify(&el(s)), Class::Urgent, "{s}");
        }
        let held = [
            ("<presence xmlns='jabber:client' from='a@x/r'/>", Some("p\u{0}a@x/r")),
            (
                "<presence xmlns='jabber:client' from='a@x/r' type='unavailable'/>",
                Some("p\u{0}a@x/r"),
            ),
            ("<presence xmlns='jabber:client' from='a@x' type='subscribe'/>", None),
            (
                "<message xmlns='jabber:client' from='a@x/r'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
                Some("cs\u{0}a@x"),
            ),
            (
                "<message xmlns='jabber:client' from='a@x/r'><received xmlns='urn:xmpp:receipts' id='1'/></message>",
                None,
            ),
        ];
        for (s, key) in held {
            assert_eq!(
                classify(&el(s)),
                Class::Hold(key.map(str::to_string)),
                "{s}"
            );
        }
    }
}
