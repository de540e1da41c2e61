//! XEP-0199: XMPP Ping (urn:xmpp:ping) — the server answers pings to its domain and, on behalf of
//! an account, to the account's bare JID (RFC 6120 §10.5.3.1). Server-to-client pings for dead-peer
//! detection are sent by the core's session idle timer.

use std::sync::Arc;

use async_trait::async_trait;

use crate::host::Host;
use crate::ns;
use crate::registry::{IqHandler, IqReply, IqScope, Registry};
use crate::stanza::{Stanza, StanzaError};

struct Ping;

#[async_trait]
impl IqHandler for Ping {
    async fn handle(&self, _host: &dyn Host, iq: &Stanza) -> IqReply {
        match iq.type_() {
            "get" => IqReply::Result(None),
            _ => IqReply::Error(StanzaError::BadRequest(Some(
                "ping is an iq of type get".into(),
            ))),
        }
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0199");
    let h = Arc::new(Ping);
    reg.iq(IqScope::Server, ns::PING, h.clone());
    reg.iq(IqScope::Account, ns::PING, h);
    reg.server_feature(ns::PING);
    reg.account_feature(ns::PING);
}
