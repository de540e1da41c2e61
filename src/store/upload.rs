//! XEP-0363 uploads on sled: one metadata row per slot or file, and the files themselves under
//! `<data_dir>/uploads/<id>` (`crate::upload` writes and serves them).
//!
//! A slot request reserves a row in state `pending` (its size counts against the quota until
//! the slot expires); the PUT claims it (`uploading`, so a slot is used once), and on success
//! marks it `stored` with the file's expiry. An expiry index lets the background task find what
//! is due without scanning every row: pending and uploading rows are due when their slot
//! expires, stored rows when the file expires (never, with `expires` 0).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use halyard_xep::host::{StoreError, StoreResult};
use jid::BareJid;
use serde::{Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::{err, trees};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadState {
    /// A slot was given out; nothing was uploaded yet.
    Pending,
    /// A PUT is in progress.
    Uploading,
    /// The file is stored and served.
    Stored,
}

/// One slot or file. Never holds the file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// Random, URL-safe: the first path segment after `/upload/`.
    pub id: String,
    /// The bare JID that requested the slot.
    pub owner: String,
    /// The sanitised file name (the last path segment).
    pub filename: String,
    pub size: u64,
    pub content_type: String,
    /// Seconds since the Unix epoch: when the slot was given (pending), or the file stored.
    pub created: u64,
    /// Seconds since the Unix epoch: when the slot expires (pending, uploading), or the file
    /// (stored; 0 = never).
    pub expires: u64,
    pub state: UploadState,
}

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error("the upload quota is reached: {used} of {quota} bytes in use")]
    Quota { used: u64, quota: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[async_trait]
pub trait UploadStore: Send + Sync {
    /// Stores a new pending slot unless `owner`'s bytes in use (stored and reserved) plus its
    /// size exceed `quota` (0: no quota).
    async fn reserve(&self, slot: &Upload, quota: u64) -> Result<(), ReserveError>;
    async fn get(&self, id: &str) -> StoreResult<Option<Upload>>;
    /// Moves a pending slot to uploading; `None` if it is not pending (unknown, in use, used).
    async fn claim(&self, id: &str) -> StoreResult<Option<Upload>>;
    /// Gives a claimed slot back (the upload failed; nothing was kept).
    async fn release(&self, id: &str) -> StoreResult<()>;
    /// Marks a claimed slot stored at `created`, expiring at `expires` (0: never). False if the
    /// slot is gone (it expired meanwhile).
    async fn complete(&self, id: &str, created: u64, expires: u64) -> StoreResult<bool>;
    /// Up to `limit` rows due at `now` (seconds).
    async fn due(&self, now: u64, limit: usize) -> StoreResult<Vec<Upload>>;
    /// Removes the row and its file (and any partial upload). True if there was a row.
    async fn remove(&self, id: &str) -> StoreResult<bool>;
    /// `owner`'s rows, by id.
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Upload>>;
    /// Where the file of `id` lives, and where its upload is written until complete.
    fn file_path(&self, id: &str) -> PathBuf;
    fn partial_path(&self, id: &str) -> PathBuf;
}

pub struct SledUploads {
    /// `owner \0 id` → JSON [`Upload`].
    pub(crate) rows: sled::Tree,
    /// id → owner.
    pub(crate) ids: sled::Tree,
    /// `due_be ‖ id` → empty.
    pub(crate) due: sled::Tree,
    dir: PathBuf,
    /// Serialises quota checks with the reservation they allow.
    reserve_lock: std::sync::Mutex<()>,
}

fn decode(v: &[u8]) -> StoreResult<Upload> {
    serde_json::from_slice(v).map_err(err("decoding an upload row"))
}

fn encode(u: &Upload) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(u).map_err(err("encoding an upload row"))
}

fn due_key(u: &Upload) -> Option<Vec<u8>> {
    if u.state == UploadState::Stored && u.expires == 0 {
        return None;
    }
    let mut k = u.expires.to_be_bytes().to_vec();
    k.extend_from_slice(u.id.as_bytes());
    Some(k)
}

/// Whether `id` is safe as a file name and a key: what [`crate::upload`] generates.
pub fn valid_id(id: &str) -> bool {
    (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

type Tx = ConflictableTransactionError<StoreError>;

fn unabortable(e: UnabortableTransactionError) -> Tx {
    e.into()
}

fn tx_fail(context: &str) -> impl FnOnce(TransactionError<StoreError>) -> StoreError + '_ {
    move |e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError {
            context: context.to_string(),
            source: Box::new(e),
        },
    }
}

fn abort(context: &str, msg: String) -> Tx {
    ConflictableTransactionError::Abort(StoreError {
        context: context.to_string(),
        source: msg.into(),
    })
}

/// Reads the row of `id` inside a transaction.
fn tx_row(
    ids: &TransactionalTree,
    rows: &TransactionalTree,
    id: &str,
) -> Result<Option<Upload>, Tx> {
    let Some(owner) = ids.get(id.as_bytes()).map_err(unabortable)? else {
        return Ok(None);
    };
    let key = trees::owner_key(&String::from_utf8_lossy(&owner), id);
    match rows.get(key).map_err(unabortable)? {
        Some(v) => decode(&v)
            .map(Some)
            .map_err(ConflictableTransactionError::Abort),
        None => Ok(None),
    }
}

/// Replaces `old` by `new` (same id and owner) in a transaction: row and expiry index.
fn tx_write(
    rows: &TransactionalTree,
    due: &TransactionalTree,
    old: &Upload,
    new: &Upload,
) -> Result<(), Tx> {
    if let Some(k) = due_key(old) {
        due.remove(k)?;
    }
    if let Some(k) = due_key(new) {
        due.insert(k, &[][..])?;
    }
    let v = encode(new).map_err(ConflictableTransactionError::Abort)?;
    rows.insert(trees::owner_key(&new.owner, &new.id), v)?;
    Ok(())
}

impl SledUploads {
    /// Opens the trees; files live under `dir` (created if missing).
    pub fn open(db: &sled::Db, dir: &Path) -> anyhow::Result<SledUploads> {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("cannot create the upload folder {}: {e}", dir.display())
        })?;
        Ok(SledUploads {
            rows: db.open_tree(trees::UPLOADS)?,
            ids: db.open_tree(trees::UPLOAD_IDS)?,
            due: db.open_tree(trees::UPLOAD_DUE)?,
            dir: dir.to_path_buf(),
            reserve_lock: std::sync::Mutex::new(()),
        })
    }

    /// Writes `u` as given (import): row, id and expiry index. Refuses an id that exists. Not
    /// flushed.
    pub fn put_exact(&self, u: &Upload) -> StoreResult<()> {
        const CTX: &str = "restoring an upload";
        if !valid_id(&u.id) {
            return Err(StoreError {
                context: CTX.into(),
                source: format!("upload id {:?} is not 16 to 64 URL-safe characters", u.id).into(),
            });
        }
        let key = trees::owner_key(&u.owner, &u.id);
        let v = encode(u)?;
        (&self.rows, &self.ids, &self.due)
            .transaction(|(rows, ids, due)| {
                if ids.get(u.id.as_bytes())?.is_some() {
                    return Err(abort(CTX, format!("upload id {:?} already exists", u.id)));
                }
                rows.insert(key.as_slice(), v.as_slice())?;
                ids.insert(u.id.as_bytes(), u.owner.as_bytes())?;
                if let Some(k) = due_key(u) {
                    due.insert(k, &[][..])?;
                }
                Ok(())
            })
            .map_err(tx_fail(CTX))
    }

    /// Removes `owner`'s rows; with `files`, their files too (account removal; an undone import
    /// leaves the files, which it did not write).
    pub fn remove_owner(&self, owner: &BareJid, files: bool) -> StoreResult<()> {
        for kv in self.rows.scan_prefix(trees::owner_prefix(owner.as_str())) {
            let (k, v) = kv.map_err(err("scanning uploads"))?;
            if let Ok(u) = decode(&v) {
                if files {
                    self.remove_files(&u.id);
                }
                self.ids
                    .remove(u.id.as_bytes())
                    .map_err(err("removing an upload id"))?;
                if let Some(d) = due_key(&u) {
                    self.due
                        .remove(d)
                        .map_err(err("removing an upload expiry"))?;
                }
            }
            self.rows.remove(k).map_err(err("removing an upload"))?;
        }
        Ok(())
    }

    fn remove_files(&self, id: &str) {
        if !valid_id(id) {
            return;
        }
        for p in [self.file_path(id), self.partial_path(id)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot delete an uploaded file")
                }
            }
        }
    }

    /// Bytes `owner` has stored or reserved.
    fn used(&self, owner: &str) -> StoreResult<u64> {
        let mut used = 0u64;
        for kv in self.rows.scan_prefix(trees::owner_prefix(owner)) {
            let (_, v) = kv.map_err(err("scanning uploads for the quota"))?;
            used = used.saturating_add(decode(&v)?.size);
        }
        Ok(used)
    }
}

#[async_trait]
impl UploadStore for SledUploads {
    async fn reserve(&self, slot: &Upload, quota: u64) -> Result<(), ReserveError> {
        let _guard = self.reserve_lock.lock().unwrap_or_else(|p| p.into_inner());
        if quota > 0 {
            let used = self.used(&slot.owner)?;
            if used.saturating_add(slot.size) > quota {
                return Err(ReserveError::Quota { used, quota });
            }
        }
        self.put_exact(slot)?;
        Ok(())
    }

    async fn get(&self, id: &str) -> StoreResult<Option<Upload>> {
        let Some(owner) = self
            .ids
            .get(id.as_bytes())
            .map_err(err("reading an upload id"))?
        else {
            return Ok(None);
        };
        let key = trees::owner_key(&String::from_utf8_lossy(&owner), id);
        match self.rows.get(key).map_err(err("reading an upload"))? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    async fn claim(&self, id: &str) -> StoreResult<Option<Upload>> {
        (&self.rows, &self.ids, &self.due)
            .transaction(|(rows, ids, due)| {
                let Some(old) = tx_row(ids, rows, id)? else {
                    return Ok(None);
                };
                if old.state != UploadState::Pending {
                    return Ok(None);
                }
                let new = Upload {
                    state: UploadState::Uploading,
                    ..old.clone()
                };
                tx_write(rows, due, &old, &new)?;
                Ok(Some(new))
            })
            .map_err(tx_fail("claiming an upload slot"))
    }

    async fn release(&self, id: &str) -> StoreResult<()> {
        (&self.rows, &self.ids, &self.due)
            .transaction(|(rows, ids, due)| {
                if let Some(old) = tx_row(ids, rows, id)? {
                    if old.state == UploadState::Uploading {
                        let new = Upload {
                            state: UploadState::Pending,
                            ..old.clone()
                        };
                        tx_write(rows, due, &old, &new)?;
                    }
                }
                Ok(())
            })
            .map_err(tx_fail("releasing an upload slot"))
    }

    async fn complete(&self, id: &str, created: u64, expires: u64) -> StoreResult<bool> {
        let done = (&self.rows, &self.ids, &self.due)
            .transaction(|(rows, ids, due)| {
                let Some(old) = tx_row(ids, rows, id)? else {
                    return Ok(false);
                };
                if old.state != UploadState::Uploading {
                    return Ok(false);
                }
                let new = Upload {
                    state: UploadState::Stored,
                    created,
                    expires,
                    ..old.clone()
                };
                tx_write(rows, due, &old, &new)?;
                Ok(true)
            })
            .map_err(tx_fail("completing an upload"))?;
        super::flush_tree(&self.rows)
            .await
            .map_err(err("flushing after an upload"))?;
        Ok(done)
    }

    async fn due(&self, now: u64, limit: usize) -> StoreResult<Vec<Upload>> {
        let mut out = Vec::new();
        let end = now.saturating_add(1).to_be_bytes();
        for k in self.due.range(..end.as_slice()).keys().take(limit) {
            let k = k.map_err(err("scanning upload expiry"))?;
            let id = String::from_utf8_lossy(k.get(8..).unwrap_or_default()).into_owned();
            match self.get(&id).await? {
                Some(u) => out.push(u),
                None => {
                    // An index entry without its row (cannot happen through this store): drop it.
                    self.due
                        .remove(&k)
                        .map_err(err("removing an upload expiry"))?;
                }
            }
        }
        Ok(out)
    }

    async fn remove(&self, id: &str) -> StoreResult<bool> {
        let removed = (&self.rows, &self.ids, &self.due)
            .transaction(|(rows, ids, due)| {
                let Some(old) = tx_row(ids, rows, id)? else {
                    return Ok(false);
                };
                if let Some(k) = due_key(&old) {
                    due.remove(k)?;
                }
                ids.remove(id.as_bytes())?;
                rows.remove(trees::owner_key(&old.owner, id))?;
                Ok(true)
            })
            .map_err(tx_fail("removing an upload"))?;
        self.remove_files(id);
        Ok(removed)
    }

    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Upload>> {
        self.rows
            .scan_prefix(trees::owner_prefix(owner.as_str()))
            .map(|kv| decode(&kv.map_err(err("listing uploads"))?.1))
            .collect()
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn partial_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.part"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, owner: &str, size: u64, expires: u64) -> Upload {
        Upload {
            id: id.into(),
            owner: owner.into(),
            filename: "a.png".into(),
            size,
            content_type: "image/png".into(),
            created: 1,
            expires,
            state: UploadState::Pending,
        }
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccc";

    #[tokio::test]
    async fn upload_slot_lifecycle_quota_and_expiry() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(d.path().join("db"))
            .open()
            .unwrap();
        let s = SledUploads::open(&db, &d.path().join("files")).unwrap();
        let me = BareJid::new("me@x").unwrap();
        s.reserve(&slot(A, "me@x", 60, 100), 100).await.unwrap();
        match s.reserve(&slot(B, "me@x", 50, 100), 100).await {
            Err(ReserveError::Quota {
                used: 60,
                quota: 100,
            }) => {}
            other => panic!("{other:?}"),
        }
        s.reserve(&slot(B, "me@x", 40, 100), 100).await.unwrap();
        assert!(
            s.reserve(&slot(B, "other@x", 1, 100), 0).await.is_err(),
            "ids are unique"
        );

        assert_eq!(
            s.claim(A).await.unwrap().unwrap().state,
            UploadState::Uploading
        );
        assert!(
            s.claim(A).await.unwrap().is_none(),
            "a slot is claimed once"
        );
        s.release(A).await.unwrap();
        assert!(
            s.claim(A).await.unwrap().is_some(),
            "released, it can be claimed again"
        );
        std::fs::write(s.file_path(A), b"x").unwrap();
        assert!(s.complete(A, 5, 0).await.unwrap());
        assert!(
            s.claim(A).await.unwrap().is_none(),
            "a stored file is not a slot"
        );
        let a = s.get(A).await.unwrap().unwrap();
        assert_eq!((a.state, a.created, a.expires), (UploadState::Stored, 5, 0));

        // Due: B's slot at 100; A never.
        assert!(s.due(99, 10).await.unwrap().is_empty());
        let due = s.due(100, 10).await.unwrap();
        assert_eq!(
            due.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
            vec![B]
        );
        assert!(s.remove(B).await.unwrap());
        assert!(s.due(1000, 10).await.unwrap().is_empty());
        assert_eq!(s.list(&me).await.unwrap().len(), 1);

        s.reserve(&slot(C, "me@x", 1, 50), 0).await.unwrap();
        s.remove_owner(&me, true).unwrap();
        assert!(s.list(&me).await.unwrap().is_empty());
        assert!(s.get(A).await.unwrap().is_none());
        assert!(
            !s.file_path(A).exists(),
            "account removal deletes the files"
        );
        assert!(s.due(u64::MAX - 1, 10).await.unwrap().is_empty());
    }

    #[test]
    fn upload_ids_are_checked() {
        assert!(valid_id(A));
        assert!(!valid_id("short"));
        assert!(!valid_id("../../../../etc/passwd/xxxxxxxx"));
        assert!(!valid_id("aaaaaaaaaaaaaaaaaaaaaa.part"));
    }
}
