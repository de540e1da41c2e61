//! Stream management (XEP-0198) and client state (XEP-0352) in the session: what a bound session
//! carries from one connection to the next, hibernation while no connection is attached, and
//! where its stanzas go when it ends for good.
//!
//! A bound session's state ([`Bound`]) does not depend on the transport, so a session bound on
//! WebSocket can resume on Direct TLS: the connection that resumes asks the session's current
//! owner (the old connection's task, or the hibernating task) for it through [`Resumable`], and
//! continues the same bound loop with it. The session's entry in the sessions table, and with it
//! its outbound queue, stays in place the whole time: senders never notice.
//!
//! The protocol's parsing and counter arithmetic are the `sm` and `csi` modules' (xep crate).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use halyard_xep::sm as proto;
use jid::{BareJid, FullJid};
use minidom::Element;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::server::Server;
use crate::sessions::{Outbound, OutboundRx};
use crate::stream::{StreamError, StreamErrorKind};

/// A bound session, whichever connection (if any) it is attached to.
pub struct Bound {
    pub full: FullJid,
    /// The binding's id in the sessions table (the connection that bound it).
    pub conn_id: u64,
    pub rx: OutboundRx,
    /// Boxed: most sessions never enable it, and an idle session should stay small.
    pub sm: Option<Box<Sm>>,
    /// Stanzas held back while the client is inactive (XEP-0352); `None` while active.
    pub held: Option<Box<Held>>,
    /// The read rate limits (`[limits]`): while in debt, nothing more is read.
    pub shaper: crate::limits::Shaper,
}

pub struct Sm {
    /// The resumption id, when the client asked for resumption.
    pub id: Option<String>,
    pub takeover: Option<mpsc::Receiver<Takeover>>,
    pub resume_timeout: Duration,
    /// Stanzas received from the client and handled.
    pub h_in: u32,
    /// Stanzas sent to the client (mod 2^32).
    pub sent: u32,
    /// Sent and not acknowledged, oldest first, with when they were sent.
    pub unacked: VecDeque<(Instant, Bytes)>,
    /// When the last unanswered `<r/>` went out.
    pub r_sent_at: Option<Instant>,
}

impl Sm {
    pub fn new(id: Option<String>, takeover: Option<mpsc::Receiver<Takeover>>, t: Duration) -> Sm {
        Sm {
            id,
            takeover,
            resume_timeout: t,
            h_in: 0,
            sent: 0,
            unacked: VecDeque::new(),
            r_sent_at: None,
        }
    }

    pub fn acked(&self) -> u32 {
        self.sent.wrapping_sub(self.unacked.len() as u32)
    }

    pub fn sent_one(&mut self, b: Bytes) {
        self.sent = self.sent.wrapping_add(1);
        self.unacked.push_back((Instant::now(), b));
    }

    /// Applies the peer's `h`.
    pub fn ack(&mut self, h: u32) -> Result<(), (u32, u32)> {
        let n = proto::newly_acked(self.acked(), h, self.sent).map_err(|()| (h, self.sent))?;
        self.unacked.drain(..n as usize);
        Ok(())
    }

    pub fn oldest_unacked(&self) -> Option<Instant> {
        self.unacked.front().map(|(t, _)| *t)
    }
}

/// The stream error for an ack of more than was sent (XEP-0198 §6).
pub fn too_high_error(h: u32, sent: u32) -> StreamError {
    StreamError::new(
        StreamErrorKind::UndefinedCondition,
        format!("you acknowledged {h} stanzas but were sent {sent}"),
    )
    .with_app(&proto::too_high(h, sent))
}

/// Held stanzas of an inactive client, in order; a stanza with a coalescing key replaces the
/// held one with the same key.
#[derive(Default)]
pub struct Held {
    pub items: Vec<(Option<String>, Bytes)>,
}

impl Held {
    pub fn hold(&mut self, key: Option<String>, b: Bytes) {
        if let Some(k) = &key {
            self.items.retain(|(other, _)| other.as_ref() != Some(k));
        }
        self.items.push((key, b));
    }
}

/// Asks the current owner of a resumable session to hand it over.
pub struct Takeover {
    pub h: u32,
    /// The session, or `(h, sent)` when `h` is more than was sent.
    pub reply: oneshot::Sender<Result<Box<Bound>, (u32, u32)>>,
}

struct Handle {
    bare: BareJid,
    tx: mpsc::Sender<Takeover>,
}

/// Why a resumption failed, as `<failed/>` says it.
pub struct Failed {
    pub condition: &'static str,
    pub h: Option<u32>,
    pub too_high: Option<(u32, u32)>,
}

impl Failed {
    pub fn element(&self) -> Element {
        let mut el = proto::failed(self.condition, self.h);
        if let Some((h, sent)) = self.too_high {
            el.append_child(proto::too_high(h, sent));
        }
        el
    }
}

/// Ended sessions remembered for `<failed h=.../>`.
const EXPIRED_KEPT: usize = 10_000;
const EXPIRED_FOR: Duration = Duration::from_secs(3600);

/// Resumable sessions of this node by resumption id.
#[derive(Default)]
pub struct Resumable {
    live: DashMap<String, Handle>,
    /// Ended ones: id → (account, h), so a late resume learns what was handled.
    expired: Mutex<HashMap<String, (BareJid, u32, Instant)>>,
}

impl Resumable {
    /// A fresh resumption id for a session of `bare`, and where takeover requests arrive.
    pub fn register(&self, bare: &BareJid) -> (String, mpsc::Receiver<Takeover>) {
        let (tx, rx) = mpsc::channel(1);
        let id: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(24)
            .map(char::from)
            .collect();
        self.live.insert(
            id.clone(),
            Handle {
                bare: bare.clone(),
                tx,
            },
        );
        (id, rx)
    }

    /// The session ended: it can no longer be resumed, but a late attempt learns `h`.
    pub fn expire(&self, id: &str, h: u32) {
        let Some((_, handle)) = self.live.remove(id) else {
            return;
        };
        let mut expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        if expired.len() >= EXPIRED_KEPT {
            let now = Instant::now();
            expired.retain(|_, (_, _, at)| now.duration_since(*at) < EXPIRED_FOR);
            if expired.len() >= EXPIRED_KEPT {
                expired.clear();
            }
        }
        expired.insert(id.to_string(), (handle.bare, h, Instant::now()));
    }

    /// Takes the session `id` over for `bare`, which has handled `h` of its stanzas.
    pub async fn take(&self, id: &str, bare: &BareJid, h: u32) -> Result<Box<Bound>, Failed> {
        let not_found = |h| Failed {
            condition: "item-not-found",
            h,
            too_high: None,
        };
        let tx = match self.live.get(id) {
            Some(handle) if handle.bare == *bare => Some(handle.tx.clone()),
            Some(_) => return Err(not_found(None)),
            None => None,
        };
        if let Some(tx) = tx {
            let (reply, answer) = oneshot::channel();
            let asked =
                tokio::time::timeout(Duration::from_secs(10), tx.send(Takeover { h, reply })).await;
            if matches!(asked, Ok(Ok(()))) {
                match tokio::time::timeout(Duration::from_secs(10), answer).await {
                    Ok(Ok(Ok(bound))) => return Ok(bound),
                    Ok(Ok(Err(too_high))) => {
                        return Err(Failed {
                            condition: "undefined-condition",
                            h: None,
                            too_high: Some(too_high),
                        })
                    }
                    _ => {}
                }
            }
        }
        // Gone (or going): the expired map may know what it handled.
        let expired = self.expired.lock().unwrap_or_else(|e| e.into_inner());
        match expired.get(id) {
            Some((owner, h, _)) if owner == bare => Err(not_found(Some(*h))),
            _ => Err(not_found(None)),
        }
    }
}

/// How a hibernating session's wait ended.
pub enum Hibernation {
    /// Handed to the connection that resumed it.
    Resumed,
    /// Over: it has to be ended.
    Ended(Box<Bound>),
}

/// Waits for the client to resume the session, keeping its stanzas meanwhile.
pub async fn hibernate(server: &Arc<Server>, mut b: Box<Bound>) -> Hibernation {
    let max = server.config.stream_management.max_unacked;
    let Some(timeout) = b.sm.as_ref().map(|s| s.resume_timeout) else {
        return Hibernation::Ended(b);
    };
    // What was held back for an inactive client goes with the rest on resumption.
    if let (Some(held), Some(sm)) = (b.held.as_mut(), b.sm.as_mut()) {
        for (_, bytes) in held.items.drain(..) {
            sm.sent_one(bytes);
        }
    }
    let others = server.sessions.set_hibernating(&b.full, b.conn_id, true);
    let limit = server.config.stream_management.max_hibernating_per_account;
    if others.len() >= limit {
        // Too many waiting for this account: the oldest ones end (their stanzas rerouted).
        for (jid, tx) in others.iter().take(others.len() + 1 - limit.max(1)) {
            tracing::info!(%jid, "too many sessions waiting to be resumed: ending the oldest");
            crate::sessions::Sessions::close_one(
                tx,
                StreamError::new(
                    StreamErrorKind::ResourceConstraint,
                    "too many sessions of this account waiting to be resumed",
                ),
            );
        }
    }
    tracing::info!(
        timeout_secs = timeout.as_secs(),
        "connection lost: waiting to be resumed"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shutdown = server.shutdown.clone();
    enum Event {
        Over,
        Takeover(Takeover),
        Stanza(Bytes),
    }
    loop {
        let event = {
            let Some(sm) = b.sm.as_mut() else {
                return Hibernation::Ended(b);
            };
            let takeover = async {
                match sm.takeover.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = crate::server::until_shutdown(&mut shutdown) => Event::Over,
                t = takeover => t.map_or(Event::Over, Event::Takeover),
                out = b.rx.recv() => match out {
                    Some(Outbound::Data(bytes)) => Event::Stanza(bytes),
                    Some(Outbound::Close(_)) | None => Event::Over,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("not resumed in time: ending the session");
                    Event::Over
                }
            }
        };
        let Some(sm) = b.sm.as_mut() else {
            return Hibernation::Ended(b);
        };
        match event {
            Event::Over => return Hibernation::Ended(b),
            Event::Stanza(bytes) => {
                sm.sent_one(bytes);
                if sm.unacked.len() > max {
                    tracing::info!(
                        "too many stanzas for a session waiting to be resumed: ending it"
                    );
                    return Hibernation::Ended(b);
                }
            }
            Event::Takeover(t) => match sm.ack(t.h) {
                Err(e) => {
                    let _ = t.reply.send(Err(e));
                }
                Ok(()) => {
                    server.sessions.set_hibernating(&b.full, b.conn_id, false);
                    match t.reply.send(Ok(b)) {
                        Ok(()) => return Hibernation::Resumed,
                        Err(back) => {
                            // The resuming connection went away meanwhile: keep waiting.
                            let Ok(back) = back else {
                                return Hibernation::Resumed;
                            };
                            b = back;
                            server.sessions.set_hibernating(&b.full, b.conn_id, true);
                        }
                    }
                }
            },
        }
    }
}

/// Ends a session for good: unbinds it (unless a newer binding took its place), reroutes every
/// stanza it did not acknowledge or never got, and runs the session-end hooks.
pub async fn finish(server: &Arc<Server>, mut b: Box<Bound>) {
    let removed = server.sessions.unbind(&b.full, b.conn_id);
    // Nothing more can be queued now; what is queued or unacknowledged goes elsewhere.
    let mut pending: Vec<Bytes> = Vec::new();
    if let Some(sm) = b.sm.as_mut() {
        if let Some(id) = &sm.id {
            server.sm.expire(id, sm.h_in);
        }
        pending.extend(sm.unacked.drain(..).map(|(_, b)| b));
    }
    if let Some(held) = b.held.as_mut() {
        pending.extend(held.items.drain(..).map(|(_, b)| b));
    }
    b.rx.close();
    while let Ok(out) = b.rx.try_recv() {
        if let Outbound::Data(bytes) = out {
            pending.push(bytes);
        }
    }
    if !pending.is_empty() {
        let mut counts = [0usize; 5];
        for bytes in pending {
            let Ok(el) = std::str::from_utf8(&bytes)
                .map_err(|_| ())
                .and_then(|s| s.parse::<Element>().map_err(|_| ()))
            else {
                continue;
            };
            let r = halyard_xep::offline::reroute(server.as_ref(), &b.full, el).await;
            counts[r as usize] += 1;
        }
        if let Err(e) = server.stores.durable.wait().await {
            tracing::warn!(error = %e, "flushing rerouted messages failed");
        }
        tracing::info!(
            delivered = counts[0],
            copied = counts[1],
            stored = counts[2],
            bounced = counts[3],
            dropped = counts[4],
            "rerouted what the session did not acknowledge"
        );
    }
    if let Some((presence, directed)) = removed {
        for hook in server.registry.session_hooks() {
            hook.ended(server.as_ref(), &b.full, presence.as_ref(), &directed)
                .await;
        }
    }
}
