//! XEP-0115: Entity Capabilities — the server's caps (`sha-1` verification string over its
//! disco#info identities and features, §5.1) on its stream features, so clients can cache what
//! the server supports; disco answers queries on `node#ver`.

use base64::Engine;
use minidom::Element;
use sha1::{Digest, Sha1};

use crate::ns;
use crate::registry::Registry;
use crate::stanza::n;

pub const NODE: &str = "https://halyard.chat";

/// XEP-0115 §5.1 verification string: identities `category/type/lang/name<`, sorted, then
/// features `var<`, sorted (the registry keeps both sorted); SHA-1, base64.
pub fn ver(reg: &Registry) -> String {
    let mut s = String::new();
    for id in reg.server_identities() {
        s.push_str(&format!(
            "{}/{}//{}<",
            id.category,
            id.type_,
            id.name.unwrap_or("")
        ));
    }
    for f in reg.server_features() {
        s.push_str(f);
        s.push('<');
    }
    base64::engine::general_purpose::STANDARD.encode(Sha1::digest(s.as_bytes()))
}

pub fn node_ver(reg: &Registry) -> String {
    format!("{NODE}#{}", ver(reg))
}

/// The `<c/>` element for the stream features.
pub fn element(reg: &Registry) -> Element {
    Element::builder("c", ns::CAPS)
        .attr(n("hash"), "sha-1")
        .attr(n("node"), NODE)
        .attr(n("ver"), ver(reg))
        .build()
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0115");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Identity;

    /// XEP-0115 §5.2 simple generation example (Exodus client).
    #[test]
    fn spec_example_hash() {
        let mut reg = Registry::new();
        reg.server_identity(Identity {
            category: "client",
            type_: "pc",
            name: Some("Exodus 0.9.1"),
        });
        for f in [
            "http://jabber.org/protocol/caps",
            "http://jabber.org/protocol/disco#info",
            "http://jabber.org/protocol/disco#items",
            "http://jabber.org/protocol/muc",
        ] {
            reg.server_feature(f);
        }
        assert_eq!(ver(&reg), "QgayPKawpkPSDYmwT/WM94uAlu0=");
    }
}
