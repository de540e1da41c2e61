//! What modules register with the core (ejabberd's `gen_mod` declarations, Prosody's hooks).
//!
//! - IQ handlers keyed by *(scope, payload namespace)*: `Server` for iqs to the domain,
//!   `Account` for iqs to a bare JID (or with no `to`, which means the sender's own account).
//!   An iq get/set nobody handles gets `service-unavailable`.
//! - Message and presence hooks, run in descending priority until one returns
//!   [`Flow::Handled`]; what nobody handles gets the router's RFC 6121 §8 default.
//! - Session hooks for binding and the end of a session.
//! - Disco features and identities for the server and for accounts, and stream features offered
//!   after authentication.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use jid::{FullJid, Jid};
use minidom::Element;

use crate::host::Host;
use crate::stanza::{Stanza, StanzaError};

/// Where a stanza is addressed, as RFC 6120 §10 classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The server's domain (or a domain JID with a resource).
    Host,
    /// A bare JID of an account, or no `to` at all.
    Bare,
    /// A full JID of an account.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IqScope {
    Server,
    Account,
}

/// Whether a hook consumed the stanza.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Handled,
    Pass,
}

/// A module's answer to an iq get/set.
#[derive(Debug)]
pub enum IqReply {
    Result(Option<Element>),
    Error(StanzaError),
}

#[async_trait]
pub trait IqHandler: Send + Sync {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply;
}

#[async_trait]
pub trait StanzaHook: Send + Sync {
    /// A hook may rewrite the stanza (e.g. add a stanza-id) for the hooks after it and for
    /// delivery.
    async fn handle(&self, host: &dyn Host, stanza: &mut Stanza, target: Target) -> Flow;
}

#[async_trait]
pub trait SessionHook: Send + Sync {
    /// A resource was bound.
    async fn bound(&self, _host: &dyn Host, _full: &FullJid) {}
    /// A resource became able to receive messages sent to its bare JID: its initial presence,
    /// or a priority that went from negative to non-negative, has been recorded (RFC 6121
    /// §8.5.2.1). Called by the presence module after the resource counts as available.
    async fn available(&self, _host: &dyn Host, _full: &FullJid) {}
    /// A bound session ended (logout, lost connection, replaced). `presence` is its last
    /// available presence if it had one; `directed` the entities it sent directed presence to
    /// (RFC 6121 §4.6.3), which are owed an unavailable. The session is already unbound.
    async fn ended(
        &self,
        _host: &dyn Host,
        _full: &FullJid,
        _presence: Option<&Element>,
        _directed: &[Jid],
    ) {
    }
}

/// A service on its own domain inside this server (XEP-0114's idea without the socket): the push
/// app server `push.<domain>`, later upload and MUC. The router hands it every stanza addressed
/// to its domain (with or without node and resource); it answers through [`Host::route`].
#[async_trait]
pub trait Component: Send + Sync {
    /// Its name in the server's disco#items.
    fn name(&self) -> &str;
    async fn handle(&self, host: &dyn Host, stanza: Stanza);
}

/// A disco identity (XEP-0030 §3.1).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    pub category: &'static str,
    pub type_: &'static str,
    pub name: Option<&'static str>,
}

#[derive(Default)]
pub struct Registry {
    server_iq: HashMap<&'static str, Arc<dyn IqHandler>>,
    account_iq: HashMap<&'static str, Arc<dyn IqHandler>>,
    message_hooks: Vec<(i32, Arc<dyn StanzaHook>)>,
    presence_hooks: Vec<(i32, Arc<dyn StanzaHook>)>,
    session_hooks: Vec<Arc<dyn SessionHook>>,
    server_features: BTreeSet<&'static str>,
    account_features: BTreeSet<&'static str>,
    server_identities: BTreeSet<Identity>,
    stream_features: Vec<Element>,
    modules: Vec<&'static str>,
    components: Vec<(String, Arc<dyn Component>)>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a module is loaded (for logs and the README's supported-XEP table test).
    pub fn module(&mut self, name: &'static str) {
        self.modules.push(name);
    }

    pub fn modules(&self) -> &[&'static str] {
        &self.modules
    }

    /// Registers the handler for iq get/set whose payload is in namespace `ns`.
    ///
    /// # Panics
    /// When two modules claim the same scope and namespace: that is a build-time mistake.
    pub fn iq(&mut self, scope: IqScope, ns: &'static str, handler: Arc<dyn IqHandler>) {
        let map = match scope {
            IqScope::Server => &mut self.server_iq,
            IqScope::Account => &mut self.account_iq,
        };
        let prev = map.insert(ns, handler);
        assert!(prev.is_none(), "two iq handlers for {scope:?} {ns}");
    }

    pub fn iq_handler(&self, scope: IqScope, ns: &str) -> Option<&Arc<dyn IqHandler>> {
        match scope {
            IqScope::Server => self.server_iq.get(ns),
            IqScope::Account => self.account_iq.get(ns),
        }
    }

    pub fn message_hook(&mut self, priority: i32, hook: Arc<dyn StanzaHook>) {
        insert_by_priority(&mut self.message_hooks, priority, hook);
    }

    pub fn presence_hook(&mut self, priority: i32, hook: Arc<dyn StanzaHook>) {
        insert_by_priority(&mut self.presence_hooks, priority, hook);
    }

    pub fn message_hooks(&self) -> impl Iterator<Item = &Arc<dyn StanzaHook>> {
        self.message_hooks.iter().map(|(_, h)| h)
    }

    pub fn presence_hooks(&self) -> impl Iterator<Item = &Arc<dyn StanzaHook>> {
        self.presence_hooks.iter().map(|(_, h)| h)
    }

    pub fn session_hook(&mut self, hook: Arc<dyn SessionHook>) {
        self.session_hooks.push(hook);
    }

    pub fn session_hooks(&self) -> &[Arc<dyn SessionHook>] {
        &self.session_hooks
    }

    pub fn server_feature(&mut self, var: &'static str) {
        self.server_features.insert(var);
    }

    pub fn account_feature(&mut self, var: &'static str) {
        self.account_features.insert(var);
    }

    pub fn server_identity(&mut self, identity: Identity) {
        self.server_identities.insert(identity);
    }

    pub fn server_features(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.server_features.iter().copied()
    }

    pub fn account_features(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.account_features.iter().copied()
    }

    pub fn server_identities(&self) -> impl Iterator<Item = &Identity> {
        self.server_identities.iter()
    }

    /// A stream feature offered after authentication (e.g. roster versioning).
    pub fn stream_feature(&mut self, el: Element) {
        self.stream_features.push(el);
    }

    pub fn stream_features(&self) -> &[Element] {
        &self.stream_features
    }

    /// Registers a component serving `domain` (e.g. `push.example.org`).
    ///
    /// # Panics
    /// When two components claim one domain: a configuration mistake caught at startup.
    pub fn component(&mut self, domain: String, handler: Arc<dyn Component>) {
        assert!(
            self.component_for(&domain).is_none(),
            "two components for {domain}"
        );
        self.components.push((domain, handler));
    }

    pub fn component_for(&self, domain: &str) -> Option<&Arc<dyn Component>> {
        self.components
            .iter()
            .find(|(d, _)| d == domain)
            .map(|(_, c)| c)
    }

    /// Components as `(domain, handler)`, in registration order (for disco#items).
    pub fn components(&self) -> impl Iterator<Item = (&str, &Arc<dyn Component>)> {
        self.components.iter().map(|(d, c)| (d.as_str(), c))
    }
}

fn insert_by_priority(
    list: &mut Vec<(i32, Arc<dyn StanzaHook>)>,
    priority: i32,
    hook: Arc<dyn StanzaHook>,
) {
    // Stable: equal priorities run in registration order.
    let pos = list
        .iter()
        .position(|(p, _)| *p < priority)
        .unwrap_or(list.len());
    list.insert(pos, (priority, hook));
}
