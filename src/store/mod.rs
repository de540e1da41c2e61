//! Storage: traits the core and modules persist through, and the embedded sled backend.
//!
//! Modules' store traits (roster, last activity) are defined in `halyard-xep` next to the
//! modules; the account store is the core's. [`Stores`] bundles the implementations a node runs
//! with, so a shared backend (PostgreSQL) can later replace sled without touching a module.

pub mod appserver;
pub mod archive;
pub mod diskguard;
pub mod faults;
pub mod group_commit;
pub mod offline;
pub mod push;
pub mod restore;
pub mod sled;
pub mod tokens;
pub mod trees;
pub mod upload;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use halyard_xep::host::{
    ArchiveStore, LastActivityStore, OfflineStore, PushStore, RosterStore, StoreResult,
};
use jid::BareJid;
use serde::{Deserialize, Serialize};

use crate::sasl::scram::{Hash, StoredCredentials};

/// Creates the data directory (and missing parents) readable by the server's user only: it holds
/// password verifiers, token hashes, message archives and keys. A directory that already exists
/// keeps its mode; one that others can enter is reported.
pub fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create data_dir {}: {e}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(dir) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    data_dir = %dir.display(),
                    mode = %format!("{mode:o}"),
                    "data_dir is open to other users; it holds password verifiers and messages: chmod 700 it"
                );
            }
        }
    }
    Ok(())
}

/// Wraps a backend error with what was being done. The context is copied only on error, so the
/// happy path allocates nothing.
pub(crate) fn err<E: std::error::Error + Send + Sync + 'static>(
    context: &str,
) -> impl FnOnce(E) -> halyard_xep::host::StoreError + '_ {
    move |e| halyard_xep::host::StoreError {
        context: context.to_string(),
        source: io_visible(e),
    }
}

/// `e` as a boxed error; sled's I/O errors become `std::io::Error`s (sled's error type hides
/// its source), so callers can tell a full disk from other failures
/// ([`halyard_xep::host::StoreError::is_storage_full`]).
pub(crate) fn io_visible<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    match (&e as &dyn std::any::Any).downcast_ref::<::sled::Error>() {
        Some(::sled::Error::Io(io)) => Box::new(std::io::Error::new(io.kind(), e.to_string())),
        _ => Box::new(e),
    }
}

/// The big-endian u64 at `at`, or 0 when `b` is too short (a row written by an older layout).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// What is stored for an account: SCRAM credentials per hash (RFC 5802 §3), never the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub scram: BTreeMap<String, StoredCredentials>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

impl Account {
    pub fn credentials(&self, hash: Hash) -> Option<&StoredCredentials> {
        self.scram.get(hash.mechanism(false))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("account {0} already exists")]
    Exists(BareJid),
    #[error("account {0} does not exist")]
    NotFound(BareJid),
    #[error(transparent)]
    Store(#[from] halyard_xep::host::StoreError),
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates an account; fails if it exists. Durable when it returns.
    async fn create(&self, user: &BareJid, account: &Account) -> Result<(), AccountError>;
    async fn get(&self, user: &BareJid) -> StoreResult<Option<Account>>;
    /// Whether the account exists, without decoding it (asked for every routed stanza).
    async fn exists(&self, user: &BareJid) -> StoreResult<bool>;
    /// Replaces the credentials of an existing account. Durable when it returns.
    async fn update(&self, user: &BareJid, account: &Account) -> Result<(), AccountError>;
    /// Removes the account and everything it owns. Durable when it returns.
    async fn remove(&self, user: &BareJid) -> Result<(), AccountError>;
    async fn list(&self) -> StoreResult<Vec<BareJid>>;
}

/// The stores one node runs with.
#[derive(Clone)]
pub struct Stores {
    pub accounts: Arc<dyn AccountStore>,
    pub roster: Arc<dyn RosterStore>,
    pub last: Arc<dyn LastActivityStore>,
    pub archive: Arc<dyn ArchiveStore>,
    pub offline: Arc<dyn OfflineStore>,
    /// XEP-0357 registrations and the notification queue.
    pub push: Arc<dyn PushStore>,
    /// Devices registered with the XEP-0357 app server.
    pub appserver: Arc<dyn appserver::RegistrationStore>,
    /// XEP-0363 upload slots and files.
    pub uploads: Arc<dyn upload::UploadStore>,
    /// Exact reads and writes for export and import (`halyard export|import`).
    pub restore: Arc<dyn restore::Restore>,
    /// Group commit: waits until every earlier write is on disk.
    pub durable: Arc<group_commit::GroupCommit>,
    /// Makes every acknowledged write durable (called at shutdown).
    pub flush: Arc<dyn Fn() -> StoreResult<()> + Send + Sync>,
    /// Bearer tokens of the HTTP API.
    pub tokens: Arc<dyn tokens::TokenStore>,
    /// Figures for `/metrics` and the admin API.
    pub stats: Arc<dyn StoreStats>,
}

/// Figures about the store as a whole.
pub trait StoreStats: Send + Sync {
    /// Bytes the store takes on disk.
    fn size_on_disk(&self) -> StoreResult<u64>;
    /// Push notifications (XEP-0357) scheduled and not yet sent.
    fn push_queue_depth(&self) -> StoreResult<u64>;
}

impl Stores {
    /// Opens the embedded sled store under `data_dir`; `group_commit` is the window in which
    /// flush requests are gathered into one flush, `cache_bytes` the page cache. Needs a tokio
    /// runtime.
    pub fn open_sled(
        data_dir: &std::path::Path,
        group_commit: std::time::Duration,
        cache_bytes: u64,
    ) -> anyhow::Result<Stores> {
        let s = Arc::new(sled::SledStore::open(data_dir, cache_bytes)?);
        let f = s.clone();
        let db = s.db.clone();
        Ok(Stores {
            accounts: s.clone(),
            roster: s.clone(),
            archive: s.archive.clone(),
            offline: s.offline.clone(),
            push: s.push.clone(),
            appserver: s.appserver.clone(),
            uploads: s.uploads.clone(),
            restore: s.clone(),
            tokens: s.tokens.clone(),
            stats: s.clone(),
            last: s,
            durable: Arc::new(group_commit::GroupCommit::start(db, group_commit)),
            flush: Arc::new(move || f.flush()),
        })
    }
}

/// Writes sled's log to disk, on a blocking thread. Never `flush_async`: concurrent
/// `flush_async` calls deadlock in sled 0.34 (spacejam/sled#1308, #1241) — seen here when many
/// accounts were created at once, which would also stall the group commit and every ack.
pub(crate) async fn flush_tree(tree: &::sled::Tree) -> ::sled::Result<usize> {
    let tree = tree.clone();
    match tokio::task::spawn_blocking(move || tree.flush()).await {
        Ok(r) => r,
        Err(e) => Err(::sled::Error::ReportableBug(format!(
            "the flush task failed: {e}"
        ))),
    }
}
