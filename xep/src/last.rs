//! XEP-0012: Last Activity (jabber:iq:last) — to the server: its uptime in seconds; to an
//! account's bare JID: seconds since its last session ended and the status it left with, only for
//! a requester subscribed to the account's presence (or the account itself). A contact with an
//! available resource answers `seconds='0'` (XEP-0012 §4). Last logouts are recorded by a session
//! hook.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;

use crate::host::{Host, LastActivity};
use crate::ns;
use crate::registry::{
    Flow, IqHandler, IqReply, IqScope, Registry, SessionHook, StanzaHook, Target,
};
use crate::stanza::{n, Stanza, StanzaError};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn query(seconds: u64, status: &str) -> Element {
    let mut b = Element::builder("query", ns::LAST).attr(n("seconds"), seconds.to_string());
    if !status.is_empty() {
        b = b.append(status);
    }
    b.build()
}

struct ServerUptime;

#[async_trait]
impl IqHandler for ServerUptime {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        let up = host
            .started_at()
            .elapsed()
            .map(|d| d.as_secs())
            .unwrap_or(0);
        IqReply::Result(Some(query(up, "")))
    }
}

struct AccountLast;

#[async_trait]
impl IqHandler for AccountLast {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        if iq.type_() != "get" {
            return IqReply::Error(StanzaError::BadRequest(None));
        }
        let requester = iq.from.to_bare();
        let owner: BareJid = match &iq.to {
            Some(to) => to.to_bare(),
            None => requester.clone(),
        };
        if owner != requester {
            // XEP-0012 §4: only entities with a presence subscription may learn this.
            let allowed = match host.roster().item(&owner, &requester).await {
                Ok(Some(item)) => item.subscription.has_from(),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "last activity: roster lookup failed");
                    return IqReply::Error(StanzaError::InternalServerError(None));
                }
            };
            if !allowed {
                return IqReply::Error(StanzaError::Forbidden(None));
            }
        }
        if host.resources(&owner).iter().any(|r| r.is_available()) {
            return IqReply::Result(Some(query(0, "")));
        }
        match host.last_activity().get(&owner).await {
            Ok(Some(last)) => IqReply::Result(Some(query(
                now_secs().saturating_sub(last.logout),
                &last.status,
            ))),
            Ok(None) => IqReply::Error(StanzaError::ServiceUnavailable(None)),
            Err(e) => {
                tracing::warn!(error = %e, "last activity: store read failed");
                IqReply::Error(StanzaError::InternalServerError(None))
            }
        }
    }
}

/// Records the status of an unavailable broadcast from a user's last available resource: XEP-0012
/// reports the status of the last unavailable presence. Observes only; never handles.
struct RecordUnavailable;

#[async_trait]
impl StanzaHook for RecordUnavailable {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, _target: Target) -> Flow {
        let Ok(full) = st.from.clone().try_into_full() else {
            return Flow::Pass;
        };
        if st.to.is_some() || st.type_() != "unavailable" || others_online(host, &full) {
            return Flow::Pass;
        }
        let status = st
            .el
            .get_child("status", ns::CLIENT)
            .map(|s| s.text())
            .unwrap_or_default();
        record(host, &full.to_bare(), status).await;
        Flow::Pass
    }
}

/// Records the logout time when a user's last session ends. A session that ended while still
/// available (a lost connection) left no status; one that sent unavailable first keeps the
/// status recorded then.
struct RecordLogout;

#[async_trait]
impl SessionHook for RecordLogout {
    async fn ended(
        &self,
        host: &dyn Host,
        full: &FullJid,
        presence: Option<&Element>,
        _directed: &[jid::Jid],
    ) {
        if others_online(host, full) {
            return;
        }
        let user = full.to_bare();
        let status = match presence {
            Some(_) => String::new(),
            None => match host.last_activity().get(&user).await {
                Ok(Some(last)) => last.status,
                _ => String::new(),
            },
        };
        record(host, &user, status).await;
    }
}

/// Whether the user has a bound resource other than `full`.
fn others_online(host: &dyn Host, full: &FullJid) -> bool {
    host.resources(&full.to_bare())
        .iter()
        .any(|r| &r.jid != full)
}

async fn record(host: &dyn Host, user: &BareJid, status: String) {
    let last = LastActivity {
        logout: now_secs(),
        status,
    };
    if let Err(e) = host.last_activity().set(user, &last).await {
        tracing::warn!(error = %e, "last activity: store write failed");
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0012");
    reg.iq(IqScope::Server, ns::LAST, Arc::new(ServerUptime));
    reg.iq(IqScope::Account, ns::LAST, Arc::new(AccountLast));
    reg.session_hook(Arc::new(RecordLogout));
    // Above the presence module, so the status is seen before presence handles the stanza.
    reg.presence_hook(
        crate::presence::HOOK_PRIORITY + 10,
        Arc::new(RecordUnavailable),
    );
    reg.server_feature(ns::LAST);
    reg.account_feature(ns::LAST);
}
