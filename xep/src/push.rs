//! XEP-0357: Push Notifications, the user's server side (`urn:xmpp:push:0`).
//!
//! - Registrations: iq set `<enable jid='…' node='…'/>` to one's own account adds (or, for the
//!   same JID and node, replaces: §5 "use the last received request") a registration, with the
//!   optional `http://jabber.org/protocol/pubsub#publish-options` data form kept as given;
//!   `<disable jid='…' [node='…']/>` removes that JID's registration for the node, or all of its
//!   registrations without one (§6). Both only for one's own account (else `forbidden`); a
//!   missing `jid` or `node`, an invalid JID or a form of another FORM_TYPE is `bad-request`;
//!   more than `[push] max_registrations` is `not-allowed`. Stored per account (sled), durable
//!   before the answer; `urn:xmpp:push:0` is an account disco#info feature (§4.1).
//! - When to notify: for a message the archive would keep for its recipient (the archive's own
//!   rule, [`crate::mam::archivable_for`], also when archiving is off in the configuration;
//!   archive preferences are not consulted: they say what is kept, not what is worth waking a
//!   device for), when the recipient has registrations and no live stream: no bound resource,
//!   or all of them hibernating (XEP-0198), or every live one CSI-inactive (XEP-0352) with a
//!   stanza unacknowledged for `[push] inactive_unacked_ms` (checked again after that delay,
//!   since the message being routed is not yet queued when the hook runs). No notification while
//!   the user has a live, active stream; when a resource binds, the user's counts start again.
//!   A user's own messages to their account are not notified.
//! - What is published (§7): an iq set from the user's bare JID to the registration's JID with
//!   `<pubsub><publish node='…'><item><notification xmlns='urn:xmpp:push:0'>` holding an
//!   `urn:xmpp:push:summary` form with `message-count` (messages since the user was last
//!   reachable), `last-message-sender` (a bare JID) and, only with `[push] include_body`
//!   (off by default, per §10), `last-message-body`; then `<publish-options>` with the stored
//!   form when there is one.
//! - Delivery: through a durable queue (one row per registration, [`PushStore`]) that a worker
//!   ([`worker`]) drains for the server's lifetime; it also resumes what a restart left. A
//!   message writes its row without waiting for disk (the router's group commit flushes it with
//!   the message; offline storage waits for that flush before the sender's next stanza is read);
//!   the worker leases the rows it is about to publish (`request_timeout_ms` and a second) and
//!   waits for the group commit before publishing, so a crash mid-publish means one retry when
//!   the lease ends after the restart, not a loss.
//! - Bursts: the first message after a quiet period is published at once; the messages within
//!   `[push] coalesce_window_ms` after a publish produce at most one more, at the end of the
//!   window, carrying the count then.
//! - Errors (§7.1): no answer within `request_timeout_ms`, a `wait`-type error,
//!   `remote-server-timeout` or `internal-server-error` is retried with exponential backoff
//!   (`retry_base_ms` doubling up to `retry_max_ms`), up to `max_attempts`, after which that
//!   notification is dropped (the registration stays). Any other error disables the
//!   registration (§7.1 SHOULD), and nothing more is published to it.
//!
//! Not supported: affiliation-change messages from the app server (§8; the error path disables
//! instead), automatic re-enabling of disabled registrations, notifications for subscription
//! requests (`pending-subscription-count`).
//!
//! Logs never carry message bodies or publish options (they may hold secrets).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use jid::{BareJid, FullJid};
use minidom::Element;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::host::{Host, PushJob, PushKey, PushRegistration, PushSettings, ResourceInfo};
use crate::ns;
use crate::registry::{
    Flow, IqHandler, IqReply, IqScope, Registry, SessionHook, StanzaHook, Target,
};
use crate::stanza::{n, Stanza, StanzaError};

pub const NS: &str = "urn:xmpp:push:0";
pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
pub const SUMMARY: &str = "urn:xmpp:push:summary";
pub const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";

/// The message hook's priority: below carbons (50), above the archive's sender-id removal (20),
/// offline storage (10) and delivery. It never consumes the message.
pub const HOOK_PRIORITY: i32 = 30;

/// Rows the worker reads per store scan.
const BATCH: usize = 64;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ms(v: u64) -> u64 {
    v.saturating_mul(1000)
}

// --- Reachability -----------------------------------------------------------------------

/// Whether a user can be reached without a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A live stream will get the message.
    Reachable,
    /// Nothing live will: notify.
    Unreachable,
    /// Every live stream is inactive: look again after this long.
    CheckIn(Duration),
}

/// Decides [`Reach`] from the user's resources. `arriving`: a message is being routed right now
/// and is not yet in any session's queue, so an inactive stream with nothing unacked yet is
/// checked again after `limit` rather than trusted.
pub fn reach(resources: &[ResourceInfo], now: Instant, limit: Duration, arriving: bool) -> Reach {
    let mut live = resources.iter().filter(|r| !r.hibernating).peekable();
    if live.peek().is_none() {
        return Reach::Unreachable;
    }
    let live: Vec<&ResourceInfo> = live.collect();
    if live.iter().any(|r| !r.inactive) {
        return Reach::Reachable;
    }
    match live.iter().filter_map(|r| r.unacked_since).min() {
        Some(since) => {
            let age = now.saturating_duration_since(since);
            if age >= limit {
                Reach::Unreachable
            } else {
                Reach::CheckIn(limit - age)
            }
        }
        None if arriving => Reach::CheckIn(limit),
        None => Reach::Reachable,
    }
}

// --- Registrations ----------------------------------------------------------------------

fn store_failed(e: impl std::fmt::Display) -> StanzaError {
    tracing::warn!(error = %e, "push: store failed");
    StanzaError::InternalServerError(None)
}

fn bad(text: &str) -> IqReply {
    IqReply::Error(StanzaError::BadRequest(Some(text.into())))
}

/// The normalised JID in `el`'s `jid` attribute.
fn service_jid(el: &Element) -> Result<String, IqReply> {
    let raw = el
        .attr("jid")
        .ok_or_else(|| bad("the push service's 'jid' is missing"))?;
    crate::stanza::parse_jid(raw)
        .map(|j| j.to_string())
        .map_err(|e| IqReply::Error(StanzaError::JidMalformed(Some(e))))
}

/// The FORM_TYPE of a data form.
fn form_type(x: &Element) -> Option<String> {
    x.children()
        .find(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some("FORM_TYPE"))
        .and_then(|f| f.get_child("value", ns::DATA_FORMS))
        .map(|v| v.text().trim().to_string())
}

async fn enable(host: &dyn Host, owner: &BareJid, el: &Element) -> IqReply {
    let jid = match service_jid(el) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let Some(node) = el.attr("node").filter(|n| !n.is_empty()) else {
        return bad("the push service's 'node' is missing");
    };
    let mut forms = el.children().filter(|c| c.is("x", ns::DATA_FORMS));
    let options = match (forms.next(), forms.next()) {
        (None, _) => None,
        (Some(x), None) if form_type(x).as_deref() == Some(PUBLISH_OPTIONS) => {
            Some(String::from(x))
        }
        (Some(_), None) => return bad(
            "the enable form's FORM_TYPE must be http://jabber.org/protocol/pubsub#publish-options",
        ),
        (Some(_), Some(_)) => return bad("at most one publish-options form"),
    };
    let store = host.push();
    let existing = match store.registrations(owner).await {
        Ok(r) => r,
        Err(e) => return IqReply::Error(store_failed(e)),
    };
    let max = host.settings().push.max_registrations;
    let replaces = existing.iter().any(|r| r.jid == jid && r.node == node);
    if !replaces && existing.len() >= max {
        return IqReply::Error(StanzaError::NotAllowed(Some(format!(
            "at most {max} push registrations per account"
        ))));
    }
    let reg = PushRegistration {
        jid: jid.clone(),
        node: node.to_string(),
        options,
    };
    if let Err(e) = store.put_registration(owner, &reg).await {
        return IqReply::Error(store_failed(e));
    }
    if let Err(e) = host.durable().await {
        return IqReply::Error(store_failed(e));
    }
    tracing::info!(%owner, service = %jid, replaces, "push: enabled");
    IqReply::Result(None)
}

async fn disable(host: &dyn Host, owner: &BareJid, el: &Element) -> IqReply {
    let jid = match service_jid(el) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let node = el.attr("node").filter(|n| !n.is_empty());
    let removed = match host.push().remove_registrations(owner, &jid, node).await {
        Ok(n) => n,
        Err(e) => return IqReply::Error(store_failed(e)),
    };
    if let Err(e) = host.durable().await {
        return IqReply::Error(store_failed(e));
    }
    tracing::info!(%owner, service = %jid, removed, "push: disabled");
    IqReply::Result(None)
}

struct PushIq;

#[async_trait]
impl IqHandler for PushIq {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        let owner = iq.from.to_bare();
        if iq
            .to
            .as_ref()
            .is_some_and(|to| to.is_full() || to.to_bare() != owner)
        {
            return IqReply::Error(StanzaError::Forbidden(Some(
                "push notifications are configured on one's own account".into(),
            )));
        }
        let Some(el) = iq.payload() else {
            return IqReply::Error(StanzaError::BadRequest(None));
        };
        match (el.name(), iq.type_()) {
            ("enable", "set") => enable(host, &owner, el).await,
            ("disable", "set") => disable(host, &owner, el).await,
            _ => bad("expected an iq set with <enable/> or <disable/>"),
        }
    }
}

// --- Queueing ---------------------------------------------------------------------------

/// What a message adds to a registration's row: one more in the count, the last sender and
/// body, and a notification owed no sooner than `due` (nor before the row's coalescing window,
/// backoff or lease ends).
fn add_message(old: Option<PushJob>, sender: &str, body: Option<&str>, due: u64) -> PushJob {
    let mut j = old.unwrap_or_default();
    j.count += 1;
    j.rev += 1;
    j.last_sender = Some(sender.to_string());
    j.last_body = body.map(str::to_string);
    let want = match (j.pending, j.due_micros) {
        (true, Some(d)) => d.min(due),
        _ => due,
    };
    if !j.pending {
        j.attempts = 0;
    }
    j.pending = true;
    j.due_micros = Some(want.max(j.not_before_micros));
    j
}

struct PushHook;

#[async_trait]
impl StanzaHook for PushHook {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, target: Target) -> Flow {
        let Some(owner) = crate::mam::archivable_for(host, st, target) else {
            return Flow::Pass;
        };
        let sender = st.from.to_bare();
        if sender == owner {
            return Flow::Pass;
        }
        let store = host.push();
        let regs = match store.registrations(&owner).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, %owner, "push: cannot read registrations; no notification");
                return Flow::Pass;
            }
        };
        if regs.is_empty() {
            return Flow::Pass;
        }
        let settings = &host.settings().push;
        let limit = Duration::from_millis(settings.inactive_unacked_ms);
        let wait = match reach(&host.resources(&owner), Instant::now(), limit, true) {
            Reach::Reachable => return Flow::Pass,
            Reach::Unreachable => Duration::ZERO,
            Reach::CheckIn(d) => d,
        };
        let due = crate::mam::now_micros().saturating_add(micros(wait));
        let body = if settings.include_body {
            st.el.get_child("body", ns::CLIENT).map(|b| b.text())
        } else {
            None
        };
        let sender = sender.to_string();
        for reg in regs {
            let key = PushKey {
                owner: owner.clone(),
                jid: reg.jid,
                node: reg.node,
            };
            let f = |old: Option<PushJob>| Some(add_message(old, &sender, body.as_deref(), due));
            if let Err(e) = store.update_job(&key, &f).await {
                tracing::warn!(error = %e, %owner, service = %key.jid, "push: cannot queue a notification");
            }
        }
        tracing::debug!(%owner, wait_ms = wait.as_millis() as u64, "push: notification queued");
        Flow::Pass
    }
}

/// A resource bound: the user is reachable, counts start again.
struct ResetOnBind;

#[async_trait]
impl SessionHook for ResetOnBind {
    async fn bound(&self, host: &dyn Host, full: &FullJid) {
        if let Err(e) = host.push().clear_jobs(&full.to_bare()).await {
            tracing::warn!(error = %e, user = %full.to_bare(), "push: cannot reset notification counts");
        }
    }
}

// --- Publishing -------------------------------------------------------------------------

fn field(var: &str, value: &str) -> Element {
    Element::builder("field", ns::DATA_FORMS)
        .attr(n("var"), var)
        .append(
            Element::builder("value", ns::DATA_FORMS)
                .append(value)
                .build(),
        )
        .build()
}

/// The publish iq of §7 for `job` (its `id` is replaced by [`Host::request`]).
pub fn publish_iq(owner: &BareJid, reg: &PushRegistration, job: &PushJob) -> Element {
    let mut form = Element::builder("x", ns::DATA_FORMS)
        .attr(n("type"), "submit")
        .append(field("FORM_TYPE", SUMMARY))
        .append(field("message-count", &job.count.to_string()));
    if let Some(s) = &job.last_sender {
        form = form.append(field("last-message-sender", s));
    }
    if let Some(b) = &job.last_body {
        form = form.append(field("last-message-body", b));
    }
    let notification = Element::builder("notification", NS)
        .append(form.build())
        .build();
    let publish = Element::builder("publish", PUBSUB)
        .attr(n("node"), reg.node.as_str())
        .append(
            Element::builder("item", PUBSUB)
                .append(notification)
                .build(),
        )
        .build();
    let mut pubsub = Element::builder("pubsub", PUBSUB).append(publish);
    match reg.options.as_deref().map(str::parse::<Element>) {
        Some(Ok(opts)) => {
            pubsub = pubsub.append(
                Element::builder("publish-options", PUBSUB)
                    .append(opts)
                    .build(),
            );
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, %owner, service = %reg.jid, "push: stored publish options unreadable; published without them");
        }
        None => {}
    }
    Element::builder("iq", ns::CLIENT)
        .attr(n("type"), "set")
        .attr(n("id"), "push")
        .attr(n("from"), owner.as_str())
        .attr(n("to"), reg.jid.as_str())
        .append(pubsub.build())
        .build()
}

/// What an app server's answer means for the registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (no answer, or a transient error).
    Retry(String),
    /// A permanent error: disable the registration (§7.1).
    Disable(String),
}

/// Classifies the answer to a publish (`None`: no answer in time).
pub fn classify(reply: Option<&Element>) -> Outcome {
    let Some(r) = reply else {
        return Outcome::Retry("timeout".into());
    };
    match r.attr("type") {
        Some("result") => Outcome::Delivered,
        Some("error") => {
            let err = r.get_child("error", ns::CLIENT);
            let typ = err.and_then(|e| e.attr("type")).unwrap_or("");
            let cond = err
                .and_then(|e| {
                    e.children()
                        .find(|c| c.ns() == ns::STANZAS && c.name() != "text")
                })
                .map_or("undefined-condition", |c| c.name())
                .to_string();
            if typ == "wait"
                || matches!(
                    cond.as_str(),
                    "remote-server-timeout" | "internal-server-error"
                )
            {
                Outcome::Retry(cond)
            } else {
                Outcome::Disable(cond)
            }
        }
        _ => Outcome::Retry("answer neither result nor error".into()),
    }
}

/// The wait before retry number `attempts` (1 for the first retry), in microseconds.
fn backoff(settings: &PushSettings, attempts: u32) -> u64 {
    let base = ms(settings.retry_base_ms);
    let factor = 1u64 << attempts.saturating_sub(1).min(40);
    base.saturating_mul(factor).min(ms(settings.retry_max_ms))
}

/// Publishes a leased row and records the outcome.
async fn publish(
    host: &dyn Host,
    key: &PushKey,
    reg: &PushRegistration,
    job: PushJob,
    settings: &PushSettings,
    dispatched: u64,
) {
    let mut shown = job.clone();
    if !settings.include_body {
        shown.last_body = None;
    }
    let iq = publish_iq(&key.owner, reg, &shown);
    let reply = host
        .request(iq, Duration::from_millis(settings.request_timeout_ms))
        .await;
    let now = crate::mam::now_micros().max(dispatched);
    let store = host.push();
    let owner = &key.owner;
    let service = &key.jid;
    let sent_rev = job.rev;
    let r = match classify(reply.as_ref()) {
        Outcome::Delivered => {
            tracing::debug!(%owner, %service, count = job.count, "push: notification delivered");
            let until = now.saturating_add(ms(settings.coalesce_window_ms));
            let f = |j: Option<PushJob>| {
                j.map(|mut j| {
                    j.attempts = 0;
                    j.not_before_micros = until;
                    j.pending = j.rev != sent_rev;
                    j.due_micros = j.pending.then_some(until);
                    j
                })
            };
            store.update_job(key, &f).await.map(|_| ())
        }
        Outcome::Retry(why) => {
            let attempts = job.attempts.saturating_add(1);
            if attempts >= settings.max_attempts {
                tracing::warn!(%owner, %service, attempts, reason = %why, "push: giving up on a notification");
                let f = |j: Option<PushJob>| {
                    j.map(|mut j| {
                        j.pending = false;
                        j.due_micros = None;
                        j.attempts = 0;
                        // The next message may notify at once.
                        j.not_before_micros = now;
                        j
                    })
                };
                store.update_job(key, &f).await.map(|_| ())
            } else {
                let at = now.saturating_add(backoff(settings, attempts));
                tracing::info!(%owner, %service, attempts, reason = %why, retry_in_ms = (at - now) / 1000, "push: publish failed; will retry");
                let f = |j: Option<PushJob>| {
                    j.map(|mut j| {
                        j.attempts = attempts;
                        j.not_before_micros = at;
                        j.pending = true;
                        j.due_micros = Some(at);
                        j
                    })
                };
                store.update_job(key, &f).await.map(|_| ())
            }
        }
        Outcome::Disable(condition) => {
            tracing::info!(%owner, %service, %condition, "push: app server refused; registration disabled");
            store
                .remove_registrations(owner, service, Some(&key.node))
                .await
                .map(|_| ())
        }
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, %owner, %service, "push: cannot record a publish outcome");
    }
}

/// One pass over the rows due at `now` (microseconds): each is dropped (the user is reachable,
/// or the registration is gone), rescheduled (inactive streams to check again), or leased and
/// published in a task added to `sends`. Returns how many rows were due (at most [`BATCH`]).
pub async fn pass(
    host: &Arc<dyn Host>,
    limit: &Arc<Semaphore>,
    sends: &mut JoinSet<()>,
    now: u64,
) -> crate::host::StoreResult<usize> {
    let store = host.push();
    let due = store.due_jobs(now, BATCH).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let mut leased_rows = Vec::new();
    let settings = host.settings().push.clone();
    let unacked = Duration::from_millis(settings.inactive_unacked_ms);
    for (key, job) in &due {
        let reg = store
            .registrations(&key.owner)
            .await?
            .into_iter()
            .find(|r| r.jid == key.jid && r.node == key.node);
        let Some(reg) = reg else {
            store.update_job(key, &|_| None).await?;
            continue;
        };
        if !job.pending {
            store
                .update_job(key, &|j| {
                    j.map(|mut j| {
                        if !j.pending {
                            j.due_micros = None;
                        }
                        j
                    })
                })
                .await?;
            continue;
        }
        match reach(&host.resources(&key.owner), Instant::now(), unacked, false) {
            Reach::Reachable => {
                let rev = job.rev;
                store
                    .update_job(key, &|j| j.filter(|j| j.rev != rev))
                    .await?;
                tracing::debug!(owner = %key.owner, "push: user reachable; notification dropped");
            }
            Reach::CheckIn(d) => {
                let at = now.saturating_add(micros(d));
                store
                    .update_job(key, &|j| {
                        j.map(|mut j| {
                            if j.pending {
                                j.due_micros = Some(at.max(j.not_before_micros));
                            }
                            j
                        })
                    })
                    .await?;
            }
            Reach::Unreachable => {
                let lease = now
                    .saturating_add(ms(settings.request_timeout_ms))
                    .saturating_add(1_000_000);
                let leased = store
                    .update_job(key, &|j| {
                        j.map(|mut j| {
                            if j.pending {
                                j.due_micros = Some(lease);
                                j.not_before_micros = lease;
                            }
                            j
                        })
                    })
                    .await?;
                let Some(leased) = leased.filter(|j| j.pending) else {
                    continue;
                };
                leased_rows.push((key.clone(), reg, leased));
            }
        }
    }
    if leased_rows.is_empty() {
        return Ok(due.len());
    }
    // The rows and their leases are on disk before anything is published (one group commit
    // for the pass): after a crash a notification is published again once its lease ends, never
    // forgotten, and not at once either.
    if let Err(e) = host.durable().await {
        tracing::warn!(error = %e, "push: flush before publishing failed");
    }
    for (key, reg, leased) in leased_rows {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            // Never closed; the lease makes the row come back anyway.
            continue;
        };
        let host = host.clone();
        let settings = settings.clone();
        sends.spawn(async move {
            let _permit = permit;
            publish(host.as_ref(), &key, &reg, leased, &settings, now).await;
        });
    }
    Ok(due.len())
}

/// Drains the notification queue for the server's lifetime: what is due now, then sleeps until
/// the next row is due or a message queues one ([`crate::host::PushStore::wakeup`]). Rows a
/// previous run left (after a restart or a crash) are picked up by the first pass.
pub async fn worker(host: Arc<dyn Host>) {
    let limit = Arc::new(Semaphore::new(host.settings().push.max_in_flight.max(1)));
    let mut sends = JoinSet::new();
    loop {
        while sends.try_join_next().is_some() {}
        let store = host.push();
        // Taken before the pass, so a wake-up during it is not lost.
        let woken = store.wakeup().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match pass(&host, &limit, &mut sends, crate::mam::now_micros()).await {
            Ok(n) if n >= BATCH => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "push: queue pass failed; retrying in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        let wait = match store.next_due().await {
            Ok(Some(t)) => Duration::from_micros(t.saturating_sub(crate::mam::now_micros())),
            Ok(None) => Duration::from_secs(3600),
            Err(e) => {
                tracing::warn!(error = %e, "push: cannot read the queue");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = &mut woken => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0357");
    reg.message_hook(HOOK_PRIORITY, Arc::new(PushHook));
    reg.iq(IqScope::Account, NS, Arc::new(PushIq));
    reg.session_hook(Arc::new(ResetOnBind));
    reg.account_feature(NS);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::PushStore;
    use crate::testing::{bare, full, xml, TestHost};

    const OPTS: &str = "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>s3cret</value></field></x>";

    fn host() -> Arc<TestHost> {
        let mut h = TestHost::with_modules(
            &["a", "b"],
            &[crate::roster::register, crate::presence::register, register],
        );
        h.settings.push.coalesce_window_ms = 5_000;
        Arc::new(h)
    }

    fn ok(r: IqReply) {
        assert!(matches!(r, IqReply::Result(None)), "{r:?}");
    }

    fn err(r: IqReply) -> &'static str {
        match r {
            IqReply::Error(e) => e.condition(),
            r => panic!("expected an error, got {r:?}"),
        }
    }

    /// Issue 7: a push service JID not stable under preparation is jid-malformed.
    #[tokio::test]
    async fn enable_with_an_unstable_jid_is_jid_malformed() {
        let h = host();
        h.bind("b/r");
        let r = h
            .iq(
                "b/r",
                "<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='\u{213b}@example.org' node='n'/></iq>",
            )
            .await;
        assert_eq!(err(r), "jid-malformed");
    }

    async fn enable_app(h: &TestHost, node: &str) {
        ok(h.iq(
            "b/r",
            &format!("<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='app.example.org' node='{node}'>{OPTS}</enable></iq>"),
        )
        .await);
    }

    async fn regs(h: &TestHost, user: &str) -> Vec<PushRegistration> {
        h.push.registrations(&bare(user)).await.unwrap()
    }

    fn job(h: &TestHost, node: &str) -> Option<PushJob> {
        let key = PushKey {
            owner: bare("b"),
            jid: "app.example.org".into(),
            node: node.into(),
        };
        h.push.jobs.lock().unwrap().get(&key).cloned()
    }

    async fn chat(h: &TestHost, body: &str) {
        h.message(
            "a/r",
            &format!("<message to='b' type='chat'><body>{body}</body></message>"),
        )
        .await;
    }

    /// Runs one worker pass at `now` and waits for its publishes.
    async fn run(h: &Arc<TestHost>, now: u64) -> usize {
        let dyn_host: Arc<dyn Host> = h.clone();
        let mut sends = JoinSet::new();
        let n = pass(&dyn_host, &Arc::new(Semaphore::new(8)), &mut sends, now)
            .await
            .unwrap();
        while sends.join_next().await.is_some() {}
        n
    }

    fn published(h: &TestHost) -> Vec<Element> {
        std::mem::take(&mut *h.requests.lock().unwrap())
    }

    fn summary_field(iq: &Element, var: &str) -> Option<String> {
        iq.get_child("pubsub", PUBSUB)?
            .get_child("publish", PUBSUB)?
            .get_child("item", PUBSUB)?
            .get_child("notification", NS)?
            .get_child("x", ns::DATA_FORMS)?
            .children()
            .find(|f| f.attr("var") == Some(var))
            .and_then(|f| f.get_child("value", ns::DATA_FORMS))
            .map(|v| v.text())
    }

    fn reply(typ: &str, inner: &str) -> Option<Element> {
        Some(xml(&format!(
            "<iq type='{typ}' from='app.example.org'>{inner}</iq>"
        )))
    }

    fn now() -> u64 {
        crate::mam::now_micros()
    }

    #[tokio::test]
    async fn enable_replace_disable_and_errors() {
        let h = host();
        assert!(h.registry().account_features().any(|f| f == NS));
        enable_app(&h, "n1").await;
        enable_app(&h, "n1").await;
        ok(h.iq("b/r", "<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='App.Example.org' node='n2'/></iq>").await);
        let r = regs(&h, "b").await;
        assert_eq!(r.len(), 2, "same jid and node replaced: {r:?}");
        assert_eq!(
            r[0].options.as_deref(),
            Some(String::from(&xml(OPTS)).as_str())
        );
        assert_eq!(
            (r[1].jid.as_str(), r[1].options.as_ref()),
            ("app.example.org", None)
        );

        for (bad_iq, cond) in [
            ("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' node='n'/></iq>", "bad-request"),
            ("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' jid='app'/></iq>", "bad-request"),
            ("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' jid='@@' node='n'/></iq>", "jid-malformed"),
            ("<iq type='set' id='x'><enable xmlns='urn:xmpp:push:0' jid='app' node='n'><x xmlns='jabber:x:data'><field var='FORM_TYPE'><value>urn:other</value></field></x></enable></iq>", "bad-request"),
            ("<iq type='get' id='x'><enable xmlns='urn:xmpp:push:0' jid='app' node='n'/></iq>", "bad-request"),
            ("<iq type='set' id='x' to='a'><enable xmlns='urn:xmpp:push:0' jid='app' node='n'/></iq>", "forbidden"),
        ] {
            assert_eq!(err(h.iq("b/r", bad_iq).await), cond, "{bad_iq}");
        }
        assert_eq!(regs(&h, "b").await.len(), 2);
        assert!(regs(&h, "a").await.is_empty());

        // Disable one node, then every node of the service.
        ok(h.iq("b/r", "<iq type='set' id='d'><disable xmlns='urn:xmpp:push:0' jid='app.example.org' node='n2'/></iq>").await);
        assert_eq!(regs(&h, "b").await.len(), 1);
        enable_app(&h, "n3").await;
        ok(h.iq(
            "b/r",
            "<iq type='set' id='d'><disable xmlns='urn:xmpp:push:0' jid='app.example.org'/></iq>",
        )
        .await);
        assert!(regs(&h, "b").await.is_empty());
    }

    #[tokio::test]
    async fn registrations_are_limited() {
        let mut h = TestHost::with_modules(&["b"], &[register]);
        h.settings.push.max_registrations = 2;
        enable_app(&h, "n1").await;
        enable_app(&h, "n2").await;
        enable_app(&h, "n2").await;
        let r = h.iq("b/r", "<iq type='set' id='e'><enable xmlns='urn:xmpp:push:0' jid='app.example.org' node='n3'/></iq>").await;
        assert_eq!(err(r), "not-allowed");
    }

    #[test]
    fn reachability() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(10);
        let r = |hib: bool, inactive: bool, unacked: Option<Instant>| ResourceInfo {
            jid: full("b/r"),
            priority: 0,
            presence: None,
            roster_interested: false,
            carbons: false,
            hibernating: hib,
            inactive,
            unacked_since: unacked,
        };
        let later = t0 + Duration::from_secs(12);
        assert_eq!(reach(&[], t0, limit, true), Reach::Unreachable);
        assert_eq!(
            reach(&[r(true, false, None)], t0, limit, true),
            Reach::Unreachable
        );
        assert_eq!(
            reach(&[r(false, false, None)], t0, limit, true),
            Reach::Reachable
        );
        assert_eq!(
            reach(
                &[r(true, false, None), r(false, false, Some(t0))],
                later,
                limit,
                true
            ),
            Reach::Reachable,
            "an active stream gets it even with something unacked"
        );
        assert_eq!(
            reach(&[r(false, true, None)], t0, limit, true),
            Reach::CheckIn(limit)
        );
        assert_eq!(
            reach(&[r(false, true, None)], t0, limit, false),
            Reach::Reachable
        );
        assert_eq!(
            reach(
                &[r(false, true, Some(t0))],
                t0 + Duration::from_secs(4),
                limit,
                false
            ),
            Reach::CheckIn(Duration::from_secs(6))
        );
        assert_eq!(
            reach(&[r(false, true, Some(t0))], later, limit, false),
            Reach::Unreachable
        );
    }

    #[tokio::test]
    async fn burst_is_published_at_once_then_coalesced() {
        let h = host();
        enable_app(&h, "n1").await;
        chat(&h, "secret body").await;
        let t0 = now();
        assert_eq!(job(&h, "n1").unwrap().count, 1);

        h.request_replies
            .lock()
            .unwrap()
            .push_back(reply("result", ""));
        assert_eq!(run(&h, t0).await, 1);
        let p = published(&h);
        assert_eq!(p.len(), 1);
        let iq = &p[0];
        assert_eq!(iq.attr("from"), Some("b@example.com"));
        assert_eq!(iq.attr("to"), Some("app.example.org"));
        assert_eq!(iq.attr("type"), Some("set"));
        let publish = iq
            .get_child("pubsub", PUBSUB)
            .unwrap()
            .get_child("publish", PUBSUB)
            .unwrap();
        assert_eq!(publish.attr("node"), Some("n1"));
        assert_eq!(summary_field(iq, "FORM_TYPE").as_deref(), Some(SUMMARY));
        assert_eq!(summary_field(iq, "message-count").as_deref(), Some("1"));
        assert_eq!(
            summary_field(iq, "last-message-sender").as_deref(),
            Some("a@example.com")
        );
        assert_eq!(
            summary_field(iq, "last-message-body"),
            None,
            "no body by default"
        );
        assert!(!String::from(iq).contains("secret body"));
        let opts = iq
            .get_child("pubsub", PUBSUB)
            .unwrap()
            .get_child("publish-options", PUBSUB)
            .unwrap();
        assert_eq!(
            String::from(opts.get_child("x", ns::DATA_FORMS).unwrap()),
            String::from(&xml(OPTS))
        );
        let j = job(&h, "n1").unwrap();
        assert!(!j.pending && j.due_micros.is_none(), "{j:?}");

        // Three more within the window: one notification at its end, with the count then.
        for i in 0..3 {
            chat(&h, &format!("more {i}")).await;
        }
        let j = job(&h, "n1").unwrap();
        assert_eq!(j.count, 4);
        assert!(j.due_micros.unwrap() >= t0 + 5_000_000, "{j:?}");
        assert_eq!(
            run(&h, t0 + 1_000_000).await,
            0,
            "nothing before the window ends"
        );
        h.request_replies
            .lock()
            .unwrap()
            .push_back(reply("result", ""));
        assert_eq!(run(&h, t0 + 6_000_000).await, 1);
        let p = published(&h);
        assert_eq!(p.len(), 1);
        assert_eq!(summary_field(&p[0], "message-count").as_deref(), Some("4"));
        assert_eq!(run(&h, t0 + 60_000_000).await, 0, "nothing more");

        // Binding a resource starts the count again.
        h.bind("b/phone");
        for hook in h.registry().session_hooks() {
            hook.bound(h.as_ref(), &full("b/phone")).await;
        }
        assert!(job(&h, "n1").is_none());
    }

    #[tokio::test]
    async fn body_only_when_configured() {
        let mut h = TestHost::with_modules(&["a", "b"], &[register]);
        h.settings.push.include_body = true;
        let h = Arc::new(h);
        enable_app(&h, "n1").await;
        chat(&h, "hello there").await;
        h.request_replies
            .lock()
            .unwrap()
            .push_back(reply("result", ""));
        run(&h, now()).await;
        let p = published(&h);
        assert_eq!(
            summary_field(&p[0], "last-message-body").as_deref(),
            Some("hello there")
        );
    }

    #[tokio::test]
    async fn what_is_notified() {
        let h = host();
        enable_app(&h, "n1").await;
        // Not archivable: chat states, no-store, error, groupchat.
        for m in [
            "<message to='b' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message to='b' type='chat'><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b' type='groupchat'><body>x</body></message>",
        ] {
            h.message("a/r", m).await;
        }
        // One's own message to one's account.
        h.message(
            "b/other",
            "<message to='b' type='chat'><body>note</body></message>",
        )
        .await;
        assert!(job(&h, "n1").is_none());

        // An active stream: nothing.
        h.bind("b/r");
        chat(&h, "x").await;
        assert!(job(&h, "n1").is_none());
        // Hibernating: notified at once.
        h.with_session("b/r", |s| s.hibernating = true);
        chat(&h, "x").await;
        let j = job(&h, "n1").unwrap();
        assert!(j.pending && j.due_micros.unwrap() <= now());
        h.push.clear_jobs(&bare("b")).await.unwrap();

        // Inactive (CSI): checked again after the delay; the stream acked meanwhile: dropped.
        h.with_session("b/r", |s| {
            s.hibernating = false;
            s.inactive = true;
        });
        chat(&h, "x").await;
        let due = job(&h, "n1").unwrap().due_micros.unwrap();
        assert!(
            due >= now() + 9_000_000,
            "checked after inactive_unacked_ms"
        );
        assert_eq!(run(&h, due).await, 1);
        assert!(job(&h, "n1").is_none(), "nothing unacked: reachable");
        assert!(published(&h).is_empty());

        // Inactive with a stanza unacked for longer than the delay: published.
        chat(&h, "x").await;
        h.with_session("b/r", |s| {
            s.unacked_since = Some(Instant::now() - Duration::from_secs(11))
        });
        let due = job(&h, "n1").unwrap().due_micros.unwrap();
        h.request_replies
            .lock()
            .unwrap()
            .push_back(reply("result", ""));
        run(&h, due).await;
        assert_eq!(published(&h).len(), 1);

        // A stream went active before the row came due: dropped.
        h.push.clear_jobs(&bare("b")).await.unwrap();
        h.with_session("b/r", |s| s.hibernating = true);
        chat(&h, "x").await;
        h.with_session("b/r", |s| s.hibernating = false);
        h.with_session("b/r", |s| s.inactive = false);
        run(&h, now() + 1).await;
        assert!(published(&h).is_empty());
        assert!(job(&h, "n1").is_none());
    }

    #[tokio::test]
    async fn permanent_errors_disable_the_registration() {
        for cond in [
            "item-not-found",
            "not-authorized",
            "forbidden",
            "service-unavailable",
        ] {
            let h = host();
            enable_app(&h, "n1").await;
            enable_app(&h, "n2").await;
            chat(&h, "x").await;
            let typ = if cond == "not-authorized" || cond == "forbidden" {
                "auth"
            } else {
                "cancel"
            };
            let e = format!(
                "<error type='{typ}'><{cond} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
            );
            // n1 fails, n2 succeeds (rows are handled in key order).
            h.request_replies
                .lock()
                .unwrap()
                .push_back(reply("error", &e));
            h.request_replies
                .lock()
                .unwrap()
                .push_back(reply("result", ""));
            run(&h, now()).await;
            let left: Vec<String> = regs(&h, "b").await.into_iter().map(|r| r.node).collect();
            assert_eq!(left, vec!["n2".to_string()], "{cond}");
            assert!(job(&h, "n1").is_none());
            chat(&h, "y").await;
            assert!(
                job(&h, "n1").is_none(),
                "nothing queued for a disabled registration"
            );
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_with_backoff() {
        let mut h = TestHost::with_modules(&["a", "b"], &[register]);
        h.settings.push.retry_base_ms = 1_000;
        h.settings.push.retry_max_ms = 3_000;
        h.settings.push.max_attempts = 5;
        let h = Arc::new(h);
        enable_app(&h, "n1").await;
        chat(&h, "x").await;
        let wait = "<error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>";
        let mut t = now();
        let mut delays = Vec::new();
        for answer in [None, reply("error", wait), None, None] {
            h.request_replies.lock().unwrap().push_back(answer);
            assert_eq!(run(&h, t).await, 1);
            let j = job(&h, "n1").unwrap();
            assert!(j.pending);
            let due = j.due_micros.unwrap();
            delays.push((due - t + 500_000) / 1_000_000);
            assert_eq!(run(&h, due - 1).await, 0, "not before the backoff ends");
            t = due;
        }
        assert_eq!(delays, vec![1, 2, 3, 3], "doubling, capped");
        assert_eq!(published(&h).len(), 4);
        assert_eq!(regs(&h, "b").await.len(), 1, "still enabled");
        // The fifth failure gives up on this notification, not on the registration.
        h.request_replies.lock().unwrap().push_back(None);
        run(&h, t).await;
        let j = job(&h, "n1").unwrap();
        assert!(!j.pending && j.due_micros.is_none());
        assert_eq!(regs(&h, "b").await.len(), 1);

        // A retry that then succeeds.
        chat(&h, "again").await;
        h.request_replies.lock().unwrap().push_back(None);
        h.request_replies
            .lock()
            .unwrap()
            .push_back(reply("result", ""));
        let t = job(&h, "n1").unwrap().due_micros.unwrap();
        run(&h, t).await;
        let due = job(&h, "n1").unwrap().due_micros.unwrap();
        run(&h, due).await;
        let p = published(&h);
        assert_eq!(p.len(), 3);
        assert_eq!(summary_field(&p[2], "message-count").as_deref(), Some("2"));
        assert!(!job(&h, "n1").unwrap().pending);
    }

    #[tokio::test]
    async fn a_message_during_a_publish_is_sent_after_the_window() {
        let h = host();
        enable_app(&h, "n1").await;
        chat(&h, "x").await;
        // The lease keeps a second pass from publishing the row again while it is in flight.
        let dyn_host: Arc<dyn Host> = h.clone();
        let t0 = now();
        let key = PushKey {
            owner: bare("b"),
            jid: "app.example.org".into(),
            node: "n1".into(),
        };
        let lease_due = {
            let mut sends = JoinSet::new();
            // The test runtime is single-threaded: the spawned publish runs only once the test
            // awaits the set, so the row can be looked at while the publish is "in flight".
            h.request_replies
                .lock()
                .unwrap()
                .push_back(reply("result", ""));
            pass(&dyn_host, &Arc::new(Semaphore::new(1)), &mut sends, t0)
                .await
                .unwrap();
            let leased = h.push.jobs.lock().unwrap().get(&key).cloned().unwrap();
            // A message arrives while the publish is in flight.
            chat(&h, "y").await;
            while sends.join_next().await.is_some() {}
            leased.due_micros.unwrap()
        };
        assert!(lease_due >= t0 + 30_000_000);
        let j = job(&h, "n1").unwrap();
        assert!(j.pending, "the newer message is still owed");
        assert!(j.due_micros.unwrap() >= t0 + 5_000_000, "after the window");
        assert_eq!(published(&h).len(), 1);
    }
}
