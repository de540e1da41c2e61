//! XEP-0030: Service Discovery (disco#info and disco#items) — for the server, whose features and
//! identities come from the module registry, and for accounts (answered by the server on the
//! account's behalf: `account/registered` plus account features). A query with the XEP-0115 caps
//! node (`node#ver`) is answered like the plain query; any other node gets `item-not-found`.

use std::sync::Arc;

use async_trait::async_trait;
use minidom::Element;

use crate::caps;
use crate::host::Host;
use crate::ns;
use crate::registry::{IqHandler, IqReply, IqScope, Registry};
use crate::stanza::{n, Stanza, StanzaError};

/// The disco#info result for the server, as XEP-0115 hashes it.
pub fn server_info(reg: &Registry, node: Option<&str>) -> Element {
    let mut b = Element::builder("query", ns::DISCO_INFO);
    if let Some(node) = node {
        b = b.attr(n("node"), node);
    }
    for id in reg.server_identities() {
        let mut ib = Element::builder("identity", ns::DISCO_INFO)
            .attr(n("category"), id.category)
            .attr(n("type"), id.type_);
        if let Some(name) = id.name {
            ib = ib.attr(n("name"), name);
        }
        b = b.append(ib.build());
    }
    for var in reg.server_features() {
        b = b.append(feature(var));
    }
    b.build()
}

fn feature(var: &str) -> Element {
    Element::builder("feature", ns::DISCO_INFO)
        .attr(n("var"), var)
        .build()
}

fn check_node(reg: &Registry, iq: &Stanza) -> Result<Option<String>, StanzaError> {
    let node = iq.payload().and_then(|q| q.attr("node")).map(str::to_owned);
    match node.as_deref() {
        None => Ok(None),
        Some(nd) if nd == caps::node_ver(reg) => Ok(node),
        Some(_) => Err(StanzaError::ItemNotFound(None)),
    }
}

struct ServerInfo;

#[async_trait]
impl IqHandler for ServerInfo {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        match check_node(host.registry(), iq) {
            Ok(node) => IqReply::Result(Some(server_info(host.registry(), node.as_deref()))),
            Err(e) => IqReply::Error(e),
        }
    }
}

struct AccountInfo;

#[async_trait]
impl IqHandler for AccountInfo {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        if iq.payload().and_then(|q| q.attr("node")).is_some() {
            return IqReply::Error(StanzaError::ItemNotFound(None));
        }
        let mut b = Element::builder("query", ns::DISCO_INFO).append(
            Element::builder("identity", ns::DISCO_INFO)
                .attr(n("category"), "account")
                .attr(n("type"), "registered")
                .build(),
        );
        for var in host.registry().account_features() {
            b = b.append(feature(var));
        }
        IqReply::Result(Some(b.build()))
    }
}

struct Items;

#[async_trait]
impl IqHandler for Items {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        if iq.payload().and_then(|q| q.attr("node")).is_some() {
            return IqReply::Error(StanzaError::ItemNotFound(None));
        }
        let mut q = Element::builder("query", ns::DISCO_ITEMS);
        // The server's components are its items; an account has none to show.
        let to_server = iq.to.as_ref().is_some_and(|t| t.node().is_none());
        if to_server {
            for (domain, c) in host.registry().components() {
                q = q.append(
                    Element::builder("item", ns::DISCO_ITEMS)
                        .attr(n("jid"), domain)
                        .attr(n("name"), c.name())
                        .build(),
                );
            }
        }
        IqReply::Result(Some(q.build()))
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0030");
    reg.iq(IqScope::Server, ns::DISCO_INFO, Arc::new(ServerInfo));
    reg.iq(IqScope::Account, ns::DISCO_INFO, Arc::new(AccountInfo));
    let items = Arc::new(Items);
    reg.iq(IqScope::Server, ns::DISCO_ITEMS, items.clone());
    reg.iq(IqScope::Account, ns::DISCO_ITEMS, items);
    reg.server_identity(crate::registry::Identity {
        category: "server",
        type_: "im",
        name: Some("Halyard"),
    });
    reg.server_feature(ns::DISCO_INFO);
    reg.server_feature(ns::DISCO_ITEMS);
    reg.account_feature(ns::DISCO_INFO);
    reg.account_feature(ns::DISCO_ITEMS);
}
