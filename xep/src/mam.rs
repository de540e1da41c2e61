//! XEP-0313: Message Archive Management (`urn:xmpp:mam:2` and `urn:xmpp:mam:2#extended`), with
//! the XEP-0359 stanza-ids it hands out and the XEP-0334 storage hints it obeys.
//!
//! - Archiving (a message hook that never consumes the stanza): a `chat` or `normal` message from a
//!   local user's session to a local account (or with no `to`: the sender's own account) is stored
//!   in the sender's archive and, when the recipient account exists, in the recipient's — also
//!   when the recipient is offline, since the hook runs before delivery and offline storage. A
//!   message to oneself is stored once. Archived are messages with a `<body/>`, an encrypted
//!   payload (OMEMO, legacy OMEMO, OpenPGP for XMPP, legacy OpenPGP), a retraction (XEP-0424 or a
//!   XEP-0422 fastening) or a correction (XEP-0308); and any other message carrying a XEP-0334
//!   `<store/>` hint, except one that holds only chat states (XEP-0085), receipts (XEP-0184) or
//!   chat markers (XEP-0333), or nothing else at all. Halyard decision: such state-only messages
//!   are never archived, even with `<store/>` (XEP-0313 §3: archives hold "meaningful content,
//!   rather than state changes").
//!   `<no-store/>` and `<no-permanent-store/>` always prevent archiving. Each owner's XEP-0313
//!   preferences apply (`default` always/roster/never, where `roster` means the other party is in
//!   the owner's roster; JIDs in `never` win over `always`; one's own messages count as in the
//!   roster). Archiving never waits for disk ([`Host::durable`]) and a store failure is logged,
//!   never fatal to the message.
//! - XEP-0359: every `<stanza-id xmlns='urn:xmpp:sid:0'/>` claimed `by` the sender's or the
//!   recipient's bare JID or by a served domain is removed from such messages (archived or not)
//!   so a client cannot inject ids in our name; `<origin-id/>` and foreign stanza-ids are kept.
//!   The recipient's archive id is added to the delivered copy as a stanza-id `by` the
//!   recipient's bare JID; the sender's own id is not (XEP-0313 §3.5: never in messages to JIDs
//!   that cannot read the archive). The archived copy is the stanza as the hooks received it,
//!   without our stanza-id.
//! - Queries (iq set `<query/>`, only by the archive's owner, else `forbidden`): the `with` (bare
//!   or full JID; one's own JID finds messages to oneself), `start`, `end` (XEP-0082, inclusive),
//!   `before-id`, `after-id` and `ids` fields; XEP-0059 paging with `max` (default and ceiling
//!   from `[archive]` settings), `after`, `before` and empty `<before/>` for the last page;
//!   `<flip-page/>`. Unknown ids (form or RSM) give `item-not-found`, a malformed date
//!   `bad-request`, an unknown field or RSM `<index/>` `feature-not-implemented`. Results are
//!   pushed before the `<fin/>`, which carries `complete`, RSM `first`/`last`, `count` when the
//!   store knows it cheaply (no filter, a bare `with`, or `ids`) and `first@index` when it is
//!   known. Ids are stable, so no `stable` attribute is sent. The query semantics live here once,
//!   over [`ArchiveStore`](crate::host::ArchiveStore)'s ordered-index primitives, so every
//!   backend answers alike: each page is one range scan of `max + 1` items (`O(log n + page)`),
//!   except that a full-JID `with` filters the contact's scan by resource.
//! - The query form (iq get `<query/>`, §4.1.5), archive metadata (iq get `<metadata/>`, §5:
//!   first and last message, empty when the archive is) and preferences (iq get/set `<prefs/>`,
//!   XEP-0441's format in `urn:xmpp:mam:2`; `always` for a user who never set any).
//!
//! Not supported: `include-groupchat` (no MUC archive), XEP-0442 pubsub archives (`node`).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use crate::datetime::{format_datetime, parse_datetime};
use crate::host::{ArchiveKey, ArchivePrefs, ArchivedMessage, Host, KeyRange};
use crate::ns;
use crate::rate::Windows;
use crate::registry::{Flow, IqHandler, IqReply, IqScope, Registry, StanzaHook, Target};
use crate::stanza::{n, Kind, Stanza, StanzaError};

pub const NS: &str = "urn:xmpp:mam:2";
pub const NS_EXTENDED: &str = "urn:xmpp:mam:2#extended";
pub const SID: &str = "urn:xmpp:sid:0";
pub const RSM: &str = "http://jabber.org/protocol/rsm";
pub const FORWARD: &str = "urn:xmpp:forward:0";
pub const HINTS: &str = "urn:xmpp:hints";
const XDATA_VALIDATE: &str = "http://jabber.org/protocol/xdata-validate";

/// The archiving hook's priority: above filtering and delivery modules (offline storage, carbons),
/// so that they see the stanza-id it adds.
pub const HOOK_PRIORITY: i32 = 100;

/// Payloads that make a message worth archiving on their own.
const CONTENT: &[(&str, &str)] = &[
    ("body", ns::CLIENT),
    ("encrypted", "urn:xmpp:omemo:2"),
    ("encrypted", "eu.siacs.conversations.axolotl"),
    ("openpgp", "urn:xmpp:openpgp:0"),
    ("x", "jabber:x:encrypted"),
    ("retract", "urn:xmpp:message-retract:1"),
    ("apply-to", "urn:xmpp:fasten:0"),
    ("replace", "urn:xmpp:message-correct:0"),
];

/// Namespaces of payloads that only signal state (or address the stanza itself): a message made
/// of these alone is not archived, even with a `<store/>` hint.
const STATE_ONLY: &[&str] = &[
    "http://jabber.org/protocol/chatstates",
    "urn:xmpp:receipts",
    "urn:xmpp:chat-markers:0",
    HINTS,
    SID,
];

/// Whether a message is worth archiving (see the module documentation): type, payload and
/// XEP-0334 hints. The owners' preferences are checked separately.
pub fn is_archivable(st: &Stanza) -> bool {
    if st.kind != Kind::Message || !matches!(st.type_(), "chat" | "normal") {
        return false;
    }
    let el = &st.el;
    if el.has_child("no-store", HINTS) || el.has_child("no-permanent-store", HINTS) {
        return false;
    }
    if el
        .children()
        .any(|c| CONTENT.iter().any(|(name, ns)| c.is(*name, *ns)))
    {
        return true;
    }
    el.has_child("store", HINTS)
        && el
            .children()
            .any(|c| !STATE_ONLY.contains(&c.ns().as_str()) && !c.is("thread", ns::CLIENT))
}

/// Now, in microseconds since the Unix epoch, never earlier than a previous call in this process
/// (so a clock stepping back cannot reorder the archive; equal stamps are ordered by the store).
pub fn now_micros() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    LAST.fetch_max(now, Ordering::Relaxed).max(now)
}

/// An unpredictable id for generated stanzas.
fn random_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", h.finish())
}

// --- Archiving --------------------------------------------------------------------------

/// Removes the `<stanza-id/>`s a client may not set: those claimed by the sender's or the
/// recipient's account or by a domain this server serves (XEP-0359 §3 rule 2).
fn strip_our_stanza_ids(host: &dyn Host, el: &mut Element, sender: &BareJid, recipient: &BareJid) {
    let ours = |c: &Element| {
        c.is("stanza-id", SID)
            // Lenient on purpose: this only decides what to strip, and a `by` that merely
            // prepares to one of ours is stripped too.
            && c.attr("by")
                .and_then(|by| Jid::new(by).ok())
                .is_some_and(|by| {
                    by == *sender
                        || by == *recipient
                        || (by.node().is_none() && host.is_local_domain(by.domain().as_str()))
                })
    };
    crate::stanza::remove_children(el, ours);
}

/// Whether `owner`'s preferences let a message exchanged with `other` (bare; `other_full` when the
/// stanza named a resource) into `owner`'s archive.
async fn wants(host: &dyn Host, owner: &BareJid, other: &BareJid, other_full: &Jid) -> bool {
    let prefs = match host.archive().prefs(owner).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, %owner, "mam: cannot read preferences; not archiving");
            return false;
        }
    };
    let listed = |list: &[String]| {
        list.iter()
            .any(|j| j == other.as_str() || j == other_full.as_str())
    };
    if listed(&prefs.never) {
        return false;
    }
    if listed(&prefs.always) {
        return true;
    }
    match prefs.default.as_str() {
        "never" => false,
        "roster" if owner == other => true,
        "roster" => match host.roster().item(owner, other).await {
            Ok(item) => item.is_some_and(|i| i.in_roster),
            Err(e) => {
                tracing::warn!(error = %e, %owner, "mam: roster lookup failed; not archiving");
                false
            }
        },
        _ => true,
    }
}

async fn append(
    host: &dyn Host,
    owner: &BareJid,
    with: &BareJid,
    ts: u64,
    stanza: &str,
) -> Option<String> {
    match host
        .archive()
        .append(owner, &Jid::from(with.clone()), ts, stanza)
        .await
    {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(error = %e, %owner, "mam: archiving failed; the message is delivered anyway");
            None
        }
    }
}

/// The parties of a message the archive may keep: the sender's full JID and the recipient as
/// addressed, when a local user's session sends it to a local account (or, without `to`, to its
/// own account). `None` for anything else, which is never archived.
fn parties(host: &dyn Host, st: &Stanza, target: Target) -> Option<(Jid, Jid)> {
    if target == Target::Host || st.kind != Kind::Message {
        return None;
    }
    let sender_full = st.from.try_as_full().ok()?;
    if !host.is_local_domain(sender_full.domain().as_str()) {
        return None;
    }
    let sender_full: Jid = sender_full.clone().into();
    let recipient_jid: Jid = st
        .to
        .clone()
        .unwrap_or_else(|| sender_full.to_bare().into());
    if recipient_jid.node().is_none() || !host.is_local_domain(recipient_jid.domain().as_str()) {
        return None;
    }
    Some((sender_full, recipient_jid))
}

/// The recipient account whose archive this message belongs in by the archive's own rules
/// (parties, type, payload and hints), whether or not archiving is enabled in the configuration
/// and whatever the owners' preferences say. Other modules (push notifications) use it to ask
/// "is this a message worth keeping" the same way the archive does.
pub fn archivable_for(host: &dyn Host, st: &Stanza, target: Target) -> Option<BareJid> {
    let (_, recipient) = parties(host, st, target)?;
    is_archivable(st).then(|| recipient.to_bare())
}

struct ArchiveHook;

#[async_trait]
impl StanzaHook for ArchiveHook {
    async fn handle(&self, host: &dyn Host, st: &mut Stanza, target: Target) -> Flow {
        let Some((sender_full, recipient_jid)) = parties(host, st, target) else {
            return Flow::Pass;
        };
        let sender = sender_full.to_bare();
        let recipient = recipient_jid.to_bare();
        strip_our_stanza_ids(host, &mut st.el, &sender, &recipient);
        if !host.settings().archive.enabled || !is_archivable(st) {
            return Flow::Pass;
        }
        let stanza = String::from(&st.el);
        let ts = now_micros();
        let recipient_exists = match host.account_exists(&recipient).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "mam: account lookup failed");
                false
            }
        };
        let mut recipient_id = None;
        if recipient_exists && wants(host, &recipient, &sender, &sender_full).await {
            recipient_id = append(host, &recipient, &sender, ts, &stanza).await;
        }
        // A message to oneself is stored once (XEP-0313 §6.1.1), in the archive above.
        let mut sender_id = None;
        if sender != recipient && wants(host, &sender, &recipient, &recipient_jid).await {
            sender_id = append(host, &sender, &recipient, ts, &stanza).await;
        }
        for (id, by) in [(recipient_id, &recipient), (sender_id, &sender)] {
            if let Some(id) = id {
                st.el.append_child(
                    Element::builder("stanza-id", SID)
                        .attr(n("id"), id)
                        .attr(n("by"), by.to_string())
                        .build(),
                );
            }
        }
        Flow::Pass
    }
}

/// Removes the sender's archive id before the message leaves for the recipient (XEP-0313 §3.5:
/// ids only for those who can read the archive). It rides along until here so that the
/// sender's carbon copies (XEP-0280, priority 50) carry it, as §3.5 recommends.
struct HideSenderId;

/// Below carbons (50), above offline storage (10) and delivery.
pub const HIDE_SENDER_ID_PRIORITY: i32 = 20;

#[async_trait]
impl StanzaHook for HideSenderId {
    async fn handle(&self, _host: &dyn Host, st: &mut Stanza, _target: Target) -> Flow {
        let sender = st.from.to_bare();
        let recipient = st.to.as_ref().map(|t| t.to_bare());
        if st.kind == Kind::Message && recipient.is_some_and(|r| r != sender) {
            crate::stanza::remove_children(&mut st.el, |c| {
                c.is("stanza-id", SID) && c.attr("by") == Some(sender.as_str())
            });
        }
        Flow::Pass
    }
}

// --- Queries ----------------------------------------------------------------------------

/// An archive query: the form's filters and the RSM window (XEP-0313 §4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Messages exchanged with this JID; with a resource, only those to or from that resource.
    pub with: Option<Jid>,
    /// Inclusive bounds, microseconds since the epoch (negative: before 1970).
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// Exclusive bounds by archive id (`after-id`, `before-id`).
    pub after_id: Option<String>,
    pub before_id: Option<String>,
    /// Only these messages (`ids`).
    pub ids: Option<Vec<String>>,
    /// RSM `<max/>`; the configured default when absent, clamped to the configured ceiling.
    pub max: Option<usize>,
    /// RSM `<after/>`.
    pub after: Option<String>,
    /// RSM `<before/>`: pages backwards from this id, or from the end when empty.
    pub before: Option<String>,
    /// `<flip-page/>`: only the transmission order changes; [`Page::items`] stays chronological.
    pub flip: bool,
}

/// One page of results.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Chronological order.
    pub items: Vec<(ArchiveKey, ArchivedMessage)>,
    /// No further page in the paging direction.
    pub complete: bool,
    /// Size of the whole result set, when it is known cheaply.
    pub count: Option<u64>,
    /// Position of the first item in the whole result set, when known.
    pub first_index: Option<u64>,
}

fn store_failed(e: impl std::fmt::Display) -> StanzaError {
    tracing::warn!(error = %e, "mam: archive store failed");
    StanzaError::InternalServerError(None)
}

fn tighten_after(range: &mut KeyRange, k: ArchiveKey) {
    range.after = Some(range.after.map_or(k, |a| a.max(k)));
}

fn tighten_before(range: &mut KeyRange, k: ArchiveKey) {
    range.before = Some(range.before.map_or(k, |b| b.min(k)));
}

fn in_range(k: ArchiveKey, r: &KeyRange) -> bool {
    r.after.is_none_or(|a| k > a) && r.before.is_none_or(|b| k < b)
}

fn is_empty(r: &KeyRange) -> bool {
    matches!((r.after, r.before), (Some(a), Some(b)) if a >= b)
}

/// Whether an archived message was sent to or by exactly `full`.
fn involves(m: &ArchivedMessage, full: &FullJid) -> bool {
    let Ok(el) = m.stanza.parse::<Element>() else {
        return false;
    };
    // An archived stanza: its addresses were checked when it was routed.
    ["from", "to"].iter().any(|a| {
        el.attr(*a)
            .and_then(|v| Jid::new(v).ok())
            .is_some_and(|j| j == *full)
    })
}

/// The key of archive id `id`, or `item-not-found` (XEP-0313 §4.1.3, §4.3.2).
async fn locate(host: &dyn Host, owner: &BareJid, id: &str) -> Result<ArchiveKey, StanzaError> {
    host.archive()
        .locate(owner, id)
        .await
        .map_err(store_failed)?
        .ok_or_else(|| StanzaError::ItemNotFound(Some(format!("no message {id} in the archive"))))
}

/// Runs `q` against `owner`'s archive: the XEP-0313 filters and XEP-0059 paging over
/// [`crate::host::ArchiveStore`]'s primitives, identical for every backend.
pub async fn run_query(host: &dyn Host, owner: &BareJid, q: &Query) -> Result<Page, StanzaError> {
    let settings = &host.settings().archive;
    let max = q
        .max
        .unwrap_or(settings.default_page)
        .min(settings.max_page);
    let store = host.archive();
    let reverse = q.before.is_some();

    // The result set's bounds (the form), then the page's (RSM) within them.
    let mut filter = KeyRange::default();
    if let Some(s) = q.start.filter(|s| *s > 0) {
        filter.after = Some(ArchiveKey {
            ts_micros: s as u64 - 1,
            seq: u64::MAX,
        });
    }
    if let Some(e) = q.end {
        let bound = match u64::try_from(e) {
            Ok(e) => e.checked_add(1).map(|ts| ArchiveKey {
                ts_micros: ts,
                seq: 0,
            }),
            Err(_) => Some(ArchiveKey {
                ts_micros: 0,
                seq: 0,
            }),
        };
        filter.before = bound;
    }
    if let Some(id) = &q.after_id {
        tighten_after(&mut filter, locate(host, owner, id).await?);
    }
    if let Some(id) = &q.before_id {
        tighten_before(&mut filter, locate(host, owner, id).await?);
    }
    let mut window = filter;
    if let Some(id) = &q.after {
        tighten_after(&mut window, locate(host, owner, id).await?);
    }
    if let Some(id) = q.before.as_deref().filter(|id| !id.is_empty()) {
        tighten_before(&mut window, locate(host, owner, id).await?);
    }
    let bare_with = q.with.as_ref().map(Jid::to_bare);
    let full_with = q.with.as_ref().and_then(|j| j.try_as_full().ok());

    if let Some(ids) = &q.ids {
        // A bounded list: resolve it whole, so count and index are exact.
        let mut keys = Vec::with_capacity(ids.len());
        for id in ids {
            keys.push(locate(host, owner, id).await?);
        }
        keys.sort_unstable();
        keys.dedup();
        let mut all = Vec::new();
        for k in keys.into_iter().filter(|k| in_range(*k, &filter)) {
            let Some(m) = store.get(owner, k).await.map_err(store_failed)? else {
                continue;
            };
            if bare_with.as_ref().is_some_and(|w| m.with != w.as_str())
                || full_with.is_some_and(|f| !involves(&m, f))
            {
                continue;
            }
            all.push((k, m));
        }
        let count = all.len();
        let lo = all.partition_point(|(k, _)| window.after.is_some_and(|a| *k <= a));
        let hi = all.partition_point(|(k, _)| window.before.is_none_or(|b| *k < b));
        let hi = hi.max(lo);
        let (from, to, complete) = if reverse {
            let from = hi.saturating_sub(max).max(lo);
            (from, hi, from == lo)
        } else {
            let to = (lo + max).min(hi);
            (lo, to, to == hi)
        };
        return Ok(Page {
            first_index: (from < to).then_some(from as u64),
            items: all.drain(from..to).collect(),
            complete,
            count: Some(count as u64),
        });
    }

    // The count is a stored counter only for the whole archive or a bare contact.
    let count = if q.start.is_none()
        && q.end.is_none()
        && q.after_id.is_none()
        && q.before_id.is_none()
        && full_with.is_none()
    {
        Some(
            store
                .count(owner, bare_with.as_ref())
                .await
                .map_err(store_failed)?,
        )
    } else {
        None
    };

    // One scan of max + 1 (the extra one tells whether the page is the last); a full-JID `with`
    // filters the contact's scan and continues until the page is full or the range exhausted.
    let mut items = Vec::new();
    let mut cursor = window;
    let want = max + 1;
    while items.len() < want && !is_empty(&cursor) {
        let limit = if full_with.is_some() {
            want.max(32)
        } else {
            want - items.len()
        };
        let batch = store
            .scan(owner, bare_with.as_ref(), cursor, reverse, limit)
            .await
            .map_err(store_failed)?;
        let exhausted = batch.len() < limit;
        for (k, m) in batch {
            if reverse {
                cursor.before = Some(k);
            } else {
                cursor.after = Some(k);
            }
            if full_with.is_none_or(|f| involves(&m, f)) {
                items.push((k, m));
            }
        }
        if exhausted {
            break;
        }
    }
    let complete = items.len() <= max;
    items.truncate(max);
    if reverse {
        items.reverse();
    }
    // The page starts the result set / ends it (RSM bounds are not the result set's).
    let at_start = q.after.is_none() && (complete || !reverse);
    let at_end = if reverse {
        q.before.as_deref() == Some("") && q.after.is_none()
    } else {
        complete
    };
    let first_index = match (items.is_empty(), at_start, at_end, count) {
        (true, ..) => None,
        (false, true, ..) => Some(0),
        (false, false, true, Some(c)) => Some(c.saturating_sub(items.len() as u64)),
        _ => None,
    };
    Ok(Page {
        items,
        complete,
        count,
        first_index,
    })
}

/// The single value of a form field.
fn value(field: &Element) -> Option<String> {
    field
        .children()
        .find(|v| v.is("value", ns::DATA_FORMS))
        .map(|v| v.text())
        .filter(|v| !v.is_empty())
}

fn date(field: &Element, var: &str) -> Result<Option<i64>, StanzaError> {
    match value(field) {
        None => Ok(None),
        Some(v) => parse_datetime(v.trim()).map(Some).ok_or_else(|| {
            StanzaError::BadRequest(Some(format!("'{var}' is not an XEP-0082 DateTime")))
        }),
    }
}

/// Parses an iq set `<query/>` (form and RSM).
pub fn parse_query(query: &Element) -> Result<Query, StanzaError> {
    let mut q = Query::default();
    if query.attr("node").is_some() {
        return Err(StanzaError::FeatureNotImplemented(Some(
            "no pubsub archives".into(),
        )));
    }
    if let Some(x) = query.get_child("x", ns::DATA_FORMS) {
        if x.attr("type") != Some("submit") {
            return Err(StanzaError::BadRequest(Some(
                "the form must be of type 'submit'".into(),
            )));
        }
        for field in x.children().filter(|f| f.is("field", ns::DATA_FORMS)) {
            let var = field.attr("var").unwrap_or_default();
            match var {
                "FORM_TYPE" => {
                    if value(field).as_deref() != Some(NS) {
                        return Err(StanzaError::BadRequest(Some(format!(
                            "FORM_TYPE must be {NS}"
                        ))));
                    }
                }
                "with" => {
                    q.with = match value(field) {
                        None => None,
                        Some(v) => Some(
                            crate::stanza::parse_jid(v.trim())
                                .map_err(|e| StanzaError::JidMalformed(Some(e)))?,
                        ),
                    }
                }
                "start" => q.start = date(field, var)?,
                "end" => q.end = date(field, var)?,
                "after-id" => q.after_id = value(field),
                "before-id" => q.before_id = value(field),
                "ids" => {
                    let ids: Vec<String> = field
                        .children()
                        .filter(|v| v.is("value", ns::DATA_FORMS))
                        .map(|v| v.text())
                        .filter(|v| !v.is_empty())
                        .collect();
                    q.ids = (!ids.is_empty()).then_some(ids);
                }
                _ => {
                    return Err(StanzaError::FeatureNotImplemented(Some(format!(
                        "unsupported field '{var}'"
                    ))))
                }
            }
        }
    }
    if let Some(set) = query.get_child("set", RSM) {
        if set.has_child("index", RSM) {
            return Err(StanzaError::FeatureNotImplemented(Some(
                "RSM <index/> is not supported".into(),
            )));
        }
        if let Some(max) = set.get_child("max", RSM) {
            q.max =
                Some(max.text().trim().parse().map_err(|_| {
                    StanzaError::BadRequest(Some("RSM <max/> is not a number".into()))
                })?);
        }
        q.after = set
            .get_child("after", RSM)
            .map(Element::text)
            .filter(|a| !a.is_empty());
        q.before = set.get_child("before", RSM).map(Element::text);
    }
    q.flip = query.has_child("flip-page", NS);
    Ok(q)
}

/// One result as XML text: the stored stanza is embedded as stored, never parsed again (it was
/// serialised by us, so it is one well-formed element with its namespace declared). This keeps
/// a page of 50 well under a millisecond of XML work.
fn result_message(
    requester: &FullJid,
    owner: &BareJid,
    queryid: Option<&str>,
    m: &ArchivedMessage,
) -> String {
    use crate::stanza::escape;
    let qid = queryid
        .map(|q| format!(" queryid='{}'", escape(q)))
        .unwrap_or_default();
    format!(
        "<message xmlns='{client}' to='{to}' from='{from}' id='{id}'><result xmlns='{ns}' id='{rid}'{qid}>\
         <forwarded xmlns='{fwd}'><delay xmlns='{delay}' stamp='{stamp}'/>{stanza}</forwarded></result></message>",
        client = ns::CLIENT,
        to = escape(requester.as_str()),
        from = escape(owner.as_str()),
        id = random_id(),
        ns = NS,
        rid = escape(&m.id),
        fwd = FORWARD,
        delay = ns::DELAY,
        stamp = format_datetime(m.ts_micros),
        stanza = m.stanza,
    )
}

fn fin(page: &Page, queryid: Option<&str>) -> Element {
    let mut set = Element::builder("set", RSM);
    if let (Some((_, first)), Some((_, last))) = (page.items.first(), page.items.last()) {
        let mut f = Element::builder("first", RSM).append(first.id.as_str());
        if let Some(i) = page.first_index {
            f = f.attr(n("index"), i.to_string());
        }
        set = set.append(f.build()).append(
            Element::builder("last", RSM)
                .append(last.id.as_str())
                .build(),
        );
    }
    if let Some(c) = page.count {
        set = set.append(Element::builder("count", RSM).append(c.to_string()).build());
    }
    let mut b = Element::builder("fin", NS)
        .attr(n("complete"), if page.complete { "true" } else { "false" });
    if let Some(qid) = queryid {
        b = b.attr(n("queryid"), qid);
    }
    b.append(set.build()).build()
}

async fn query(host: &dyn Host, iq: &Stanza, owner: &BareJid, el: &Element) -> IqReply {
    let Ok(requester) = iq.from.try_as_full() else {
        return IqReply::Error(StanzaError::BadRequest(Some(
            "queries come from a session".into(),
        )));
    };
    let q = match parse_query(el) {
        Ok(q) => q,
        Err(e) => return IqReply::Error(e),
    };
    let page = match run_query(host, owner, &q).await {
        Ok(p) => p,
        Err(e) => return IqReply::Error(e),
    };
    let queryid = el.attr("queryid");
    let mut order: Vec<&ArchivedMessage> = page.items.iter().map(|(_, m)| m).collect();
    if q.flip {
        order.reverse();
    }
    // Every result goes out before the iq result that ends the query (§4).
    for m in order {
        if !host.deliver_raw(requester, result_message(requester, owner, queryid, m)) {
            return IqReply::Error(StanzaError::ResourceConstraint(Some(
                "results could not be queued".into(),
            )));
        }
    }
    IqReply::Result(Some(fin(&page, queryid)))
}

/// The query form (§4.1.5): the fields a query may use.
fn form() -> Element {
    let field = |var: &str, type_: &str| {
        Element::builder("field", ns::DATA_FORMS)
            .attr(n("var"), var)
            .attr(n("type"), type_)
    };
    let x = Element::builder("x", ns::DATA_FORMS)
        .attr(n("type"), "form")
        .append(
            field("FORM_TYPE", "hidden")
                .append(Element::builder("value", ns::DATA_FORMS).append(NS).build())
                .build(),
        )
        .append(field("with", "jid-single").build())
        .append(field("start", "text-single").build())
        .append(field("end", "text-single").build())
        .append(field("before-id", "text-single").build())
        .append(field("after-id", "text-single").build())
        .append(
            field("ids", "list-multi")
                .append(
                    Element::builder("validate", XDATA_VALIDATE)
                        .attr(n("datatype"), "xs:string")
                        .append(Element::bare("open", XDATA_VALIDATE))
                        .build(),
                )
                .build(),
        )
        .build();
    Element::builder("query", NS).append(x).build()
}

async fn metadata(host: &dyn Host, owner: &BareJid) -> IqReply {
    let mut b = Element::builder("metadata", NS);
    for (name, reverse) in [("start", false), ("end", true)] {
        match host
            .archive()
            .scan(owner, None, KeyRange::default(), reverse, 1)
            .await
        {
            Ok(v) => {
                if let Some((_, m)) = v.first() {
                    b = b.append(
                        Element::builder(name, NS)
                            .attr(n("id"), m.id.as_str())
                            .attr(n("timestamp"), format_datetime(m.ts_micros))
                            .build(),
                    );
                }
            }
            Err(e) => return IqReply::Error(store_failed(e)),
        }
    }
    IqReply::Result(Some(b.build()))
}

// --- Preferences --------------------------------------------------------------------------

fn prefs_element(p: &ArchivePrefs) -> Element {
    let list = |name: &str, jids: &[String]| {
        Element::builder(name, NS)
            .append_all(
                jids.iter()
                    .map(|j| Element::builder("jid", NS).append(j.as_str()).build()),
            )
            .build()
    };
    Element::builder("prefs", NS)
        .attr(n("default"), p.default.as_str())
        .append(list("always", &p.always))
        .append(list("never", &p.never))
        .build()
}

/// Parses an iq set `<prefs/>`: the default and the normalised, deduplicated JID lists.
pub fn parse_prefs(el: &Element) -> Result<ArchivePrefs, StanzaError> {
    let default = match el.attr("default") {
        Some(d @ ("always" | "roster" | "never")) => d.to_owned(),
        _ => {
            return Err(StanzaError::BadRequest(Some(
                "'default' must be always, roster or never".into(),
            )))
        }
    };
    let list = |name: &str| -> Result<Vec<String>, StanzaError> {
        let mut out: Vec<String> = Vec::new();
        for j in el
            .get_child(name, NS)
            .into_iter()
            .flat_map(|l| l.children().filter(|c| c.is("jid", NS)))
        {
            let jid = crate::stanza::parse_jid(j.text().trim())
                .map_err(|e| StanzaError::JidMalformed(Some(e)))?;
            if !out.iter().any(|o| o == jid.as_str()) {
                out.push(jid.to_string());
            }
        }
        Ok(out)
    };
    Ok(ArchivePrefs {
        default,
        always: list("always")?,
        never: list("never")?,
    })
}

async fn prefs(host: &dyn Host, iq: &Stanza, owner: &BareJid, el: &Element) -> IqReply {
    let store = host.archive();
    if iq.type_() == "set" {
        let p = match parse_prefs(el) {
            Ok(p) => p,
            Err(e) => return IqReply::Error(e),
        };
        if let Err(e) = store.set_prefs(owner, &p).await {
            return IqReply::Error(store_failed(e));
        }
    }
    match store.prefs(owner).await {
        Ok(p) => IqReply::Result(Some(prefs_element(&p))),
        Err(e) => IqReply::Error(store_failed(e)),
    }
}

/// The query rate limit (`archive.max_queries_per_minute`): queries per account per minute.
struct MamIq {
    queries: Windows<BareJid>,
}

impl Default for MamIq {
    fn default() -> Self {
        MamIq {
            queries: Windows::new(Duration::from_secs(60)),
        }
    }
}

impl MamIq {
    /// Counts a query by `owner`; `Err` is the refusal when it is over the limit.
    fn admit(&self, owner: &BareJid, per_minute: u32) -> Result<(), StanzaError> {
        self.queries
            .admit(owner.clone(), per_minute)
            .map_err(|left| {
                StanzaError::ResourceConstraint(Some(format!(
                    "archive queries are limited to {per_minute} per minute \
                 (archive.max_queries_per_minute): retry in {} s",
                    left.as_secs() + 1
                )))
            })
    }
}

#[async_trait]
impl IqHandler for MamIq {
    async fn handle(&self, host: &dyn Host, iq: &Stanza) -> IqReply {
        let owner = iq.from.to_bare();
        // Only the owner reads or configures an archive (§8.1).
        if iq
            .to
            .as_ref()
            .is_some_and(|to| to.is_full() || to.to_bare() != owner)
        {
            return IqReply::Error(StanzaError::Forbidden(None));
        }
        let Some(el) = iq.payload() else {
            return IqReply::Error(StanzaError::BadRequest(None));
        };
        match (el.name(), iq.type_()) {
            ("query", "set") => {
                let limit = host.settings().archive.max_queries_per_minute;
                if let Err(e) = self.admit(&owner, limit) {
                    return IqReply::Error(e);
                }
                query(host, iq, &owner, el).await
            }
            ("query", "get") => IqReply::Result(Some(form())),
            ("metadata", "get") => metadata(host, &owner).await,
            ("prefs", _) => prefs(host, iq, &owner, el).await,
            _ => IqReply::Error(StanzaError::BadRequest(None)),
        }
    }
}

pub fn register(reg: &mut Registry) {
    reg.module("XEP-0313");
    reg.message_hook(HOOK_PRIORITY, Arc::new(ArchiveHook));
    reg.message_hook(HIDE_SENDER_ID_PRIORITY, Arc::new(HideSenderId));
    reg.iq(IqScope::Account, NS, Arc::new(MamIq::default()));
    reg.account_feature(NS);
    reg.account_feature(NS_EXTENDED);
    reg.account_feature(SID);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::{ArchiveStore, RosterItem, Subscription};
    use crate::testing::{bare, full, MemArchive, TestHost};

    const BODY: &str = "<body>hi</body>";

    fn host(accounts: &[&str]) -> TestHost {
        let mut h = TestHost::with_modules(
            accounts,
            &[crate::roster::register, crate::presence::register, register],
        );
        h.archive = Box::new(MemArchive::default());
        for a in accounts {
            h.bind(&format!("{a}/r"));
        }
        h
    }

    async fn count(h: &TestHost, owner: &str) -> u64 {
        h.archive.count(&bare(owner), None).await.unwrap()
    }

    /// All of `owner`'s archive, oldest first.
    async fn all(h: &TestHost, owner: &str) -> Vec<ArchivedMessage> {
        h.archive
            .scan(&bare(owner), None, KeyRange::default(), false, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, m)| m)
            .collect()
    }

    fn stanza_ids(el: &Element) -> Vec<(String, String)> {
        el.children()
            .filter(|c| c.is("stanza-id", SID))
            .map(|c| {
                (
                    c.attr("id").unwrap_or("").into(),
                    c.attr("by").unwrap_or("").into(),
                )
            })
            .collect()
    }

    /// Seeds `a`'s archive directly: `(seconds, from, to, body)`, with = the other party. Returns
    /// the ids in order.
    async fn seed(h: &TestHost, rows: &[(u64, &str, &str, &str)]) -> Vec<String> {
        let owner = bare("a");
        let mut ids = Vec::new();
        for (secs, from, to, body) in rows {
            let (from, to) = (crate::testing::addr(from), crate::testing::addr(to));
            let other = if Jid::new(&from).unwrap().to_bare() == owner {
                &to
            } else {
                &from
            };
            let other = Jid::new(other).unwrap().to_bare();
            let xml = format!(
                "<message xmlns='jabber:client' type='chat' from='{from}' to='{to}'><body>{body}</body></message>"
            );
            ids.push(
                h.archive
                    .append(&owner, &Jid::from(other), secs * 1_000_000, &xml)
                    .await
                    .unwrap(),
            );
        }
        ids
    }

    /// The standard fixture: 10 messages in a's archive, one per second from t=1000; 0-3 and 8-9
    /// with b (b/r1 on even, b/r2 on odd), 4-7 with c.
    async fn fixture(h: &TestHost) -> Vec<String> {
        let mut rows = Vec::new();
        for i in 0..10u64 {
            let (from, to) = match i {
                4..=7 => ("c/x", "a/r"),
                _ if i % 2 == 0 => ("a/r", "b/r1"),
                _ => ("b/r2", "a/r"),
            };
            rows.push((1000 + i, from, to, ""));
        }
        let ids = seed(h, &rows).await;
        h.take();
        ids
    }

    struct Answer {
        ids: Vec<String>,
        bodies: Vec<String>,
        fin: Element,
    }

    impl Answer {
        fn set(&self) -> &Element {
            self.fin.get_child("set", RSM).expect("rsm set")
        }
        fn complete(&self) -> bool {
            self.fin.attr("complete") == Some("true")
        }
        fn count(&self) -> Option<u64> {
            self.set()
                .get_child("count", RSM)
                .map(|c| c.text().parse().unwrap())
        }
        fn first(&self) -> Option<(String, Option<String>)> {
            self.set()
                .get_child("first", RSM)
                .map(|f| (f.text(), f.attr("index").map(str::to_owned)))
        }
        fn last(&self) -> Option<String> {
            self.set().get_child("last", RSM).map(Element::text)
        }
    }

    fn form_xml(fields: &[(&str, &str)]) -> String {
        if fields.is_empty() {
            return String::new();
        }
        let mut s = String::from(
            "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>",
        );
        for (var, v) in fields {
            s.push_str(&format!("<field var='{var}'><value>{v}</value></field>"));
        }
        s.push_str("</x>");
        s
    }

    async fn raw_query(h: &TestHost, from: &str, to: &str, inner: &str) -> Result<Answer, String> {
        let to = if to.is_empty() {
            String::new()
        } else {
            format!(" to='{to}'")
        };
        let xml = format!("<iq type='set' id='q'{to}><query xmlns='urn:xmpp:mam:2' queryid='f1'>{inner}</query></iq>");
        match h.iq(from, &xml).await {
            IqReply::Result(Some(fin)) => {
                assert!(fin.is("fin", NS));
                assert_eq!(fin.attr("queryid"), Some("f1"));
                let mut ids = Vec::new();
                let mut bodies = Vec::new();
                for (to, m) in h.take() {
                    assert_eq!(to, full(from));
                    assert_eq!(m.attr("from"), Some(full(from).to_bare().as_str()));
                    let r = m.get_child("result", NS).expect("result");
                    assert_eq!(r.attr("queryid"), Some("f1"));
                    let fwd = r.get_child("forwarded", FORWARD).unwrap();
                    assert!(fwd
                        .get_child("delay", ns::DELAY)
                        .unwrap()
                        .attr("stamp")
                        .is_some());
                    let orig = fwd.get_child("message", ns::CLIENT).unwrap();
                    ids.push(r.attr("id").unwrap().to_owned());
                    bodies.push(
                        orig.get_child("body", ns::CLIENT)
                            .map(Element::text)
                            .unwrap_or_default(),
                    );
                }
                Ok(Answer { ids, bodies, fin })
            }
            IqReply::Error(e) => Err(e.condition().to_owned()),
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn q(h: &TestHost, fields: &[(&str, &str)], rsm: &str) -> Result<Answer, String> {
        let rsm = if rsm.is_empty() {
            String::new()
        } else {
            format!("<set xmlns='{RSM}'>{rsm}</set>")
        };
        raw_query(h, "a/r", "", &format!("{}{rsm}", form_xml(fields))).await
    }

    // --- archiving ---

    #[tokio::test]
    async fn archives_both_sides_and_marks_the_delivered_copy() {
        let h = host(&["a", "b"]);
        let (handled, el) = h
            .message("a/r", &format!("<message to='b' type='chat' id='m1'>{BODY}<origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>"))
            .await;
        assert!(!handled);
        let ids = stanza_ids(&el);
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].1, "b@example.com");
        let b = all(&h, "b").await;
        let a = all(&h, "a").await;
        assert_eq!((a.len(), b.len()), (1, 1));
        assert_eq!(b[0].id, ids[0].0);
        assert_ne!(a[0].id, b[0].id);
        assert_eq!(
            (a[0].with.as_str(), b[0].with.as_str()),
            ("b@example.com", "a@example.com")
        );
        // Archived as delivered (from/to, origin-id), without our stanza-id.
        let stored: Element = b[0].stanza.parse().unwrap();
        assert_eq!(stored.attr("from"), Some("a@example.com/r"));
        assert_eq!(stored.attr("to"), Some("b@example.com"));
        assert!(stored.has_child("origin-id", SID));
        assert!(!stored.has_child("stanza-id", SID));
        assert!(el.has_child("origin-id", SID));

        // The recipient finds it under the id it was given.
        let ans = raw_query(&h, "b/r", "", "").await.unwrap();
        assert_eq!(ans.ids, [ids[0].0.clone()]);
        assert_eq!(ans.bodies, ["hi"]);
    }

    #[tokio::test]
    async fn offline_or_unknown_recipients() {
        let h = host(&["a", "b"]);
        h.end("b/r").await;
        let (_, el) = h
            .message(
                "a/r",
                &format!("<message to='b/gone' type='chat'>{BODY}</message>"),
            )
            .await;
        assert_eq!(count(&h, "b").await, 1, "archived although b is offline");
        assert_eq!(stanza_ids(&el).len(), 1);
        // No such account: only the sender's archive.
        let (_, el) = h
            .message(
                "a/r",
                &format!("<message to='nobody' type='chat'>{BODY}</message>"),
            )
            .await;
        assert!(stanza_ids(&el).is_empty());
        assert_eq!(count(&h, "a").await, 2);
        assert_eq!(count(&h, "nobody").await, 0);
        // To the server, or from the server: not archived.
        h.message(
            "a/r",
            &format!("<message to='example.com' type='chat'>{BODY}</message>"),
        )
        .await;
        assert_eq!(count(&h, "a").await, 2);
    }

    #[tokio::test]
    async fn message_to_oneself_is_stored_once() {
        let h = host(&["a"]);
        let (_, el) = h
            .message(
                "a/r",
                &format!("<message to='a/other' type='chat'>{BODY}</message>"),
            )
            .await;
        assert_eq!(count(&h, "a").await, 1);
        assert_eq!(stanza_ids(&el)[0].1, "a@example.com");
        let (_, el) = h
            .message("a/r", &format!("<message type='chat'>{BODY}</message>"))
            .await;
        assert_eq!(count(&h, "a").await, 2);
        assert_eq!(stanza_ids(&el).len(), 1);
        assert_eq!(
            h.archive.count(&bare("a"), Some(&bare("a"))).await.unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn spoofed_stanza_ids_are_stripped() {
        let h = host(&["a", "b"]);
        let xml = format!(
            "<message to='b' type='chat'>{BODY}\
             <stanza-id xmlns='urn:xmpp:sid:0' id='x1' by='b@example.com'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' id='x2' by='A@example.com'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' id='x3' by='example.com'/>\
             <stanza-id xmlns='urn:xmpp:sid:0' id='x4' by='room@muc.elsewhere.net'/>\
             <origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>"
        );
        let (_, el) = h.message("a/r", &xml).await;
        let ids = stanza_ids(&el);
        assert_eq!(ids.len(), 2, "{ids:?}");
        assert_eq!(ids[0], ("x4".into(), "room@muc.elsewhere.net".into()));
        assert_eq!(ids[1].1, "b@example.com");
        assert_ne!(ids[1].0, "x1");
        assert!(el.has_child("origin-id", SID));
        let stored = &all(&h, "b").await[0].stanza;
        assert!(!stored.contains("x1") && !stored.contains("x2") && !stored.contains("x3"));

        // Also stripped from a message that is not archived.
        let (_, el) = h
            .message("a/r", "<message to='b' type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/><stanza-id xmlns='urn:xmpp:sid:0' id='x5' by='b@example.com'/></message>")
            .await;
        assert!(stanza_ids(&el).is_empty());
    }

    #[tokio::test]
    async fn what_is_archived() {
        let h = host(&["a", "b"]);
        let skipped = [
            "<message to='b' type='chat'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "<message to='b' type='chat'><received xmlns='urn:xmpp:receipts' id='m1'/></message>",
            "<message to='b' type='chat'><displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/><store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b' type='chat'><store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b' type='headline'><body>news</body></message>",
            "<message to='b' type='groupchat'><body>room</body></message>",
            "<message to='b' type='error'><body>err</body></message>",
            "<message to='b' type='chat'><body>secret</body><no-store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b' type='chat'><body>secret</body><no-permanent-store xmlns='urn:xmpp:hints'/><store xmlns='urn:xmpp:hints'/></message>",
        ];
        for xml in skipped {
            let (_, el) = h.message("a/r", xml).await;
            assert!(stanza_ids(&el).is_empty(), "{xml}");
        }
        assert_eq!((count(&h, "a").await, count(&h, "b").await), (0, 0));

        let archived = [
            "<message to='b'><body>normal type</body></message>",
            "<message to='b' type='chat'><x xmlns='jabber:x:oob'><url>https://x/y</url></x><store xmlns='urn:xmpp:hints'/></message>",
            "<message to='b' type='chat'><encrypted xmlns='urn:xmpp:omemo:2'><payload>AA==</payload></encrypted></message>",
            "<message to='b' type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>",
            "<message to='b' type='chat'><openpgp xmlns='urn:xmpp:openpgp:0'>AA==</openpgp></message>",
            "<message to='b' type='chat'><x xmlns='jabber:x:encrypted'>AA==</x></message>",
            "<message to='b' type='chat'><retract xmlns='urn:xmpp:message-retract:1' id='m1'/></message>",
            "<message to='b' type='chat'><apply-to xmlns='urn:xmpp:fasten:0' id='m1'><retract xmlns='urn:xmpp:message-retract:0'/></apply-to></message>",
            "<message to='b' type='chat'><replace xmlns='urn:xmpp:message-correct:0' id='m1'/></message>",
        ];
        for xml in archived {
            let (_, el) = h.message("a/r", xml).await;
            assert_eq!(stanza_ids(&el).len(), 1, "{xml}");
        }
        assert_eq!((count(&h, "a").await, count(&h, "b").await), (9, 9));
    }

    #[tokio::test]
    async fn archiving_disabled_in_settings() {
        let mut h = host(&["a", "b"]);
        h.settings.archive.enabled = false;
        h.message(
            "a/r",
            &format!("<message to='b' type='chat'>{BODY}</message>"),
        )
        .await;
        assert_eq!((count(&h, "a").await, count(&h, "b").await), (0, 0));
    }

    async fn set_prefs(h: &TestHost, user: &str, inner: &str) -> IqReply {
        h.iq(
            &format!("{user}/r"),
            &format!("<iq type='set' id='p'><prefs xmlns='urn:xmpp:mam:2' {inner}</prefs></iq>"),
        )
        .await
    }

    #[tokio::test]
    async fn preferences_on_each_side() {
        let h = host(&["a", "b", "c"]);
        let send = |from: &'static str, to: &'static str| {
            let h = &h;
            async move {
                let (_, el) = h
                    .message(
                        &format!("{from}/r"),
                        &format!("<message to='{to}' type='chat'>{BODY}</message>"),
                    )
                    .await;
                !stanza_ids(&el).is_empty()
            }
        };
        // b never archives: a keeps its copy, b gets no stanza-id.
        set_prefs(&h, "b", "default='never'>").await;
        assert!(!send("a", "b").await);
        assert_eq!((count(&h, "a").await, count(&h, "b").await), (1, 0));
        // ... except with a, listed under always.
        set_prefs(
            &h,
            "b",
            "default='never'><always><jid>A@example.com</jid></always>",
        )
        .await;
        assert!(send("a", "b").await);
        assert!(!send("c", "b").await);
        assert_eq!(count(&h, "b").await, 1);

        // a archives only its roster: c is not in it, b is.
        set_prefs(&h, "a", "default='roster'>").await;
        assert!(!send("c", "a").await);
        assert_eq!(count(&h, "a").await, 2);
        h.put_item(
            "a",
            RosterItem {
                jid: "b@example.com".into(),
                subscription: Subscription::Both,
                in_roster: true,
                ..Default::default()
            },
        );
        h.put_item(
            "a",
            RosterItem {
                jid: "c@example.com".into(),
                pending_in: Some("<presence/>".into()),
                ..Default::default()
            },
        );
        assert!(send("b", "a").await);
        assert!(
            !send("c", "a").await,
            "a pending request is not a roster item"
        );
        send("a", "b").await;
        assert_eq!(count(&h, "a").await, 4);
        // never wins over always and over the roster.
        set_prefs(&h, "a", "default='always'><always><jid>b@example.com</jid></always><never><jid>b@example.com</jid></never>").await;
        assert!(!send("b", "a").await);
        assert_eq!(count(&h, "a").await, 4);
        // a full JID in a list matches that resource only.
        set_prefs(
            &h,
            "a",
            "default='always'><never><jid>c@example.com/r</jid></never>",
        )
        .await;
        assert!(!send("c", "a").await);
        assert_eq!(count(&h, "a").await, 4);
    }

    #[tokio::test]
    async fn preferences_get_and_set() {
        let h = host(&["a"]);
        let get = "<iq type='get' id='p'><prefs xmlns='urn:xmpp:mam:2'/></iq>";
        let IqReply::Result(Some(p)) = h.iq("a/r", get).await else {
            panic!()
        };
        assert_eq!(p.attr("default"), Some("always"));
        assert!(p
            .get_child("always", NS)
            .unwrap()
            .children()
            .next()
            .is_none());

        let IqReply::Result(Some(p)) = set_prefs(
            &h,
            "a",
            "default='roster'><always><jid>B@Example.com</jid><jid>b@example.com</jid></always><never><jid>c@example.com/R</jid></never>",
        )
        .await
        else {
            panic!()
        };
        let stored = ArchivePrefs {
            default: "roster".into(),
            always: vec!["b@example.com".into()],
            never: vec!["c@example.com/R".into()],
        };
        assert_eq!(parse_prefs(&p).unwrap(), stored);
        let IqReply::Result(Some(p)) = h.iq("a/r", get).await else {
            panic!()
        };
        assert_eq!(parse_prefs(&p).unwrap(), stored);

        let err = |r: IqReply| match r {
            IqReply::Error(e) => e.condition(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(set_prefs(&h, "a", "default='sometimes'>").await),
            "bad-request"
        );
        assert_eq!(err(set_prefs(&h, "a", ">").await), "bad-request");
        assert_eq!(
            err(set_prefs(&h, "a", "default='never'><never><jid>@@</jid></never>").await),
            "jid-malformed"
        );
        assert_eq!(
            err(h
                .iq(
                    "a/r",
                    "<iq type='get' id='p' to='b'><prefs xmlns='urn:xmpp:mam:2'/></iq>"
                )
                .await),
            "forbidden"
        );
        let IqReply::Result(Some(p)) = h.iq("a/r", get).await else {
            panic!()
        };
        assert_eq!(
            parse_prefs(&p).unwrap(),
            stored,
            "failed sets change nothing"
        );
    }

    // --- queries ---

    #[tokio::test]
    async fn query_everything() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let ans = q(&h, &[], "").await.unwrap();
        assert_eq!(ans.ids, ids);
        assert!(ans.complete());
        assert_eq!(ans.count(), Some(10));
        assert_eq!(ans.first(), Some((ids[0].clone(), Some("0".into()))));
        assert_eq!(ans.last(), Some(ids[9].clone()));
        // Addressed to the own bare JID explicitly.
        let ans = raw_query(&h, "a/r", "a", "").await.unwrap();
        assert_eq!(ans.ids.len(), 10);
        // Delay stamps are the archive time.
        h.iq(
            "a/r",
            "<iq type='set' id='q'><query xmlns='urn:xmpp:mam:2'/></iq>",
        )
        .await;
        let (_, m) = &h.take()[0];
        let stamp = m
            .get_child("result", NS)
            .and_then(|r| r.get_child("forwarded", FORWARD))
            .and_then(|f| f.get_child("delay", ns::DELAY))
            .and_then(|d| d.attr("stamp"))
            .unwrap()
            .to_owned();
        assert_eq!(stamp, "1970-01-01T00:16:40Z");
    }

    #[tokio::test]
    async fn query_with_bare_and_full() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let ans = q(&h, &[("with", "b@example.com")], "").await.unwrap();
        assert_eq!(ans.ids, [0, 1, 2, 3, 8, 9].map(|i| ids[i].clone()));
        assert_eq!(ans.count(), Some(6));
        let ans = q(&h, &[("with", "c@example.com")], "").await.unwrap();
        assert_eq!(ans.ids, ids[4..8]);
        assert_eq!(ans.count(), Some(4));

        // Full JIDs: to or from that resource only, paged across scans; no count.
        let ans = q(&h, &[("with", "b@example.com/r1")], "").await.unwrap();
        assert_eq!(ans.ids, [0, 2, 8].map(|i| ids[i].clone()));
        assert_eq!(ans.count(), None);
        assert!(ans.complete());
        let ans = q(&h, &[("with", "b@example.com/r2")], "<max>2</max>")
            .await
            .unwrap();
        assert_eq!(ans.ids, [1, 3].map(|i| ids[i].clone()));
        assert!(!ans.complete());
        let ans = q(
            &h,
            &[("with", "b@example.com/r2")],
            &format!("<max>2</max><after>{}</after>", ids[3]),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [ids[9].clone()]);
        assert!(ans.complete());
        let ans = q(&h, &[("with", "a@example.com/r")], "").await.unwrap();
        assert!(ans.ids.is_empty(), "messages to oneself only");

        assert_eq!(
            q(&h, &[("with", "@bad")], "").await.err().as_deref(),
            Some("jid-malformed")
        );
        let ans = q(&h, &[("with", "nobody@example.com")], "").await.unwrap();
        assert!(ans.ids.is_empty() && ans.complete());
        assert_eq!(ans.count(), Some(0));
        assert!(ans.first().is_none() && ans.last().is_none());
    }

    #[tokio::test]
    async fn query_by_time() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let ans = q(
            &h,
            &[
                ("start", "1970-01-01T00:16:42Z"),
                ("end", "1970-01-01T00:16:45Z"),
            ],
            "",
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, ids[2..6], "both bounds inclusive");
        assert_eq!(ans.count(), None);
        assert_eq!(ans.first(), Some((ids[2].clone(), Some("0".into()))));
        let ans = q(&h, &[("start", "1970-01-01T01:16:47+01:00")], "")
            .await
            .unwrap();
        assert_eq!(ans.ids, ids[7..]);
        let ans = q(&h, &[("end", "1970-01-01T00:16:40.000001Z")], "")
            .await
            .unwrap();
        assert_eq!(ans.ids, ids[..1]);
        let ans = q(&h, &[("end", "1969-12-31T23:59:59Z")], "").await.unwrap();
        assert!(ans.ids.is_empty() && ans.complete());
        let ans = q(
            &h,
            &[("start", "1960-01-01T00:00:00Z"), ("with", "c@example.com")],
            "",
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, ids[4..8]);
        let ans = q(&h, &[("start", "2020-01-01T00:00:00Z")], "")
            .await
            .unwrap();
        assert!(ans.ids.is_empty());
        for bad in [
            "yesterday",
            "1970-01-01",
            "1970-13-01T00:00:00Z",
            "1970-02-30T00:00:00Z",
            "1970-01-01T00:00:00",
            "1970-01-01T00:00:00+1:00",
            "1970-01-01T24:00:00Z",
        ] {
            assert_eq!(
                q(&h, &[("start", bad)], "").await.err().as_deref(),
                Some("bad-request"),
                "{bad}"
            );
        }
        assert_eq!(
            q(&h, &[("end", "2020-01-01T00:00:00.Z")], "")
                .await
                .err()
                .as_deref(),
            Some("bad-request")
        );
    }

    #[tokio::test]
    async fn query_by_ids() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let ans = q(&h, &[("after-id", &ids[6])], "").await.unwrap();
        assert_eq!(ans.ids, ids[7..]);
        assert_eq!(ans.count(), None);
        let ans = q(&h, &[("after-id", &ids[2]), ("before-id", &ids[5])], "")
            .await
            .unwrap();
        assert_eq!(ans.ids, ids[3..5]);
        let ans = q(&h, &[("before-id", &ids[2]), ("with", "b@example.com")], "")
            .await
            .unwrap();
        assert_eq!(ans.ids, ids[..2]);
        assert_eq!(
            q(&h, &[("after-id", "nope")], "").await.err().as_deref(),
            Some("item-not-found")
        );
        assert_eq!(
            q(&h, &[("before-id", "nope")], "").await.err().as_deref(),
            Some("item-not-found")
        );

        // ids: in archive order whatever the request's; exact count and index.
        let form = format!(
            "<x xmlns='jabber:x:data' type='submit'><field var='ids'><value>{}</value><value>{}</value><value>{}</value></field></x>",
            ids[7], ids[1], ids[4]
        );
        let ans = raw_query(&h, "a/r", "", &form).await.unwrap();
        assert_eq!(ans.ids, [1, 4, 7].map(|i| ids[i].clone()));
        assert_eq!(ans.count(), Some(3));
        assert!(ans.complete());
        let ans = raw_query(
            &h,
            "a/r",
            "",
            &format!(
                "{form}<set xmlns='{RSM}'><max>1</max><after>{}</after></set>",
                ids[1]
            ),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [ids[4].clone()]);
        assert_eq!(ans.first(), Some((ids[4].clone(), Some("1".into()))));
        assert!(!ans.complete());
        let ans = raw_query(
            &h,
            "a/r",
            "",
            &format!("{form}<set xmlns='{RSM}'><max>2</max><before/></set>"),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [4, 7].map(|i| ids[i].clone()));
        assert!(!ans.complete());
        let ans = raw_query(
            &h,
            "a/r",
            "",
            &form.replace(
                "</x>",
                "<field var='with'><value>c@example.com/x</value></field><field var='before-id'><value>IDX</value></field></x>",
            ).replace("IDX", &ids[7]),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [ids[4].clone()], "ids within the other filters");
        assert_eq!(ans.count(), Some(1));
        let bad = format!("<x xmlns='jabber:x:data' type='submit'><field var='ids'><value>{}</value><value>nope</value></field></x>", ids[1]);
        assert_eq!(
            raw_query(&h, "a/r", "", &bad).await.err().as_deref(),
            Some("item-not-found")
        );
    }

    /// Issue 7: a `with` filter not stable under preparation (℻ → FAX → fax) is refused.
    #[tokio::test]
    async fn with_filter_with_an_unstable_jid_is_jid_malformed() {
        let h = host(&["a"]);
        h.bind("a/r");
        let q = form_xml(&[("with", "\u{213b}@example.com")]);
        assert_eq!(
            raw_query(&h, "a/r", "", &q).await.err().as_deref(),
            Some("jid-malformed")
        );
    }

    #[tokio::test]
    async fn paging_forwards_and_backwards() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let p1 = q(&h, &[], "<max>4</max>").await.unwrap();
        assert_eq!(p1.ids, ids[..4]);
        assert!(!p1.complete());
        assert_eq!(p1.count(), Some(10));
        assert_eq!(p1.first(), Some((ids[0].clone(), Some("0".into()))));
        let p2 = q(
            &h,
            &[],
            &format!("<max>4</max><after>{}</after>", p1.last().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(p2.ids, ids[4..8]);
        assert!(!p2.complete());
        assert_eq!(p2.first().unwrap().1, None, "index unknown mid-archive");
        let p3 = q(
            &h,
            &[],
            &format!("<max>4</max><after>{}</after>", p2.last().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(p3.ids, ids[8..]);
        assert!(p3.complete(), "complete at the end");
        assert_eq!(p3.first().unwrap().1.as_deref(), Some("8"));
        let p4 = q(&h, &[], &format!("<max>4</max><after>{}</after>", ids[9]))
            .await
            .unwrap();
        assert!(p4.ids.is_empty() && p4.complete());
        assert_eq!(p4.count(), Some(10));

        // Backwards from the end: the last page, still in chronological order.
        let b1 = q(&h, &[], "<max>4</max><before/>").await.unwrap();
        assert_eq!(b1.ids, ids[6..]);
        assert!(!b1.complete());
        assert_eq!(b1.first(), Some((ids[6].clone(), Some("6".into()))));
        let b2 = q(
            &h,
            &[],
            &format!("<max>4</max><before>{}</before>", b1.first().unwrap().0),
        )
        .await
        .unwrap();
        assert_eq!(b2.ids, ids[2..6]);
        assert!(!b2.complete());
        let b3 = q(
            &h,
            &[],
            &format!("<max>4</max><before>{}</before>", b2.first().unwrap().0),
        )
        .await
        .unwrap();
        assert_eq!(b3.ids, ids[..2]);
        assert!(b3.complete(), "complete at the start");
        assert_eq!(b3.first().unwrap().1.as_deref(), Some("0"));

        // Both RSM bounds: backwards inside them; reaching `after` is not the archive's start.
        let both = format!("<after>{}</after><before>{}</before>", ids[1], ids[5]);
        let ans = q(&h, &[], &format!("<max>2</max>{both}")).await.unwrap();
        assert_eq!(ans.ids, ids[3..5]);
        assert!(!ans.complete());
        let ans = q(&h, &[], &format!("<max>9</max>{both}")).await.unwrap();
        assert_eq!(ans.ids, ids[2..5]);
        assert!(ans.complete());
        assert_eq!(ans.first(), Some((ids[2].clone(), None)));

        // RSM within filters.
        let ans = q(&h, &[("with", "b@example.com")], "<max>2</max><before/>")
            .await
            .unwrap();
        assert_eq!(ans.ids, ids[8..]);
        assert_eq!(ans.first().unwrap().1.as_deref(), Some("4"));
        let ans = q(
            &h,
            &[("with", "b@example.com")],
            &format!("<max>3</max><after>{}</after>", ids[2]),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [3, 8, 9].map(|i| ids[i].clone()));
        assert!(ans.complete());

        assert_eq!(
            q(&h, &[], "<after>nope</after>").await.err().as_deref(),
            Some("item-not-found")
        );
        assert_eq!(
            q(&h, &[], "<before>nope</before>").await.err().as_deref(),
            Some("item-not-found")
        );
        assert_eq!(
            q(&h, &[], "<max>lots</max>").await.err().as_deref(),
            Some("bad-request")
        );
        assert_eq!(
            q(&h, &[], "<index>3</index>").await.err().as_deref(),
            Some("feature-not-implemented")
        );
    }

    #[tokio::test]
    async fn page_sizes() {
        let mut h = host(&["a", "b", "c"]);
        h.settings.archive.default_page = 3;
        h.settings.archive.max_page = 5;
        let ids = fixture(&h).await;
        let ans = q(&h, &[], "").await.unwrap();
        assert_eq!(ans.ids, ids[..3]);
        assert!(!ans.complete());
        let ans = q(&h, &[], "<max>100</max>").await.unwrap();
        assert_eq!(ans.ids, ids[..5], "clamped");
        // max 0: the count alone.
        let ans = q(&h, &[], "<max>0</max>").await.unwrap();
        assert!(ans.ids.is_empty() && !ans.complete());
        assert_eq!(ans.count(), Some(10));
        assert!(ans.first().is_none());
    }

    #[tokio::test]
    async fn queries_per_minute_are_limited_per_account() {
        let mut h = host(&["a", "b", "c"]);
        h.settings.archive.max_queries_per_minute = 3;
        fixture(&h).await;
        for _ in 0..3 {
            q(&h, &[], "").await.unwrap();
        }
        let Err(err) = q(&h, &[], "").await else {
            panic!("the 4th query passed")
        };
        assert_eq!(err, "resource-constraint");
        let m = MamIq::default();
        m.admit(&bare("a"), 1).unwrap();
        let text = String::from(&m.admit(&bare("a"), 1).unwrap_err().to_element());
        assert!(text.contains("archive.max_queries_per_minute"), "{text}");
        // Another resource of the same account shares the limit; another account does not.
        let Err(err) = raw_query(&h, "a/other", "", "").await else {
            panic!("another resource passed")
        };
        assert_eq!(err, "resource-constraint");
        raw_query(&h, "b/r", "", "").await.unwrap();
    }

    #[tokio::test]
    async fn flipped_pages() {
        let h = host(&["a", "b", "c"]);
        let ids = fixture(&h).await;
        let inner = format!(
            "{}<set xmlns='{RSM}'><max>3</max><before/></set><flip-page/>",
            form_xml(&[])
        );
        let ans = raw_query(&h, "a/r", "", &inner).await.unwrap();
        assert_eq!(ans.ids, [9, 8, 7].map(|i| ids[i].clone()));
        // The page is the same: first and last stay chronological.
        assert_eq!(ans.first().unwrap().0, ids[7]);
        assert_eq!(ans.last(), Some(ids[9].clone()));
        let ans = raw_query(
            &h,
            "a/r",
            "",
            &format!("<set xmlns='{RSM}'><max>2</max></set><flip-page/>"),
        )
        .await
        .unwrap();
        assert_eq!(ans.ids, [1, 0].map(|i| ids[i].clone()));
    }

    #[tokio::test]
    async fn query_errors_and_access() {
        let h = host(&["a", "b", "c"]);
        fixture(&h).await;
        assert_eq!(
            raw_query(&h, "b/r", "a", "").await.err().as_deref(),
            Some("forbidden")
        );
        assert!(h.take().is_empty());
        assert_eq!(
            raw_query(&h, "a/r", "a/r", "").await.err().as_deref(),
            Some("forbidden")
        );
        assert_eq!(
            q(&h, &[("include-groupchat", "true")], "")
                .await
                .err()
                .as_deref(),
            Some("feature-not-implemented")
        );
        let other_type = "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>urn:xmpp:mam:1</value></field></x>";
        assert_eq!(
            raw_query(&h, "a/r", "", other_type).await.err().as_deref(),
            Some("bad-request")
        );
        // b's archive is its own: empty, complete, with a count.
        let ans = raw_query(&h, "b/r", "", "").await.unwrap();
        assert!(ans.ids.is_empty() && ans.complete());
        assert_eq!(ans.count(), Some(0));
    }

    #[tokio::test]
    async fn form_and_metadata() {
        let h = host(&["a", "b", "c"]);
        let IqReply::Result(Some(f)) = h
            .iq(
                "a/r",
                "<iq type='get' id='f'><query xmlns='urn:xmpp:mam:2'/></iq>",
            )
            .await
        else {
            panic!()
        };
        let x = f.get_child("x", ns::DATA_FORMS).unwrap();
        assert_eq!(x.attr("type"), Some("form"));
        let vars: Vec<_> = x
            .children()
            .map(|c| c.attr("var").unwrap().to_owned())
            .collect();
        assert_eq!(
            vars,
            [
                "FORM_TYPE",
                "with",
                "start",
                "end",
                "before-id",
                "after-id",
                "ids"
            ]
        );
        assert!(x
            .children()
            .all(|c| !c.has_child("required", ns::DATA_FORMS)));

        let meta = "<iq type='get' id='m'><metadata xmlns='urn:xmpp:mam:2'/></iq>";
        let IqReply::Result(Some(m)) = h.iq("a/r", meta).await else {
            panic!()
        };
        assert!(m.is("metadata", NS) && m.children().next().is_none());
        let ids = fixture(&h).await;
        let IqReply::Result(Some(m)) = h.iq("a/r", meta).await else {
            panic!()
        };
        let start = m.get_child("start", NS).unwrap();
        let end = m.get_child("end", NS).unwrap();
        assert_eq!(
            (start.attr("id"), start.attr("timestamp")),
            (Some(ids[0].as_str()), Some("1970-01-01T00:16:40Z"))
        );
        assert_eq!(
            (end.attr("id"), end.attr("timestamp")),
            (Some(ids[9].as_str()), Some("1970-01-01T00:16:49Z"))
        );
        let IqReply::Error(e) = h
            .iq(
                "b/r",
                "<iq type='get' id='m' to='a'><metadata xmlns='urn:xmpp:mam:2'/></iq>",
            )
            .await
        else {
            panic!()
        };
        assert_eq!(e.condition(), "forbidden");
    }

    #[tokio::test]
    async fn disco_features() {
        let h = host(&["a"]);
        let f: Vec<_> = h.registry().account_features().collect();
        for want in [NS, NS_EXTENDED, SID] {
            assert!(f.contains(&want));
        }
        assert_eq!(
            h.registry()
                .modules()
                .iter()
                .filter(|m| **m == "XEP-0313")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn live_archive_round_trip_in_arrival_order() {
        let h = host(&["a", "b"]);
        for i in 0..5 {
            let (from, to) = if i % 2 == 0 {
                ("a/r", "b")
            } else {
                ("b/r", "a")
            };
            h.message(
                from,
                &format!("<message to='{to}' type='chat'><body>{i}</body></message>"),
            )
            .await;
        }
        let ans = raw_query(&h, "a/r", "", "").await.unwrap();
        assert_eq!(ans.bodies, ["0", "1", "2", "3", "4"]);
        let ans = raw_query(
            &h,
            "b/r",
            "",
            &format!("<set xmlns='{RSM}'><max>2</max><before/></set>"),
        )
        .await
        .unwrap();
        assert_eq!(ans.bodies, ["3", "4"]);
    }

    #[test]
    fn datetimes() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_datetime("2010-07-10T23:08:25Z"),
            Some(1_278_803_305_000_000)
        );
        assert_eq!(
            parse_datetime("2010-07-11T01:08:25+02:00"),
            Some(1_278_803_305_000_000)
        );
        assert_eq!(
            parse_datetime("2010-07-10T18:08:25.5-05:00"),
            Some(1_278_803_305_500_000)
        );
        assert_eq!(
            parse_datetime("2000-02-29T00:00:00.1234567Z"),
            Some(951_782_400_123_456)
        );
        assert_eq!(parse_datetime("1969-12-31T23:59:59Z"), Some(-1_000_000));
        assert_eq!(parse_datetime("1900-02-29T00:00:00Z"), None);
        assert_eq!(parse_datetime("2010-07-10T23:08:25z"), None);
        assert_eq!(parse_datetime("2010-07-10T23:08:25+0200"), None);
        assert_eq!(parse_datetime("2010-07-10T23:08:2éZ"), None);
        assert_eq!(
            format_datetime(1_278_803_305_000_000),
            "2010-07-10T23:08:25Z"
        );
        assert_eq!(
            format_datetime(951_782_400_123_456),
            "2000-02-29T00:00:00.123456Z"
        );
        for t in [
            0u64,
            1,
            86_399_999_999,
            4_102_444_800_000_000,
            1_700_000_000_654_321,
        ] {
            assert_eq!(parse_datetime(&format_datetime(t)), Some(t as i64));
        }
        let a = now_micros();
        assert!(now_micros() >= a);
    }

    #[tokio::test]
    async fn mem_archive_contract() {
        let s = MemArchive::default();
        let (a, b) = (bare("a"), bare("b"));
        let mut ids = Vec::new();
        for ts in [5u64, 5, 3, 9] {
            ids.push(
                s.append(&a, &Jid::from(full("b/r")), ts, "<m/>")
                    .await
                    .unwrap(),
            );
        }
        s.append(&b, &Jid::from(a.clone()), 1, "<x/>")
            .await
            .unwrap();
        let keys = s
            .scan(&a, None, KeyRange::default(), false, 10)
            .await
            .unwrap();
        let order: Vec<_> = keys.iter().map(|(_, m)| m.id.clone()).collect();
        assert_eq!(
            order,
            [2, 0, 1, 3].map(|i| ids[i].clone()),
            "time, then arrival"
        );
        assert_eq!(keys[0].1.with, "b@example.com");
        let k0 = s.locate(&a, &ids[0]).await.unwrap().unwrap();
        let empty = KeyRange {
            after: Some(k0),
            before: Some(k0),
        };
        assert!(s.scan(&a, None, empty, false, 10).await.unwrap().is_empty());
        assert!(s
            .scan(&a, Some(&b), empty, true, 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.count(&a, Some(&b)).await.unwrap(), 4);
        assert_eq!(s.size(&a).await.unwrap(), (4, 16));
        assert_eq!(s.prune(Some(&a), 6).await.unwrap(), 3);
        assert_eq!(s.prune(None, 6).await.unwrap(), 1);
        assert_eq!(s.count(&a, Some(&b)).await.unwrap(), 1);
        assert!(s.locate(&a, &ids[0]).await.unwrap().is_none());
        let next = s
            .append(&a, &Jid::from(b.clone()), 1, "<m/>")
            .await
            .unwrap();
        assert!(!ids.contains(&next), "ids are never reused");
    }
}
