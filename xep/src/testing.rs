//! An in-memory [`Host`] for module tests: accounts, bound sessions (presence, priority, roster
//! interest, directed presence), roster and last-activity stores behind `Mutex<HashMap>`s, and a
//! log of every delivered stanza. It plays the router's part for presence hooks, iq handlers and
//! session ends, so tests drive modules the way the core does.
//!
//! Addresses may be written short: `a` is `a@example.com`, `a/r` is `a@example.com/r`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use jid::{BareJid, FullJid, Jid};
use minidom::rxml::Namespace;
use minidom::Element;

use crate::host::{
    ArchiveKey, ArchivePrefs, ArchiveStore, ArchivedMessage, Host, KeyRange, LastActivity,
    LastActivityStore, ModuleSettings, OfflineMessage, OfflineStore, PushJob, PushJobUpdate,
    PushKey, PushRegistration, PushStore, ResourceInfo, RosterItem, RosterStore, StoreResult,
};
use crate::ns;
use crate::registry::{Flow, IqReply, IqScope, Registry, Target};
use crate::stanza::{n, Kind, Stanza};

pub const DOMAIN: &str = "example.com";

/// Expands a short address (`a`, `a/r`) to a full one; leaves anything with `@` or the bare domain
/// alone.
pub fn addr(s: &str) -> String {
    if s.contains('@') || s == DOMAIN || s.starts_with(&format!("{DOMAIN}/")) {
        return s.to_owned();
    }
    match s.split_once('/') {
        Some((node, res)) => format!("{node}@{DOMAIN}/{res}"),
        None => format!("{s}@{DOMAIN}"),
    }
}

pub fn bare(s: &str) -> BareJid {
    BareJid::new(&addr(s)).expect("test bare JID")
}

pub fn full(s: &str) -> FullJid {
    FullJid::new(&addr(s)).expect("test full JID")
}

/// Parses test XML, adding the `jabber:client` namespace when it is missing and expanding a short
/// `to`.
pub fn xml(s: &str) -> Element {
    let head = s.find('>').map_or(s, |end| &s[..end]);
    let s = if head.contains("xmlns=") {
        s.to_owned()
    } else {
        let name_end = head.find([' ', '/']).unwrap_or(head.len());
        format!("{} xmlns='jabber:client'{}", &s[..name_end], &s[name_end..])
    };
    let mut el: Element = s.parse().expect("test XML");
    if let Some(to) = el.attr("to").map(addr) {
        el.set_attr(Namespace::NONE, n("to"), to);
    }
    el
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bound session as the core tracks it.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub priority: i8,
    pub presence: Option<Element>,
    pub interested: bool,
    pub carbons: bool,
    pub hibernating: bool,
    pub inactive: bool,
    pub unacked_since: Option<std::time::Instant>,
}

/// A user's roster version and items by contact.
type UserRoster = (u64, BTreeMap<String, RosterItem>);

#[derive(Default)]
pub struct MemRoster {
    users: Mutex<HashMap<BareJid, UserRoster>>,
}

#[async_trait]
impl RosterStore for MemRoster {
    async fn items(&self, user: &BareJid) -> StoreResult<Vec<RosterItem>> {
        Ok(lock(&self.users)
            .get(user)
            .map(|(_, m)| m.values().cloned().collect())
            .unwrap_or_default())
    }
    async fn item(&self, user: &BareJid, contact: &BareJid) -> StoreResult<Option<RosterItem>> {
        Ok(lock(&self.users)
            .get(user)
            .and_then(|(_, m)| m.get(contact.as_str()).cloned()))
    }
    async fn put(&self, user: &BareJid, item: &RosterItem) -> StoreResult<u64> {
        let mut users = lock(&self.users);
        let (ver, m) = users.entry(user.clone()).or_default();
        m.insert(item.jid.clone(), item.clone());
        *ver += 1;
        Ok(*ver)
    }
    async fn remove(&self, user: &BareJid, contact: &BareJid) -> StoreResult<u64> {
        let mut users = lock(&self.users);
        let (ver, m) = users.entry(user.clone()).or_default();
        m.remove(contact.as_str());
        *ver += 1;
        Ok(*ver)
    }
    async fn version(&self, user: &BareJid) -> StoreResult<u64> {
        Ok(lock(&self.users).get(user).map(|(v, _)| *v).unwrap_or(0))
    }
}

/// Offline storage in memory (XEP-0160).
#[derive(Default)]
pub struct MemOffline(Mutex<HashMap<BareJid, (u64, Vec<OfflineMessage>)>>);

#[async_trait]
impl OfflineStore for MemOffline {
    async fn push(
        &self,
        owner: &BareJid,
        ts_micros: u64,
        stanza: &str,
        quota: usize,
    ) -> StoreResult<bool> {
        let mut m = lock(&self.0);
        let (next, list) = m.entry(owner.clone()).or_default();
        if list.len() >= quota {
            return Ok(false);
        }
        *next += 1;
        list.push(OfflineMessage {
            seq: *next,
            ts_micros,
            stanza: stanza.to_string(),
        });
        Ok(true)
    }
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<OfflineMessage>> {
        Ok(lock(&self.0)
            .get(owner)
            .map(|(_, l)| l.clone())
            .unwrap_or_default())
    }
    async fn remove(&self, owner: &BareJid, seqs: &[u64]) -> StoreResult<()> {
        if let Some((_, l)) = lock(&self.0).get_mut(owner) {
            l.retain(|m| !seqs.contains(&m.seq));
        }
        Ok(())
    }
    async fn count(&self, owner: &BareJid) -> StoreResult<usize> {
        Ok(lock(&self.0).get(owner).map(|(_, l)| l.len()).unwrap_or(0))
    }
}

/// XEP-0357 registrations and notification queue in memory.
#[derive(Default)]
pub struct MemPush {
    regs: Mutex<BTreeMap<(BareJid, String, String), PushRegistration>>,
    pub jobs: Mutex<BTreeMap<PushKey, PushJob>>,
    wake: tokio::sync::Notify,
}

#[async_trait]
impl PushStore for MemPush {
    async fn registrations(&self, owner: &BareJid) -> StoreResult<Vec<PushRegistration>> {
        Ok(lock(&self.regs)
            .iter()
            .filter(|((o, _, _), _)| o == owner)
            .map(|(_, r)| r.clone())
            .collect())
    }
    async fn put_registration(&self, owner: &BareJid, reg: &PushRegistration) -> StoreResult<()> {
        lock(&self.regs).insert(
            (owner.clone(), reg.jid.clone(), reg.node.clone()),
            reg.clone(),
        );
        Ok(())
    }
    async fn remove_registrations(
        &self,
        owner: &BareJid,
        jid: &str,
        node: Option<&str>,
    ) -> StoreResult<usize> {
        let hit =
            |o: &BareJid, j: &str, n: &str| o == owner && j == jid && node.is_none_or(|x| x == n);
        let mut regs = lock(&self.regs);
        let before = regs.len();
        regs.retain(|(o, j, n), _| !hit(o, j, n));
        lock(&self.jobs).retain(|k, _| !hit(&k.owner, &k.jid, &k.node));
        Ok(before - regs.len())
    }
    async fn update_job(
        &self,
        key: &PushKey,
        f: PushJobUpdate<'_>,
    ) -> StoreResult<Option<PushJob>> {
        let mut jobs = lock(&self.jobs);
        let new = f(jobs.get(key).cloned());
        match &new {
            Some(j) => {
                jobs.insert(key.clone(), j.clone());
                if j.due_micros.is_some() {
                    self.wake.notify_one();
                }
            }
            None => {
                jobs.remove(key);
            }
        }
        Ok(new)
    }
    async fn due_jobs(
        &self,
        now_micros: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PushKey, PushJob)>> {
        let mut due: Vec<(PushKey, PushJob)> = lock(&self.jobs)
            .iter()
            .filter(|(_, j)| j.due_micros.is_some_and(|d| d <= now_micros))
            .map(|(k, j)| (k.clone(), j.clone()))
            .collect();
        due.sort_by_key(|(_, j)| j.due_micros);
        due.truncate(limit);
        Ok(due)
    }
    async fn next_due(&self) -> StoreResult<Option<u64>> {
        Ok(lock(&self.jobs).values().filter_map(|j| j.due_micros).min())
    }
    async fn clear_jobs(&self, owner: &BareJid) -> StoreResult<()> {
        lock(&self.jobs).retain(|k, _| k.owner != *owner);
        Ok(())
    }
    fn wakeup(&self) -> &tokio::sync::Notify {
        &self.wake
    }
}

#[derive(Default)]
pub struct MemLast(Mutex<HashMap<BareJid, LastActivity>>);

#[async_trait]
impl LastActivityStore for MemLast {
    async fn get(&self, user: &BareJid) -> StoreResult<Option<LastActivity>> {
        Ok(lock(&self.0).get(user).cloned())
    }
    async fn set(&self, user: &BareJid, last: &LastActivity) -> StoreResult<()> {
        lock(&self.0).insert(user.clone(), last.clone());
        Ok(())
    }
}

pub struct TestHost {
    registry: Registry,
    started: SystemTime,
    accounts: Mutex<HashSet<BareJid>>,
    sessions: Mutex<BTreeMap<FullJid, Session>>,
    /// Kept apart from `sessions` so that it outlives the unbinding until the session hooks ran.
    directed: Mutex<HashMap<FullJid, Vec<Jid>>>,
    roster: MemRoster,
    last: MemLast,
    /// Replaceable so that archive tests can plug in a full in-memory archive.
    pub archive: Box<dyn ArchiveStore>,
    offline: MemOffline,
    pub push: MemPush,
    pub settings: ModuleSettings,
    delivered: Mutex<Vec<(FullJid, Element)>>,
    routed: Mutex<Vec<Element>>,
    /// Replies [`Host::request`] hands out, oldest first (`None` in the queue = a timeout).
    pub request_replies: Mutex<std::collections::VecDeque<Option<Element>>>,
    /// Every iq sent with [`Host::request`].
    pub requests: Mutex<Vec<Element>>,
}

impl TestHost {
    /// A host with the given accounts (short names) and the roster and presence modules.
    pub fn new(accounts: &[&str]) -> Self {
        Self::with_modules(
            accounts,
            &[crate::roster::register, crate::presence::register],
        )
    }

    /// A host with the given accounts and exactly these modules registered, in order.
    pub fn with_modules(accounts: &[&str], modules: &[fn(&mut Registry)]) -> Self {
        let mut registry = Registry::new();
        for register in modules {
            register(&mut registry);
        }
        TestHost {
            registry,
            started: SystemTime::now(),
            accounts: Mutex::new(accounts.iter().map(|a| bare(a)).collect()),
            sessions: Mutex::default(),
            directed: Mutex::default(),
            roster: MemRoster::default(),
            archive: Box::new(NoArchive),
            offline: MemOffline::default(),
            push: MemPush::default(),
            settings: ModuleSettings::default(),
            last: MemLast::default(),
            delivered: Mutex::default(),
            routed: Mutex::default(),
            request_replies: Mutex::default(),
            requests: Mutex::default(),
        }
    }

    /// Binds a resource.
    pub fn bind(&self, jid: &str) {
        lock(&self.sessions).insert(full(jid), Session::default());
    }

    /// Changes a bound session's state (stream management, CSI) as those modules would.
    pub fn with_session(&self, jid: &str, f: impl FnOnce(&mut Session)) {
        if let Some(s) = lock(&self.sessions).get_mut(&full(jid)) {
            f(s);
        }
    }

    pub fn session(&self, jid: &str) -> Option<Session> {
        lock(&self.sessions).get(&full(jid)).cloned()
    }

    /// Stores an item directly (test setup).
    pub fn put_item(&self, user: &str, item: RosterItem) {
        let mut users = lock(&self.roster.users);
        let (ver, m) = users.entry(bare(user)).or_default();
        m.insert(item.jid.clone(), item);
        *ver += 1;
    }

    pub fn item(&self, user: &str, contact: &str) -> Option<RosterItem> {
        lock(&self.roster.users)
            .get(&bare(user))
            .and_then(|(_, m)| m.get(&addr(contact)).cloned())
    }

    fn stanza(&self, from: &str, xml_: &str) -> Stanza {
        let mut el = xml(xml_);
        let from = full(from);
        el.set_attr(Namespace::NONE, n("from"), from.to_string());
        let to = el.attr("to").map(|t| Jid::new(t).expect("test to"));
        Stanza {
            kind: Kind::of(&el).expect("a stanza"),
            from: from.into(),
            to,
            el,
        }
    }

    /// Runs the message hooks as the router does; true when one handled the stanza. The stanza
    /// as the hooks left it is returned too (hooks may add e.g. a stanza-id).
    pub async fn message(&self, from: &str, xml_: &str) -> (bool, Element) {
        let mut st = self.stanza(from, xml_);
        let target = match &st.to {
            None => Target::Bare,
            Some(to) if to.node().is_none() => Target::Host,
            Some(to) if to.is_full() => Target::Full,
            Some(_) => Target::Bare,
        };
        for hook in self.registry.message_hooks() {
            if hook.handle(self, &mut st, target).await == Flow::Handled {
                return (true, st.el);
            }
        }
        (false, st.el)
    }

    /// Runs the presence hooks as the router does; true when one handled the stanza.
    pub async fn presence(&self, from: &str, xml_: &str) -> bool {
        let mut st = self.stanza(from, xml_);
        let target = match &st.to {
            None => Target::Bare,
            Some(to) if to.node().is_none() => Target::Host,
            Some(to) if to.is_full() => Target::Full,
            Some(_) => Target::Bare,
        };
        for hook in self.registry.presence_hooks() {
            if hook.handle(self, &mut st, target).await == Flow::Handled {
                return true;
            }
        }
        false
    }

    /// Runs the account-scope iq handler for the payload's namespace.
    pub async fn iq(&self, from: &str, xml_: &str) -> IqReply {
        let st = self.stanza(from, xml_);
        let ns = st.payload().map(|p| p.ns()).unwrap_or_default();
        let handler = self
            .registry
            .iq_handler(IqScope::Account, &ns)
            .expect("an iq handler")
            .clone();
        handler.handle(self, &st).await
    }

    /// Ends a session as the core does: unbinds it (with its directed-presence list), then runs
    /// the session hooks with its last presence and that list.
    pub async fn end(&self, jid: &str) {
        let jid = full(jid);
        let presence = self.session(jid.as_str()).and_then(|s| s.presence);
        lock(&self.sessions).remove(&jid);
        let directed = lock(&self.directed).remove(&jid).unwrap_or_default();
        for hook in self.registry.session_hooks() {
            hook.ended(self, &jid, presence.as_ref(), &directed).await;
        }
    }

    pub fn directed(&self, jid: &str) -> Vec<Jid> {
        self.directed_presence(&full(jid))
    }

    /// Drains the delivery log.
    pub fn take(&self) -> Vec<(FullJid, Element)> {
        std::mem::take(&mut *lock(&self.delivered))
    }

    /// Drains the delivery log as one line per stanza (see [`summary`]).
    pub fn lines(&self) -> Vec<String> {
        self.take().iter().map(|(to, el)| summary(to, el)).collect()
    }

    pub fn routed(&self) -> Vec<Element> {
        lock(&self.routed).clone()
    }
}

/// A delivery as one short line: `b/r: subscribe a -> b` for presence (type `available` when
/// absent), `a/r: push b none ask` for a roster push, `a/r: error bad-request` for an error, the
/// XML otherwise; `@example.com` is left out.
pub fn summary(to: &FullJid, el: &Element) -> String {
    let line = if el.name() == "presence" && el.attr("type") == Some("error") {
        let cond = el
            .get_child("error", ns::CLIENT)
            .and_then(|e| e.children().next())
            .map(|c| c.name().to_owned());
        format!("{to}: error {}", cond.unwrap_or_default())
    } else if el.name() == "presence" {
        let t = el.attr("type").unwrap_or("available");
        format!(
            "{to}: {t} {} -> {}",
            el.attr("from").unwrap_or("?"),
            el.attr("to").unwrap_or("?")
        )
    } else if let Some(item) = el
        .get_child("query", ns::ROSTER)
        .and_then(|q| q.get_child("item", ns::ROSTER))
    {
        let mut s = format!(
            "{to}: push {} {}",
            item.attr("jid").unwrap_or("?"),
            item.attr("subscription").unwrap_or("?")
        );
        for flag in ["ask", "approved"] {
            if item.attr(flag).is_some() {
                s.push(' ');
                s.push_str(flag);
            }
        }
        s
    } else {
        String::from(el)
    };
    line.replace(&format!("@{DOMAIN}"), "")
}

#[async_trait]
impl Host for TestHost {
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn is_local_domain(&self, domain: &str) -> bool {
        domain == DOMAIN
    }
    fn started_at(&self) -> SystemTime {
        self.started
    }
    async fn route(&self, el: Element) {
        lock(&self.routed).push(el);
    }
    async fn request(&self, iq: Element, _timeout: std::time::Duration) -> Option<Element> {
        lock(&self.requests).push(iq);
        lock(&self.request_replies).pop_front().flatten()
    }
    fn deliver_raw(&self, to: &FullJid, xml_: String) -> bool {
        // The test log keeps elements, so the raw form is checked for well-formedness here.
        let el: Element = xml_.parse().expect("deliver_raw: one well-formed element");
        self.deliver(to, &el)
    }
    fn deliver(&self, to: &FullJid, el: &Element) -> bool {
        if !lock(&self.sessions).contains_key(to) {
            return false;
        }
        lock(&self.delivered).push((to.clone(), el.clone()));
        true
    }
    fn resources(&self, user: &BareJid) -> Vec<ResourceInfo> {
        lock(&self.sessions)
            .iter()
            .filter(|(jid, _)| jid.to_bare() == *user)
            .map(|(jid, s)| ResourceInfo {
                jid: jid.clone(),
                priority: s.priority,
                presence: s.presence.clone(),
                roster_interested: s.interested,
                carbons: s.carbons,
                hibernating: s.hibernating,
                inactive: s.inactive,
                unacked_since: s.unacked_since,
            })
            .collect()
    }
    fn set_presence(&self, full: &FullJid, presence: Option<(Element, i8)>) {
        if let Some(s) = lock(&self.sessions).get_mut(full) {
            match presence {
                Some((el, prio)) => (s.presence, s.priority) = (Some(el), prio),
                None => s.presence = None,
            }
        }
    }
    fn set_roster_interested(&self, full: &FullJid) {
        if let Some(s) = lock(&self.sessions).get_mut(full) {
            s.interested = true;
        }
    }
    fn add_directed_presence(&self, full: &FullJid, to: &Jid) {
        let mut directed = lock(&self.directed);
        let list = directed.entry(full.clone()).or_default();
        if !list.contains(to) {
            list.push(to.clone());
        }
    }
    fn remove_directed_presence(&self, full: &FullJid, to: &Jid) {
        if let Some(list) = lock(&self.directed).get_mut(full) {
            list.retain(|j| j != to);
        }
    }
    fn directed_presence(&self, full: &FullJid) -> Vec<Jid> {
        lock(&self.directed).get(full).cloned().unwrap_or_default()
    }
    async fn account_exists(&self, user: &BareJid) -> StoreResult<bool> {
        Ok(lock(&self.accounts).contains(user))
    }
    fn roster(&self) -> &dyn RosterStore {
        &self.roster
    }
    fn last_activity(&self) -> &dyn LastActivityStore {
        &self.last
    }
    fn set_carbons(&self, full: &FullJid, on: bool) {
        if let Some(s) = lock(&self.sessions).get_mut(full) {
            s.carbons = on;
        }
    }
    fn delivery_targets(&self, st: &Stanza) -> Vec<FullJid> {
        // The router's rules, simplified: a bound full JID, else the highest-priority available
        // resources with non-negative priority.
        let Some(to) = &st.to else { return Vec::new() };
        if let Ok(full) = to.try_as_full() {
            if lock(&self.sessions).contains_key(full) {
                return vec![full.clone()];
            }
        }
        let avail: Vec<ResourceInfo> = self
            .resources(&to.to_bare())
            .into_iter()
            .filter(|r| r.is_available() && r.priority >= 0)
            .collect();
        let top = avail.iter().map(|r| r.priority).max();
        avail
            .into_iter()
            .filter(|r| Some(r.priority) == top)
            .map(|r| r.jid)
            .collect()
    }
    fn archive(&self) -> &dyn ArchiveStore {
        self.archive.as_ref()
    }
    fn offline(&self) -> &dyn OfflineStore {
        &self.offline
    }
    fn push(&self) -> &dyn PushStore {
        &self.push
    }
    async fn durable(&self) -> StoreResult<()> {
        Ok(())
    }
    fn settings(&self) -> &ModuleSettings {
        &self.settings
    }
}

/// An archive that stores nothing, for tests of modules that do not read it.
pub struct NoArchive;

#[async_trait]
impl ArchiveStore for NoArchive {
    async fn append(&self, _: &BareJid, _: &Jid, _: u64, _: &str) -> StoreResult<String> {
        Ok(String::new())
    }
    async fn scan(
        &self,
        _: &BareJid,
        _: Option<&BareJid>,
        _: KeyRange,
        _: bool,
        _: usize,
    ) -> StoreResult<Vec<(ArchiveKey, ArchivedMessage)>> {
        Ok(Vec::new())
    }
    async fn locate(&self, _: &BareJid, _: &str) -> StoreResult<Option<ArchiveKey>> {
        Ok(None)
    }
    async fn get(&self, _: &BareJid, _: ArchiveKey) -> StoreResult<Option<ArchivedMessage>> {
        Ok(None)
    }
    async fn count(&self, _: &BareJid, _: Option<&BareJid>) -> StoreResult<u64> {
        Ok(0)
    }
    async fn prefs(&self, _: &BareJid) -> StoreResult<ArchivePrefs> {
        Ok(ArchivePrefs::default())
    }
    async fn set_prefs(&self, _: &BareJid, _: &ArchivePrefs) -> StoreResult<()> {
        Ok(())
    }
    async fn size(&self, _: &BareJid) -> StoreResult<(u64, u64)> {
        Ok((0, 0))
    }
    async fn prune(&self, _: Option<&BareJid>, _: u64) -> StoreResult<u64> {
        Ok(0)
    }
}

/// A complete in-memory archive (XEP-0313) over ordered maps, keeping [`ArchiveStore`]'s cost
/// contract in spirit: messages by key in a `BTreeMap`, a per-contact `BTreeSet` of keys, an id
/// index and O(1) counters. Keys take a global sequence, so ties on the timestamp keep arrival
/// order and ids are never reused, even after pruning.
#[derive(Default)]
pub struct MemArchive(Mutex<MemArchiveState>);

type KeySet = std::collections::BTreeSet<ArchiveKey>;

#[derive(Default)]
struct MemArchiveState {
    seq: u64,
    owners: HashMap<BareJid, OwnerArchive>,
}

#[derive(Default)]
struct OwnerArchive {
    messages: BTreeMap<ArchiveKey, ArchivedMessage>,
    by_with: HashMap<String, KeySet>,
    ids: HashMap<String, ArchiveKey>,
    bytes: u64,
    prefs: Option<ArchivePrefs>,
}

impl OwnerArchive {
    fn remove(&mut self, key: ArchiveKey) {
        if let Some(m) = self.messages.remove(&key) {
            self.ids.remove(&m.id);
            self.bytes -= m.stanza.len() as u64;
            if let Some(set) = self.by_with.get_mut(&m.with) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_with.remove(&m.with);
                }
            }
        }
    }
}

/// The exclusive bounds of `range` for `BTreeMap::range`, or `None` when nothing fits (the
/// standard library panics on an empty exclusive range).
fn mem_bounds(
    range: KeyRange,
) -> Option<(std::ops::Bound<ArchiveKey>, std::ops::Bound<ArchiveKey>)> {
    if let (Some(a), Some(b)) = (range.after, range.before) {
        if a >= b {
            return None;
        }
    }
    let lo = range
        .after
        .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
    let hi = range
        .before
        .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
    Some((lo, hi))
}

/// An unpredictable 64-bit value (SipHash under the process's random keys).
fn mem_random(seed: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seed);
    h.finish()
}

#[async_trait]
impl ArchiveStore for MemArchive {
    async fn append(
        &self,
        owner: &BareJid,
        with: &Jid,
        ts_micros: u64,
        stanza: &str,
    ) -> StoreResult<String> {
        let mut st = lock(&self.0);
        st.seq += 1;
        let seq = st.seq;
        let key = ArchiveKey { ts_micros, seq };
        let id = format!("{seq:x}-{:016x}", mem_random(seq));
        let with = with.to_bare().to_string();
        let a = st.owners.entry(owner.clone()).or_default();
        a.by_with.entry(with.clone()).or_default().insert(key);
        a.ids.insert(id.clone(), key);
        a.bytes += stanza.len() as u64;
        a.messages.insert(
            key,
            ArchivedMessage {
                id: id.clone(),
                ts_micros,
                with,
                stanza: stanza.to_owned(),
            },
        );
        Ok(id)
    }
    async fn scan(
        &self,
        owner: &BareJid,
        with: Option<&BareJid>,
        range: KeyRange,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<(ArchiveKey, ArchivedMessage)>> {
        let st = lock(&self.0);
        let (Some(a), Some(bounds)) = (st.owners.get(owner), mem_bounds(range)) else {
            return Ok(Vec::new());
        };
        let keys: Box<dyn DoubleEndedIterator<Item = &ArchiveKey>> = match with {
            None => Box::new(a.messages.range(bounds).map(|(k, _)| k)),
            Some(w) => match a.by_with.get(w.as_str()) {
                Some(set) => Box::new(set.range(bounds)),
                None => return Ok(Vec::new()),
            },
        };
        let keys: Box<dyn Iterator<Item = &ArchiveKey>> =
            if reverse { Box::new(keys.rev()) } else { keys };
        Ok(keys
            .take(limit)
            .map(|k| (*k, a.messages[k].clone()))
            .collect())
    }
    async fn locate(&self, owner: &BareJid, id: &str) -> StoreResult<Option<ArchiveKey>> {
        Ok(lock(&self.0)
            .owners
            .get(owner)
            .and_then(|a| a.ids.get(id).copied()))
    }
    async fn get(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<Option<ArchivedMessage>> {
        Ok(lock(&self.0)
            .owners
            .get(owner)
            .and_then(|a| a.messages.get(&key).cloned()))
    }
    async fn count(&self, owner: &BareJid, with: Option<&BareJid>) -> StoreResult<u64> {
        let st = lock(&self.0);
        let Some(a) = st.owners.get(owner) else {
            return Ok(0);
        };
        Ok(match with {
            None => a.messages.len(),
            Some(w) => a.by_with.get(w.as_str()).map_or(0, KeySet::len),
        } as u64)
    }
    async fn prefs(&self, owner: &BareJid) -> StoreResult<ArchivePrefs> {
        Ok(lock(&self.0)
            .owners
            .get(owner)
            .and_then(|a| a.prefs.clone())
            .unwrap_or_default())
    }
    async fn set_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()> {
        lock(&self.0).owners.entry(owner.clone()).or_default().prefs = Some(prefs.clone());
        Ok(())
    }
    async fn size(&self, owner: &BareJid) -> StoreResult<(u64, u64)> {
        Ok(lock(&self.0)
            .owners
            .get(owner)
            .map_or((0, 0), |a| (a.messages.len() as u64, a.bytes)))
    }
    async fn prune(&self, owner: Option<&BareJid>, before_micros: u64) -> StoreResult<u64> {
        let mut st = lock(&self.0);
        let mut removed = 0;
        for (who, a) in st.owners.iter_mut() {
            if owner.is_some_and(|o| o != who) {
                continue;
            }
            let old: Vec<ArchiveKey> = a
                .messages
                .range(
                    ..ArchiveKey {
                        ts_micros: before_micros,
                        seq: 0,
                    },
                )
                .map(|(k, _)| *k)
                .collect();
            removed += old.len() as u64;
            for k in old {
                a.remove(k);
            }
        }
        Ok(removed)
    }
}
