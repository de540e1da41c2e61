//! The sessions table: bare JID → bound resources, each with a bounded outbound queue.
//!
//! Sharded (DashMap) so that routing to different users does not contend on one lock; the lock
//! of a shard is never held across an `.await`. A queue that is full means the session's reader
//! is not keeping up: the stanza is refused (the router then applies the RFC's fallback) and the
//! session is told to close, so a slow reader can never make the server's memory grow.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use halyard_xep::host::ResourceInfo;
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

use crate::outbound::{self, TrySendError};
use crate::stream::StreamError;

/// What a session's writer receives.
#[derive(Debug)]
pub enum Outbound {
    /// A serialised stanza, written as is.
    Data(Bytes),
    /// Close the stream with this error (boxed: it is rare, and every queue slot is sized for
    /// the largest variant).
    Close(Box<StreamError>),
}

pub type OutboundTx = outbound::Sender<Outbound>;
pub type OutboundRx = outbound::Receiver<Outbound>;

struct Entry {
    resource: String,
    conn_id: u64,
    tx: OutboundTx,
    priority: i8,
    presence: Option<Element>,
    roster_interested: bool,
    carbons: bool,
    directed: Vec<Jid>,
    /// Since when its connection is gone while it waits to be resumed (XEP-0198).
    hibernating: Option<std::time::Instant>,
    /// XEP-0352 inactive.
    inactive: bool,
    /// Since when the oldest unacknowledged stanza has waited (XEP-0198 enabled).
    unacked_since: Option<std::time::Instant>,
}

#[derive(Default)]
pub struct Sessions {
    map: DashMap<BareJid, Vec<Entry>>,
    count: AtomicU64,
    /// Stanzas queued, by kind (`/metrics`); set once by the server.
    outbound: std::sync::OnceLock<crate::http::metrics::ByKind>,
}

/// A session displaced by a new binding of the same full JID.
pub struct Replaced {
    pub tx: OutboundTx,
    pub presence: Option<Element>,
    pub directed: Vec<Jid>,
}

/// The result of trying to queue a stanza for one resource.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    Yes,
    NoSuchResource,
    /// The resource's queue is full; it has been told to close.
    Overloaded,
}

impl Sessions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts every stanza queued from now on into `counter`.
    pub fn count_outbound(&self, counter: crate::http::metrics::ByKind) {
        let _ = self.outbound.set(counter);
    }

    /// Number of bound resources on this node.
    pub fn len(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Binds `full` to a connection. Returns the session it replaced (same full JID), which the
    /// caller closes with `conflict` and ends like any other (its presence goes unavailable).
    pub fn bind(&self, full: &FullJid, conn_id: u64, tx: OutboundTx) -> Option<Replaced> {
        let mut list = self.map.entry(full.to_bare()).or_default();
        let entry = Entry {
            resource: full.resource().to_string(),
            conn_id,
            tx,
            priority: 0,
            presence: None,
            roster_interested: false,
            carbons: false,
            directed: Vec::new(),
            hibernating: None,
            inactive: false,
            unacked_since: None,
        };
        if let Some(old) = list
            .iter_mut()
            .find(|e| e.resource == full.resource().as_str())
        {
            let prev = std::mem::replace(old, entry);
            return Some(Replaced {
                tx: prev.tx,
                presence: prev.presence,
                directed: prev.directed,
            });
        }
        // Most accounts have one resource: grow one entry at a time rather than by Vec's
        // default first step of four (an entry is ~200 bytes; this is memory per session).
        list.reserve_exact(1);
        list.push(entry);
        self.count.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Whether `resource` is bound for `bare`.
    pub fn is_bound(&self, full: &FullJid) -> bool {
        self.with(full, |_| ()).is_some()
    }

    /// Unbinds `full` if it still belongs to connection `conn_id` (it may have been replaced).
    /// Returns its last available presence and directed-presence list when it was removed.
    pub fn unbind(&self, full: &FullJid, conn_id: u64) -> Option<(Option<Element>, Vec<Jid>)> {
        let bare = full.to_bare();
        let mut removed = None;
        let now_empty = {
            let mut list = self.map.get_mut(&bare)?;
            if let Some(pos) = list
                .iter()
                .position(|e| e.resource == full.resource().as_str() && e.conn_id == conn_id)
            {
                let e = list.swap_remove(pos);
                self.count.fetch_sub(1, Ordering::Relaxed);
                removed = Some((e.presence, e.directed));
            }
            list.is_empty()
        };
        if now_empty {
            self.map.remove_if(&bare, |_, l| l.is_empty());
        }
        removed
    }

    fn with<R>(&self, full: &FullJid, f: impl FnOnce(&mut Entry) -> R) -> Option<R> {
        let mut list = self.map.get_mut(&full.to_bare())?;
        list.iter_mut()
            .find(|e| e.resource == full.resource().as_str())
            .map(f)
    }

    pub fn resources(&self, bare: &BareJid) -> Vec<ResourceInfo> {
        let Some(list) = self.map.get(bare) else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|e| {
                let jid = FullJid::from_parts(
                    bare.node(),
                    bare.domain(),
                    &jid::ResourcePart::new(&e.resource).ok()?,
                );
                Some(ResourceInfo {
                    jid,
                    priority: e.priority,
                    presence: e.presence.clone(),
                    roster_interested: e.roster_interested,
                    carbons: e.carbons,
                    hibernating: e.hibernating.is_some(),
                    inactive: e.inactive,
                    unacked_since: e.unacked_since,
                })
            })
            .collect()
    }

    /// Full JIDs of every bound resource of `bare`.
    pub fn bound(&self, bare: &BareJid) -> Vec<FullJid> {
        self.resources(bare).into_iter().map(|r| r.jid).collect()
    }

    pub fn set_presence(&self, full: &FullJid, presence: Option<(Element, i8)>) {
        self.with(full, |e| match presence {
            Some((p, prio)) => {
                e.presence = Some(p);
                e.priority = prio;
            }
            None => e.presence = None,
        });
    }

    pub fn set_carbons(&self, full: &FullJid, on: bool) {
        self.with(full, |e| e.carbons = on);
    }

    pub fn set_roster_interested(&self, full: &FullJid) {
        self.with(full, |e| e.roster_interested = true);
    }

    pub fn add_directed(&self, full: &FullJid, to: &Jid) {
        self.with(full, |e| {
            if !e.directed.contains(to) {
                e.directed.push(to.clone());
            }
        });
    }

    pub fn remove_directed(&self, full: &FullJid, to: &Jid) {
        self.with(full, |e| e.directed.retain(|j| j != to));
    }

    pub fn directed(&self, full: &FullJid) -> Vec<Jid> {
        self.with(full, |e| e.directed.clone()).unwrap_or_default()
    }

    /// Marks a session (of this binding) as waiting to be resumed, or live again. Returns the
    /// other sessions of the account that are waiting, oldest first.
    pub fn set_hibernating(
        &self,
        full: &FullJid,
        conn_id: u64,
        on: bool,
    ) -> Vec<(FullJid, OutboundTx)> {
        let bare = full.to_bare();
        let Some(mut list) = self.map.get_mut(&bare) else {
            return Vec::new();
        };
        if let Some(e) = list
            .iter_mut()
            .find(|e| e.resource == full.resource().as_str() && e.conn_id == conn_id)
        {
            e.hibernating = on.then(std::time::Instant::now);
        }
        let mut others: Vec<_> = list
            .iter()
            .filter(|e| e.resource != full.resource().as_str())
            .filter_map(|e| {
                let since = e.hibernating?;
                let res = jid::ResourcePart::new(&e.resource).ok()?;
                Some((
                    since,
                    FullJid::from_parts(bare.node(), bare.domain(), &res),
                    e.tx.clone(),
                ))
            })
            .collect();
        others.sort_by_key(|(since, _, _)| *since);
        others.into_iter().map(|(_, j, tx)| (j, tx)).collect()
    }

    pub fn set_inactive(&self, full: &FullJid, on: bool) {
        self.with(full, |e| e.inactive = on);
    }

    pub fn set_unacked_since(&self, full: &FullJid, since: Option<std::time::Instant>) {
        self.with(full, |e| e.unacked_since = since);
    }

    /// Tells one session to close (e.g. the oldest of too many waiting to be resumed).
    pub fn close_one(tx: &OutboundTx, err: StreamError) {
        close(tx, err)
    }

    /// Queues serialised bytes for one resource without waiting.
    pub fn send(&self, full: &FullJid, data: Bytes) -> Queued {
        let Some(tx) = self.with(full, |e| e.tx.clone()) else {
            return Queued::NoSuchResource;
        };
        // Bytes clone by reference count: kept to count the stanza once it is queued.
        let counted = self.outbound.get().map(|c| (c, data.clone()));
        match tx.try_send(Outbound::Data(data)) {
            Ok(()) => {
                if let Some((c, data)) = counted {
                    c.inc_serialised(&data);
                }
                Queued::Yes
            }
            Err(TrySendError::Closed(_)) => Queued::NoSuchResource,
            Err(TrySendError::Full(_)) => {
                tracing::warn!(jid = %full, "outbound queue full: disconnecting slow reader");
                close(
                    &tx,
                    StreamError::new(
                        crate::stream::StreamErrorKind::PolicyViolation,
                        "outbound queue limit reached: the client is not reading",
                    ),
                );
                Queued::Overloaded
            }
        }
    }

    /// Tells the session bound to `full` to close with `err`; false when there is none.
    pub fn close(&self, full: &FullJid, err: StreamError) -> bool {
        match self.with(full, |e| e.tx.clone()) {
            Some(tx) => {
                close(&tx, err);
                true
            }
            None => false,
        }
    }

    /// Tells every session of `bare` (or every session at all) to close with `err`.
    pub fn close_all(&self, bare: Option<&BareJid>, err: &StreamError) -> usize {
        let mut n = 0;
        let mut close_list = |list: &Vec<Entry>| {
            for e in list {
                close(&e.tx, err.clone());
                n += 1;
            }
        };
        match bare {
            Some(b) => {
                if let Some(l) = self.map.get(b) {
                    close_list(&l)
                }
            }
            None => self.map.iter().for_each(|l| close_list(&l)),
        }
        n
    }
}

/// Tells a session to close, after what is already queued. A full queue must not delay or lose
/// the close: it goes in past the bound (by one at most: when that place is taken, a close is
/// already queued), and the session's write timeout ends a connection that never drains.
fn close(tx: &OutboundTx, err: StreamError) {
    let _ = tx.send_past_bound(Outbound::Close(Box::new(err)));
}
