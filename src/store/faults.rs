//! Write refusal: wraps a node's stores so that writes (and flushes, the group
//! commit's included) fail with an I/O error, as on a full disk (`ENOSPC`) or a read-only file
//! system (`EROFS`), while reads keep working. Switched at run time through a [`FaultSwitch`];
//! the failing call does nothing (the write is refused before it reaches the backend). Tests
//! inject faults with it; the disk guard ([`super::diskguard`]) switches it when the data
//! folder's disk is nearly full or read-only.
//!
//! Export and import (`Stores::restore`) are not wrapped: they are offline tools.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use halyard_xep::host::{
    ArchiveKey, ArchivePrefs, ArchiveStore, ArchivedMessage, KeyRange, LastActivity,
    LastActivityStore, OfflineMessage, OfflineStore, PushJob, PushJobUpdate, PushKey,
    PushRegistration, PushStore, RosterItem, RosterStore, StoreError, StoreResult,
};
use jid::{BareJid, Jid};

use super::appserver::{Provider, RegisterError, Registration, RegistrationStore};
use super::tokens::{TokenRecord, TokenStore};
use super::upload::{ReserveError, Upload, UploadStore};
use super::{Account, AccountError, AccountStore, Stores};

/// Which failure writes get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ENOSPC`: no space left on device.
    NoSpace,
    /// `EROFS`: read-only file system.
    ReadOnly,
}

/// Turns write failures on and off for every store wrapped with it.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<AtomicU8>);

impl FaultSwitch {
    pub fn new() -> FaultSwitch {
        FaultSwitch::default()
    }

    /// From now on writes fail with `fault`; `None` lets them through again.
    pub fn set(&self, fault: Option<Fault>) {
        let v = match fault {
            None => 0,
            Some(Fault::NoSpace) => 1,
            Some(Fault::ReadOnly) => 2,
        };
        self.0.store(v, Ordering::SeqCst);
    }

    pub fn get(&self) -> Option<Fault> {
        match self.0.load(Ordering::SeqCst) {
            1 => Some(Fault::NoSpace),
            2 => Some(Fault::ReadOnly),
            _ => None,
        }
    }

    /// `Err` with the injected error when a fault is on.
    pub fn check(&self, what: &str) -> StoreResult<()> {
        let io = match self.get() {
            None => return Ok(()),
            Some(Fault::NoSpace) => std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (os error 28, injected)",
            ),
            Some(Fault::ReadOnly) => std::io::Error::new(
                std::io::ErrorKind::ReadOnlyFilesystem,
                "Read-only file system (os error 30, injected)",
            ),
        };
        Err(StoreError {
            context: what.to_string(),
            source: Box::new(io),
        })
    }
}

impl Stores {
    /// These stores with every write and flush going through `switch` first. `group_commit` is
    /// the window of the new group commit, whose flushes fail too while the switch is on.
    pub fn with_faults(self, switch: FaultSwitch, group_commit: Duration) -> Stores {
        let s = switch.clone();
        let inner_flush = self.flush.clone();
        let flush: super::group_commit::Flusher = Arc::new(move || {
            s.check("flushing the store")?;
            inner_flush()
        });
        Stores {
            accounts: Arc::new(wrap(&switch, self.accounts)),
            roster: Arc::new(wrap(&switch, self.roster)),
            last: Arc::new(wrap(&switch, self.last)),
            archive: Arc::new(wrap(&switch, self.archive)),
            offline: Arc::new(wrap(&switch, self.offline)),
            push: Arc::new(wrap(&switch, self.push)),
            appserver: Arc::new(wrap(&switch, self.appserver)),
            uploads: Arc::new(wrap(&switch, self.uploads)),
            tokens: Arc::new(wrap(&switch, self.tokens)),
            restore: self.restore,
            stats: self.stats,
            durable: Arc::new(super::group_commit::GroupCommit::start_with(
                group_commit,
                flush.clone(),
            )),
            flush,
        }
    }
}

fn wrap<T: ?Sized>(switch: &FaultSwitch, inner: Arc<T>) -> Faulty<T> {
    Faulty {
        inner,
        switch: switch.clone(),
    }
}

/// One wrapped store.
struct Faulty<T: ?Sized> {
    inner: Arc<T>,
    switch: FaultSwitch,
}

impl<T: ?Sized> Faulty<T> {
    fn check(&self, what: &str) -> StoreResult<()> {
        self.switch.check(what)
    }
}

#[async_trait]
impl AccountStore for Faulty<dyn AccountStore> {
    async fn create(&self, user: &BareJid, account: &Account) -> Result<(), AccountError> {
        self.check("creating account")?;
        self.inner.create(user, account).await
    }
    async fn get(&self, user: &BareJid) -> StoreResult<Option<Account>> {
        self.inner.get(user).await
    }
    async fn exists(&self, user: &BareJid) -> StoreResult<bool> {
        self.inner.exists(user).await
    }
    async fn update(&self, user: &BareJid, account: &Account) -> Result<(), AccountError> {
        self.check("updating account")?;
        self.inner.update(user, account).await
    }
    async fn remove(&self, user: &BareJid) -> Result<(), AccountError> {
        self.check("removing account")?;
        self.inner.remove(user).await
    }
    async fn list(&self) -> StoreResult<Vec<BareJid>> {
        self.inner.list().await
    }
}

#[async_trait]
impl RosterStore for Faulty<dyn RosterStore> {
    async fn items(&self, user: &BareJid) -> StoreResult<Vec<RosterItem>> {
        self.inner.items(user).await
    }
    async fn item(&self, user: &BareJid, contact: &BareJid) -> StoreResult<Option<RosterItem>> {
        self.inner.item(user, contact).await
    }
    async fn put(&self, user: &BareJid, item: &RosterItem) -> StoreResult<u64> {
        self.check("writing roster item")?;
        self.inner.put(user, item).await
    }
    async fn remove(&self, user: &BareJid, contact: &BareJid) -> StoreResult<u64> {
        self.check("removing roster item")?;
        self.inner.remove(user, contact).await
    }
    async fn version(&self, user: &BareJid) -> StoreResult<u64> {
        self.inner.version(user).await
    }
}

#[async_trait]
impl LastActivityStore for Faulty<dyn LastActivityStore> {
    async fn get(&self, user: &BareJid) -> StoreResult<Option<LastActivity>> {
        self.inner.get(user).await
    }
    async fn set(&self, user: &BareJid, last: &LastActivity) -> StoreResult<()> {
        self.check("writing last activity")?;
        self.inner.set(user, last).await
    }
}

#[async_trait]
impl ArchiveStore for Faulty<dyn ArchiveStore> {
    async fn append(
        &self,
        owner: &BareJid,
        with: &Jid,
        ts_micros: u64,
        stanza: &str,
    ) -> StoreResult<String> {
        self.check("archiving")?;
        self.inner.append(owner, with, ts_micros, stanza).await
    }
    async fn scan(
        &self,
        owner: &BareJid,
        with: Option<&BareJid>,
        range: KeyRange,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<(ArchiveKey, ArchivedMessage)>> {
        self.inner.scan(owner, with, range, reverse, limit).await
    }
    async fn locate(&self, owner: &BareJid, id: &str) -> StoreResult<Option<ArchiveKey>> {
        self.inner.locate(owner, id).await
    }
    async fn get(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<Option<ArchivedMessage>> {
        self.inner.get(owner, key).await
    }
    async fn count(&self, owner: &BareJid, with: Option<&BareJid>) -> StoreResult<u64> {
        self.inner.count(owner, with).await
    }
    async fn prefs(&self, owner: &BareJid) -> StoreResult<ArchivePrefs> {
        self.inner.prefs(owner).await
    }
    async fn set_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()> {
        self.check("writing archive preferences")?;
        self.inner.set_prefs(owner, prefs).await
    }
    async fn size(&self, owner: &BareJid) -> StoreResult<(u64, u64)> {
        self.inner.size(owner).await
    }
    async fn prune(&self, owner: Option<&BareJid>, before_micros: u64) -> StoreResult<u64> {
        self.check("pruning the archive")?;
        self.inner.prune(owner, before_micros).await
    }
}

#[async_trait]
impl OfflineStore for Faulty<dyn OfflineStore> {
    async fn push(
        &self,
        owner: &BareJid,
        ts_micros: u64,
        stanza: &str,
        quota: usize,
    ) -> StoreResult<bool> {
        self.check("storing an offline message")?;
        self.inner.push(owner, ts_micros, stanza, quota).await
    }
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<OfflineMessage>> {
        self.inner.list(owner).await
    }
    async fn remove(&self, owner: &BareJid, seqs: &[u64]) -> StoreResult<()> {
        self.check("removing offline messages")?;
        self.inner.remove(owner, seqs).await
    }
    async fn count(&self, owner: &BareJid) -> StoreResult<usize> {
        self.inner.count(owner).await
    }
}

#[async_trait]
impl PushStore for Faulty<dyn PushStore> {
    async fn registrations(&self, owner: &BareJid) -> StoreResult<Vec<PushRegistration>> {
        self.inner.registrations(owner).await
    }
    async fn put_registration(&self, owner: &BareJid, reg: &PushRegistration) -> StoreResult<()> {
        self.check("writing a push registration")?;
        self.inner.put_registration(owner, reg).await
    }
    async fn remove_registrations(
        &self,
        owner: &BareJid,
        jid: &str,
        node: Option<&str>,
    ) -> StoreResult<usize> {
        self.check("removing push registrations")?;
        self.inner.remove_registrations(owner, jid, node).await
    }
    async fn update_job(
        &self,
        key: &PushKey,
        f: PushJobUpdate<'_>,
    ) -> StoreResult<Option<PushJob>> {
        self.check("updating the push queue")?;
        self.inner.update_job(key, f).await
    }
    async fn due_jobs(
        &self,
        now_micros: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PushKey, PushJob)>> {
        self.inner.due_jobs(now_micros, limit).await
    }
    async fn next_due(&self) -> StoreResult<Option<u64>> {
        self.inner.next_due().await
    }
    async fn clear_jobs(&self, owner: &BareJid) -> StoreResult<()> {
        self.check("clearing the push queue")?;
        self.inner.clear_jobs(owner).await
    }
    fn wakeup(&self) -> &tokio::sync::Notify {
        self.inner.wakeup()
    }
}

#[async_trait]
impl RegistrationStore for Faulty<dyn RegistrationStore> {
    async fn register(
        &self,
        owner: &BareJid,
        device_id: &str,
        provider: Provider,
        token: &str,
        max_devices: usize,
    ) -> Result<Registration, RegisterError> {
        self.check("registering a device")?;
        self.inner
            .register(owner, device_id, provider, token, max_devices)
            .await
    }
    async fn by_node(&self, node: &str) -> StoreResult<Option<Registration>> {
        self.inner.by_node(node).await
    }
    async fn unregister(
        &self,
        owner: &BareJid,
        device_id: &str,
    ) -> StoreResult<Option<Registration>> {
        self.check("unregistering a device")?;
        self.inner.unregister(owner, device_id).await
    }
    async fn remove_dead(&self, node: &str, token: &str) -> StoreResult<bool> {
        self.check("removing a dead device")?;
        self.inner.remove_dead(node, token).await
    }
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Registration>> {
        self.inner.list(owner).await
    }
}

#[async_trait]
impl UploadStore for Faulty<dyn UploadStore> {
    async fn reserve(&self, slot: &Upload, quota: u64) -> Result<(), ReserveError> {
        self.check("reserving an upload slot")?;
        self.inner.reserve(slot, quota).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<Upload>> {
        self.inner.get(id).await
    }
    async fn claim(&self, id: &str) -> StoreResult<Option<Upload>> {
        self.check("claiming an upload slot")?;
        self.inner.claim(id).await
    }
    async fn release(&self, id: &str) -> StoreResult<()> {
        self.check("releasing an upload slot")?;
        self.inner.release(id).await
    }
    async fn complete(&self, id: &str, created: u64, expires: u64) -> StoreResult<bool> {
        self.check("completing an upload")?;
        self.inner.complete(id, created, expires).await
    }
    async fn due(&self, now: u64, limit: usize) -> StoreResult<Vec<Upload>> {
        self.inner.due(now, limit).await
    }
    async fn remove(&self, id: &str) -> StoreResult<bool> {
        self.check("removing an upload")?;
        self.inner.remove(id).await
    }
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Upload>> {
        self.inner.list(owner).await
    }
    fn file_path(&self, id: &str) -> PathBuf {
        self.inner.file_path(id)
    }
    fn partial_path(&self, id: &str) -> PathBuf {
        self.inner.partial_path(id)
    }
}

#[async_trait]
impl TokenStore for Faulty<dyn TokenStore> {
    async fn insert(&self, hash: &[u8; 32], rec: &TokenRecord) -> StoreResult<()> {
        self.check("writing a token")?;
        self.inner.insert(hash, rec).await
    }
    async fn get(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        self.inner.get(hash).await
    }
    async fn remove(&self, hash: &[u8; 32]) -> StoreResult<bool> {
        self.check("removing a token")?;
        self.inner.remove(hash).await
    }
    async fn purge_expired(&self, now: u64) -> StoreResult<usize> {
        self.check("purging tokens")?;
        self.inner.purge_expired(now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_fail_while_on_reads_work_and_flushes_fail() {
        let dir = tempfile::tempdir().unwrap();
        let switch = FaultSwitch::new();
        let s = Stores::open_sled(dir.path(), Duration::from_millis(1), 8 << 20)
            .unwrap()
            .with_faults(switch.clone(), Duration::from_millis(1));
        let a = BareJid::new("a@x").unwrap();
        let item = RosterItem {
            jid: "b@x".into(),
            in_roster: true,
            ..Default::default()
        };
        s.roster.put(&a, &item).await.unwrap();
        s.durable.wait().await.unwrap();

        switch.set(Some(Fault::NoSpace));
        let e = s.roster.put(&a, &item).await.unwrap_err();
        assert!(e.is_storage_full(), "{e}");
        assert_eq!(s.roster.items(&a).await.unwrap(), vec![item.clone()]);
        let e = s.durable.wait().await.unwrap_err();
        assert!(e.is_storage_full(), "the group commit fails too: {e}");
        assert!((s.flush)().is_err());

        switch.set(Some(Fault::ReadOnly));
        let e = s.offline.push(&a, 1, "<message/>", 10).await.unwrap_err();
        assert!(!e.is_storage_full());
        assert!(e.to_string().contains("Read-only"), "{e}");

        switch.set(None);
        assert!(s.offline.push(&a, 1, "<message/>", 10).await.unwrap());
        s.durable.wait().await.unwrap();
    }
}
