//! The stanza as the router and modules see it: the raw element (routed as sent, so unknown
//! attributes and payloads survive) plus a small parsed header.

use jid::{BareJid, FullJid, Jid, ResourcePart};
use minidom::Element;

use crate::ns;

/// The three stanza kinds of RFC 6120 §8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Message,
    Presence,
    Iq,
}

impl Kind {
    pub fn of(el: &Element) -> Option<Kind> {
        if !el.has_ns(ns::CLIENT) {
            return None;
        }
        match el.name() {
            "message" => Some(Kind::Message),
            "presence" => Some(Kind::Presence),
            "iq" => Some(Kind::Iq),
            _ => None,
        }
    }
}

/// A stanza after the router has validated it and stamped `from`.
#[derive(Debug, Clone)]
pub struct Stanza {
    pub kind: Kind,
    /// The sender: the session's full JID, or a server/module address for generated stanzas.
    pub from: Jid,
    /// The addressee; `None` when the client left `to` out, which RFC 6120 §10.3 treats as the
    /// sender's own account.
    pub to: Option<Jid>,
    pub el: Element,
}

impl Stanza {
    /// The `type` attribute, with each kind's default applied (`normal` for messages, `available`
    /// for presence, which RFC 6121 expresses as no type).
    pub fn type_(&self) -> &str {
        match (self.kind, self.el.attr("type")) {
            (_, Some(t)) => t,
            (Kind::Message, None) => "normal",
            (Kind::Presence, None) => "available",
            (Kind::Iq, None) => "",
        }
    }

    pub fn id(&self) -> Option<&str> {
        self.el.attr("id")
    }

    pub fn is_error(&self) -> bool {
        self.el.attr("type") == Some("error")
    }

    /// The one child element of an iq get/set (the router has checked there is exactly one).
    pub fn payload(&self) -> Option<&Element> {
        self.el.children().next()
    }

    /// An iq `result` for this iq request, optionally carrying a payload.
    pub fn iq_result(&self, payload: Option<Element>) -> Element {
        let mut b = Element::builder("iq", ns::CLIENT)
            .attr(n("type"), "result")
            .attr(n("from"), self.to_or_sender_bare())
            .attr(n("to"), self.from.to_string());
        if let Some(id) = self.id() {
            b = b.attr(n("id"), id);
        }
        if let Some(p) = payload {
            b = b.append(p);
        }
        b.build()
    }

    /// Where a reply should come from: the address the request was sent to, or the sender's own
    /// bare JID when it had no `to` (RFC 6120 §10.3.3).
    pub fn to_or_sender_bare(&self) -> String {
        match &self.to {
            Some(t) => t.to_string(),
            None => self.from.to_bare().to_string(),
        }
    }

    /// The error reply to this stanza, or `None` when it is itself an error (RFC 6120 §8.3.1: an
    /// error is never answered with an error).
    pub fn error_reply(&self, err: StanzaError) -> Option<Element> {
        error_reply(
            &self.el,
            &self.from.to_string(),
            &self.to_or_sender_bare(),
            err,
        )
    }
}

/// Builds the error reply to `el` (from `reply_from`, to `reply_to`), keeping its name and id.
/// Returns `None` for an error stanza.
pub fn error_reply(
    el: &Element,
    reply_to: &str,
    reply_from: &str,
    err: StanzaError,
) -> Option<Element> {
    if el.attr("type") == Some("error") {
        return None;
    }
    let mut b = Element::builder(el.name(), ns::CLIENT)
        .attr(n("type"), "error")
        .attr(n("from"), reply_from)
        .attr(n("to"), reply_to);
    if let Some(id) = el.attr("id") {
        b = b.attr(n("id"), id);
    }
    // Presence and message errors carry the original payload so the sender can tell which one
    // failed (RFC 6120 §8.3.1 allows it); iq errors keep the query for the same reason.
    for child in el.children() {
        b = b.append(child.clone());
    }
    Some(b.append(err.to_element()).build())
}

/// RFC 6120 §8.3.3 defined conditions used by Halyard, with their §8.3.2 error types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StanzaError {
    BadRequest(Option<String>),
    Conflict(Option<String>),
    FeatureNotImplemented(Option<String>),
    Forbidden(Option<String>),
    Gone(Option<String>),
    InternalServerError(Option<String>),
    ItemNotFound(Option<String>),
    JidMalformed(Option<String>),
    NotAcceptable(Option<String>),
    NotAllowed(Option<String>),
    NotAuthorized(Option<String>),
    PolicyViolation(Option<String>),
    RecipientUnavailable(Option<String>),
    RemoteServerNotFound(Option<String>),
    ResourceConstraint(Option<String>),
    ServiceUnavailable(Option<String>),
    UnexpectedRequest(Option<String>),
}

impl StanzaError {
    fn parts(&self) -> (&'static str, &'static str, Option<&str>) {
        use StanzaError::*;
        let (cond, typ, text) = match self {
            BadRequest(t) => ("bad-request", "modify", t),
            Conflict(t) => ("conflict", "cancel", t),
            FeatureNotImplemented(t) => ("feature-not-implemented", "cancel", t),
            Forbidden(t) => ("forbidden", "auth", t),
            Gone(t) => ("gone", "cancel", t),
            InternalServerError(t) => ("internal-server-error", "cancel", t),
            ItemNotFound(t) => ("item-not-found", "cancel", t),
            JidMalformed(t) => ("jid-malformed", "modify", t),
            NotAcceptable(t) => ("not-acceptable", "modify", t),
            NotAllowed(t) => ("not-allowed", "cancel", t),
            NotAuthorized(t) => ("not-authorized", "auth", t),
            PolicyViolation(t) => ("policy-violation", "modify", t),
            RecipientUnavailable(t) => ("recipient-unavailable", "wait", t),
            RemoteServerNotFound(t) => ("remote-server-not-found", "cancel", t),
            ResourceConstraint(t) => ("resource-constraint", "wait", t),
            ServiceUnavailable(t) => ("service-unavailable", "cancel", t),
            UnexpectedRequest(t) => ("unexpected-request", "wait", t),
        };
        (cond, typ, text.as_deref())
    }

    /// The defined condition's element name, e.g. `service-unavailable`.
    pub fn condition(&self) -> &'static str {
        self.parts().0
    }

    pub fn to_element(&self) -> Element {
        let (cond, typ, text) = self.parts();
        let mut b = Element::builder("error", ns::CLIENT)
            .attr(n("type"), typ)
            .append(Element::bare(cond, ns::STANZAS));
        if let Some(t) = text {
            b = b.append(
                Element::builder("text", ns::STANZAS)
                    .attr_ns(rxml_xml_ns(), n("lang"), "en")
                    .append(t)
                    .build(),
            );
        }
        b.build()
    }
}

fn rxml_xml_ns() -> minidom::rxml::Namespace<'static> {
    minidom::rxml::Namespace::XML
}

/// Escapes text for an XML attribute value in single quotes (or character data).
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s
        .bytes()
        .any(|b| matches!(b, b'<' | b'>' | b'&' | b'\'' | b'"'))
    {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Parses an address from outside (a stanza's `to`, a configured domain) and checks that it is
/// in normal form: its text parses to the same JID again.
///
/// The `jid` crate's preparation is not idempotent for some compatibility characters: `℻`
/// prepares to `FAX`, which prepares to `fax`, so `℻@example.com` would be a JID of its own that
/// prints as another one's. RFC 7622 (PRECIS IdentifierClass, IDNA2008 for domains) refuses
/// such characters, and so does this.
pub fn parse_jid(s: &str) -> Result<Jid, String> {
    let jid = Jid::new(s).map_err(|e| format!("the JID {s:?} is not valid: {e}"))?;
    match Jid::new(&jid.to_string()) {
        Ok(again) if again == jid => Ok(jid),
        _ => Err(format!(
            "the JID {s:?} contains characters outside RFC 7622's classes (not stable under preparation)"
        )),
    }
}

/// [`parse_jid`] for an address that must be bare (`node@domain` or `domain`, no resource).
pub fn parse_bare_jid(s: &str) -> Result<BareJid, String> {
    match parse_jid(s)?.try_into_full() {
        Err(b) => Ok(b),
        Ok(_) => Err(format!(
            "the JID {s:?} has a resource; a bare JID is expected here"
        )),
    }
}

/// [`parse_jid`] for an address that must be full (`node@domain/resource` or `domain/resource`).
pub fn parse_full_jid(s: &str) -> Result<FullJid, String> {
    match parse_jid(s)?.try_into_full() {
        Ok(f) => Ok(f),
        Err(_) => Err(format!(
            "the JID {s:?} has no resource; a full JID is expected here"
        )),
    }
}

/// A resourcepart from outside (resource binding, an API), checked like [`parse_jid`]: it must
/// be valid and prepare to itself, so the bound JID prints as what it is.
pub fn parse_resource(s: &str) -> Result<ResourcePart, String> {
    let r = ResourcePart::new(s)
        .map_err(|e| format!("the resource {s:?} is not valid: {e}"))?
        .into_owned();
    match ResourcePart::new(r.as_str()) {
        Ok(again) if *again == *r => Ok(r),
        _ => Err(format!(
            "the resource {s:?} contains characters outside RFC 7622's classes (not stable under preparation)"
        )),
    }
}

#[cfg(test)]
mod parse_jid_tests {
    #[test]
    fn unstable_preparation_is_refused() {
        for s in ["\u{213b}@example.com", "a@\u{213b}", "\u{213b}/y@@xe"] {
            let e = super::parse_jid(s).unwrap_err();
            assert!(e.contains(s), "{e}");
        }
        let e = super::parse_jid("\u{213b}@example.com").unwrap_err();
        assert!(e.contains("outside RFC 7622"), "{e}");
        let j = super::parse_jid("Juliet@Example.COM/Balcony").unwrap();
        assert_eq!(j.to_string(), "juliet@example.com/Balcony");
    }

    #[test]
    fn bare_and_full() {
        let b = super::parse_bare_jid("Juliet@Example.COM").unwrap();
        assert_eq!(b.to_string(), "juliet@example.com");
        assert!(super::parse_bare_jid("example.com").is_ok());
        assert!(super::parse_bare_jid("juliet@example.com/r").is_err());
        assert!(super::parse_bare_jid("\u{213b}@example.com").is_err());
        assert!(super::parse_bare_jid("").is_err());
        let f = super::parse_full_jid("juliet@example.com/Balcony").unwrap();
        assert_eq!(f.resource().as_str(), "Balcony");
        assert!(super::parse_full_jid("juliet@example.com").is_err());
        assert!(super::parse_full_jid("\u{213b}@example.com/r").is_err());
        // As a resource ℻ prepares stably (no case folding after it), so it is accepted.
        assert!(super::parse_full_jid("a@example.com/\u{213b}").is_ok());
    }

    #[test]
    fn resources() {
        assert_eq!(
            super::parse_resource("Balcony").unwrap().as_str(),
            "Balcony"
        );
        assert!(super::parse_resource("").is_err());
        assert!(
            super::parse_resource("a/b").is_ok(),
            "a slash is allowed in a resource"
        );
        // Whatever ℻ prepares to as a resource, that is stable.
        let r = super::parse_resource("\u{213b}").unwrap();
        assert_eq!(super::parse_resource(r.as_str()).unwrap(), r);
    }
}

/// Forgets the namespace prefixes the sender declared, in `el` and every descendant; names and
/// attributes keep their namespaces, and serialising picks prefixes of its own.
///
/// Apply this to every element parsed from outside: minidom's writer panics on an element whose
/// descendant declares a prefix again (`<a xmlns:p='x'><b xmlns:p='x'/></a>`, well-formed XML),
/// and every stanza gets serialised.
pub fn forget_prefixes(el: &mut Element) {
    el.prefixes = Default::default();
    for child in el.children_mut() {
        forget_prefixes(child);
    }
}

/// Removes the child elements matching `pred`, keeping every other node in order.
pub fn remove_children(el: &mut Element, pred: impl Fn(&Element) -> bool) {
    if !el.children().any(&pred) {
        return;
    }
    for node in el.take_nodes() {
        match &node {
            minidom::Node::Element(c) if pred(c) => {}
            _ => el.append_node(node),
        }
    }
}

/// An attribute name known to be a valid NCName at compile time.
///
/// minidom's builder takes `NcName`; every call site passes a literal, so the conversion cannot
/// fail on input.
pub fn n(name: &'static str) -> minidom::rxml::NcName {
    minidom::rxml::NcName::try_from(name).expect("attribute literal is a valid NCName")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Element {
        s.parse().expect("test xml")
    }

    #[test]
    fn error_reply_swaps_addresses_and_keeps_id() {
        let el = parse(
            "<iq xmlns='jabber:client' type='get' id='a1' to='example.com'><q xmlns='urn:x'/></iq>",
        );
        let st = Stanza {
            kind: Kind::Iq,
            from: "u@example.com/r".parse().unwrap(),
            to: Some("example.com".parse().unwrap()),
            el,
        };
        let e = st
            .error_reply(StanzaError::ServiceUnavailable(None))
            .unwrap();
        assert_eq!(e.attr("type"), Some("error"));
        assert_eq!(e.attr("to"), Some("u@example.com/r"));
        assert_eq!(e.attr("from"), Some("example.com"));
        assert_eq!(e.attr("id"), Some("a1"));
        let err = e.get_child("error", ns::CLIENT).unwrap();
        assert_eq!(err.attr("type"), Some("cancel"));
        assert!(err.has_child("service-unavailable", ns::STANZAS));
    }

    #[test]
    fn errors_are_never_answered() {
        let el = parse("<message xmlns='jabber:client' type='error'/>");
        let st = Stanza {
            kind: Kind::Message,
            from: "u@example.com/r".parse().unwrap(),
            to: None,
            el,
        };
        assert!(st.error_reply(StanzaError::BadRequest(None)).is_none());
    }
}
