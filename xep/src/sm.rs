//! XEP-0198: Stream Management (`urn:xmpp:sm:3`) — the protocol side.
//!
//! Stream management lives on the stream, below routing, so the session code in the core
//! (`src/c2s/sm.rs`) runs it: counting, acks, hibernation and resumption. This module advertises
//! the stream feature and holds what does not need a socket: the nonzas' shapes, the 32-bit
//! counter arithmetic (XEP-0198 §4: counters wrap at 2^32), and parsing of what clients send.
//!
//! Supported: `enable` with `resume` and `max`, `enabled` with `id`, `resume`, `max` and an
//! optional `location`, `<r/>`/`<a/>` both ways, `resume`/`resumed`/`failed` (with `h` where the
//! server still knows it), `handled-count-too-high`.

use minidom::Element;

use crate::registry::Registry;
use crate::stanza::n;

pub const NS: &str = "urn:xmpp:sm:3";

/// What the client sent, as far as stream management is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nonza {
    Enable {
        resume: bool,
        /// The resumption timeout the client would like, in seconds.
        max: Option<u64>,
    },
    Resume {
        previd: String,
        h: u32,
    },
    Request,
    Ack {
        h: u32,
    },
}

/// Why a nonza in the SM namespace is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// Parses an element in the SM namespace; `Ok(None)` for anything outside it.
pub fn parse(el: &Element) -> Result<Option<Nonza>, Malformed> {
    if el.ns() != NS {
        return Ok(None);
    }
    let h = || -> Result<u32, Malformed> {
        el.attr("h")
            .ok_or(Malformed("missing 'h'"))?
            .parse::<u32>()
            .map_err(|_| Malformed("'h' is not an unsigned 32-bit integer"))
    };
    Ok(Some(match el.name() {
        "enable" => Nonza::Enable {
            resume: matches!(el.attr("resume"), Some("true" | "1")),
            max: el.attr("max").and_then(|m| m.parse().ok()),
        },
        "resume" => Nonza::Resume {
            previd: el
                .attr("previd")
                .filter(|p| !p.is_empty())
                .ok_or(Malformed("missing 'previd'"))?
                .to_string(),
            h: h()?,
        },
        "r" => Nonza::Request,
        "a" => Nonza::Ack { h: h()? },
        _ => return Err(Malformed("unknown stream management element")),
    }))
}

/// How many stanzas an ack of `h` newly covers, given that `acked` were covered before and
/// `sent` were sent in all (all counters modulo 2^32). `Err(())` when `h` claims more than was
/// sent, or less than an earlier ack.
#[allow(clippy::result_unit_err)]
pub fn newly_acked(acked: u32, h: u32, sent: u32) -> Result<u32, ()> {
    let outstanding = sent.wrapping_sub(acked);
    let n = h.wrapping_sub(acked);
    if n > outstanding {
        return Err(());
    }
    Ok(n)
}

pub fn enabled(id: Option<&str>, max: Option<u64>, location: Option<&str>) -> Element {
    let mut b = Element::builder("enabled", NS);
    if let Some(id) = id {
        b = b.attr(n("id"), id).attr(n("resume"), "true");
        if let Some(max) = max {
            b = b.attr(n("max"), max.to_string());
        }
        if let Some(loc) = location {
            b = b.attr(n("location"), loc);
        }
    }
    b.build()
}

pub fn resumed(previd: &str, h: u32) -> Element {
    Element::builder("resumed", NS)
        .attr(n("previd"), previd)
        .attr(n("h"), h.to_string())
        .build()
}

/// `<failed/>` with a stanza error condition, and `h` when the server knows it.
pub fn failed(condition: &str, h: Option<u32>) -> Element {
    let mut b = Element::builder("failed", NS);
    if let Some(h) = h {
        b = b.attr(n("h"), h.to_string());
    }
    b.append(Element::bare(condition.to_string(), crate::ns::STANZAS))
        .build()
}

pub fn ack(h: u32) -> Element {
    Element::builder("a", NS)
        .attr(n("h"), h.to_string())
        .build()
}

pub fn request() -> Element {
    Element::bare("r", NS)
}

/// The `<handled-count-too-high/>` child of the stream error (or `<failed/>`) sent when a peer
/// acks more than it was sent.
pub fn too_high(h: u32, sent: u32) -> Element {
    Element::builder("handled-count-too-high", NS)
        .attr(n("h"), h.to_string())
        .attr(n("send-count"), sent.to_string())
        .build()
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0198");
    reg.stream_feature(Element::bare("sm", NS));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(s: &str) -> Element {
        s.parse().unwrap()
    }

    #[test]
    fn parses_nonzas() {
        assert_eq!(
            parse(&el(
                "<enable xmlns='urn:xmpp:sm:3' resume='true' max='60'/>"
            )),
            Ok(Some(Nonza::Enable {
                resume: true,
                max: Some(60)
            }))
        );
        assert_eq!(
            parse(&el("<enable xmlns='urn:xmpp:sm:3'/>")),
            Ok(Some(Nonza::Enable {
                resume: false,
                max: None
            }))
        );
        assert_eq!(
            parse(&el("<a xmlns='urn:xmpp:sm:3' h='4294967295'/>")),
            Ok(Some(Nonza::Ack { h: u32::MAX }))
        );
        assert!(parse(&el("<a xmlns='urn:xmpp:sm:3' h='-1'/>")).is_err());
        assert!(parse(&el("<a xmlns='urn:xmpp:sm:3' h='4294967296'/>")).is_err());
        assert!(parse(&el("<resume xmlns='urn:xmpp:sm:3' h='1'/>")).is_err());
        assert_eq!(
            parse(&el("<resume xmlns='urn:xmpp:sm:3' previd='x' h='1'/>")),
            Ok(Some(Nonza::Resume {
                previd: "x".into(),
                h: 1
            }))
        );
        assert_eq!(
            parse(&el("<r xmlns='urn:xmpp:sm:3'/>")),
            Ok(Some(Nonza::Request))
        );
        assert_eq!(parse(&el("<r xmlns='urn:xmpp:sm:2'/>")), Ok(None));
    }

    #[test]
    fn ack_arithmetic_wraps() {
        assert_eq!(newly_acked(0, 3, 5), Ok(3));
        assert_eq!(newly_acked(3, 3, 5), Ok(0));
        assert_eq!(newly_acked(3, 6, 5), Err(()));
        // Across the wrap: 2^32 - 2 acked, 3 more sent (sent wrapped to 1).
        assert_eq!(newly_acked(u32::MAX - 1, 0, 1), Ok(2));
        assert_eq!(newly_acked(u32::MAX - 1, 1, 1), Ok(3));
        assert_eq!(newly_acked(u32::MAX - 1, 2, 1), Err(()));
        // An ack older than the last one is refused too.
        assert_eq!(newly_acked(5, 4, 9), Err(()));
    }

    #[test]
    fn shapes() {
        let e = enabled(Some("abc"), Some(300), None);
        assert_eq!(e.attr("resume"), Some("true"));
        assert_eq!(e.attr("max"), Some("300"));
        assert!(enabled(None, Some(300), None).attr("id").is_none());
        let f = failed("item-not-found", Some(7));
        assert_eq!(f.attr("h"), Some("7"));
        assert!(f.get_child("item-not-found", crate::ns::STANZAS).is_some());
    }
}
