//! XEP-0092: Software Version (jabber:iq:version) — the server reports its name and version.
//! The operating system is left out on purpose (XEP-0092 §4 notes it helps attackers).

use std::sync::Arc;

use async_trait::async_trait;
use minidom::Element;

use crate::host::Host;
use crate::ns;
use crate::registry::{IqHandler, IqReply, IqScope, Registry};
use crate::stanza::{Stanza, StanzaError};

struct Version;

#[async_trait]
impl IqHandler for Version {
    async fn handle(&self, _host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(Some("version is read-only".into())));
        }
        IqReply::Result(Some(
            Element::builder("query", ns::VERSION)
                .append(
                    Element::builder("name", ns::VERSION)
                        .append("Halyard")
                        .build(),
                )
                .append(
                    Element::builder("version", ns::VERSION)
                        .append(env!("CARGO_PKG_VERSION"))
                        .build(),
                )
                .build(),
        ))
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0092");
    reg.iq(IqScope::Server, ns::VERSION, Arc::new(Version));
    reg.server_feature(ns::VERSION);
}
