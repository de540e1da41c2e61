//! Exact restore (`halyard import`), and the few exact reads an export needs beyond the public
//! store traits (`halyard export`); the file format is the admin module's
//! (`crate::admin::portability`, documented in docs/export-format.md).
//!
//! The public traits cannot say everything a lossless copy needs: they bump roster versions,
//! allocate archive keys, stable ids and offline sequence numbers themselves, and hide whether a
//! row exists behind defaults (`version` 0, default archive preferences). [`Restore`] writes rows
//! with the values they had and reads the rows as stored, so that an export imported into an
//! empty store yields the same rows, byte for byte, in every tree.
//!
//! Restoring is meant for a store that holds nothing for the accounts concerned: the writers
//! refuse to replace an archived message, stable id or offline message that is already stored,
//! and [`Restore::put_account`] refuses an existing account.

use std::collections::BTreeSet;

use async_trait::async_trait;
use halyard_xep::host::{
    ArchiveKey, ArchivePrefs, OfflineMessage, RosterItem, StoreError, StoreResult,
};
use jid::BareJid;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::archive::Running;
use super::sled::SledStore;
use super::{err, trees, u64_at, Account, AccountError};

#[async_trait]
pub trait Restore: Send + Sync {
    // ---- exact reads (export) ----

    /// Every bare JID the store holds a row for, in any tree: accounts, and owners of rows
    /// whose account row is missing. Keys that are not valid JIDs are skipped (and logged).
    async fn owners(&self) -> StoreResult<Vec<BareJid>>;
    /// The stored roster version, `None` when no row exists (the roster trait says 0 then).
    async fn roster_version_row(&self, owner: &BareJid) -> StoreResult<Option<u64>>;
    /// The stored archive preferences, `None` when no row exists (the archive trait gives the
    /// defaults then).
    async fn archive_prefs_row(&self, owner: &BareJid) -> StoreResult<Option<ArchivePrefs>>;
    /// The offline queue's counters `(next_seq, count)`, `None` when no row exists.
    async fn offline_meta(&self, owner: &BareJid) -> StoreResult<Option<(u64, u64)>>;
    /// Whether the store holds an account row or any row owned by `owner`.
    async fn owns_anything(&self, owner: &BareJid) -> StoreResult<bool>;

    // ---- exact writes (import) ----

    /// Creates the account with exactly these credentials and creation time; fails with
    /// [`AccountError::Exists`] if it exists.
    async fn put_account(&self, user: &BareJid, account: &Account) -> Result<(), AccountError>;
    /// Stores a roster item as given, without bumping the roster version.
    async fn put_roster_item(&self, user: &BareJid, item: &RosterItem) -> StoreResult<()>;
    async fn set_roster_version(&self, user: &BareJid, version: u64) -> StoreResult<()>;
    /// Inserts an archived message under its exact key and stable id, with the running values
    /// (ordinals, byte total) it had when exported, or, for an export that has none, the ones
    /// `ArchiveStore::append` would give it (rows must then come oldest first). Fails if the key
    /// or the id is already in `owner`'s archive.
    async fn put_archived(
        &self,
        owner: &BareJid,
        key: ArchiveKey,
        id: &str,
        with: &str,
        stanza: &str,
        running: Option<Running>,
    ) -> StoreResult<()>;
    /// The running values stored with an archived message, for an exact export.
    async fn archive_running(
        &self,
        owner: &BareJid,
        key: ArchiveKey,
    ) -> StoreResult<Option<Running>>;
    /// Stores the preferences row as given (not flushed).
    async fn set_archive_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()>;
    /// Queues an offline message under its exact sequence number and time, updating the
    /// counters as `OfflineStore::push` does (next = max(next, seq + 1), count + 1), without a
    /// quota. Fails if that sequence number is already queued.
    async fn put_offline(&self, owner: &BareJid, msg: &OfflineMessage) -> StoreResult<()>;
    /// Sets the offline counters `(next_seq, count)` exactly.
    async fn set_offline_meta(&self, owner: &BareJid, next_seq: u64, count: u64)
        -> StoreResult<()>;
    /// Stores an app server device registration as given (owner, node and secret included).
    /// Fails if its node is already registered.
    async fn put_push_device(&self, reg: &crate::store::appserver::Registration)
        -> StoreResult<()>;
    /// Stores an upload's metadata row as given (the file is not part of an export). Fails if
    /// its id exists.
    async fn put_upload(&self, upload: &crate::store::upload::Upload) -> StoreResult<()>;
    /// A fresh archive sequence number, for imported messages that carry none.
    async fn new_seq(&self) -> StoreResult<u64>;
    /// Makes sure archive sequence numbers allocated from now on are above `max_seq`, so that
    /// a later append never reuses an imported one.
    async fn reserve_seqs(&self, max_seq: u64) -> StoreResult<()>;
    /// Removes every row `owner` owns, and the account row too when `with_account` (undoes a
    /// partly restored account).
    async fn discard(&self, owner: &BareJid, with_account: bool) -> StoreResult<()>;
    /// Makes every write so far durable.
    async fn flush(&self) -> StoreResult<()>;
}

fn fail(context: &str, msg: impl Into<String>) -> StoreError {
    StoreError {
        context: context.to_string(),
        source: msg.into().into(),
    }
}

fn tx_err(context: &str, conflict: &str) -> impl FnOnce(TransactionError<()>) -> StoreError {
    let (context, conflict) = (context.to_string(), conflict.to_string());
    move |e| match e {
        TransactionError::Abort(()) => fail(&context, conflict),
        TransactionError::Storage(e) => StoreError {
            context,
            source: Box::new(e),
        },
    }
}

fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&a.to_be_bytes());
    v[8..].copy_from_slice(&b.to_be_bytes());
    v
}

/// Adds every key of a tree keyed by owner.
fn keyed_owners(tree: &sled::Tree, out: &mut BTreeSet<Vec<u8>>) -> StoreResult<()> {
    for k in tree.iter().keys() {
        out.insert(k.map_err(err("listing owners"))?.to_vec());
    }
    Ok(())
}

/// Adds the owner of every row of a tree keyed `owner \0 ...`, seeking past each owner's rows.
fn prefixed_owners(tree: &sled::Tree, out: &mut BTreeSet<Vec<u8>>) -> StoreResult<()> {
    let mut from: Vec<u8> = Vec::new();
    while let Some(k) = tree.range(from.clone()..).keys().next() {
        let k = k.map_err(err("listing owners"))?;
        match k.iter().position(|&b| b == 0) {
            Some(nul) => {
                out.insert(k[..nul].to_vec());
                // The smallest key after every `owner \0 ...` key.
                from = k[..nul].to_vec();
                from.push(1);
            }
            None => {
                // Not a prefixed key: skip just this one.
                from = k.to_vec();
                from.push(0);
            }
        }
    }
    Ok(())
}

fn has_prefix(tree: &sled::Tree, prefix: &[u8]) -> StoreResult<bool> {
    Ok(tree
        .scan_prefix(prefix)
        .keys()
        .next()
        .transpose()
        .map_err(err("looking for owned rows"))?
        .is_some())
}

#[async_trait]
impl Restore for SledStore {
    async fn owners(&self) -> StoreResult<Vec<BareJid>> {
        let mut raw = BTreeSet::new();
        for t in [
            &self.accounts,
            &self.roster_version,
            &self.last,
            &self.offline.meta,
            &self.archive.prefs,
        ] {
            keyed_owners(t, &mut raw)?;
        }
        for t in [
            &self.roster,
            &self.offline.queue,
            &self.archive.messages,
            &self.push.regs,
            &self.push.queue,
            &self.appserver.devices,
            &self.uploads.rows,
        ] {
            prefixed_owners(t, &mut raw)?;
        }
        let mut out = Vec::with_capacity(raw.len());
        for k in raw {
            match std::str::from_utf8(&k)
                .ok()
                .and_then(|s| BareJid::new(s).ok())
            {
                Some(j) if j.as_str().as_bytes() == k.as_slice() => out.push(j),
                _ => tracing::warn!(
                    key = %String::from_utf8_lossy(&k),
                    "skipping rows whose owner is not a normalised bare JID"
                ),
            }
        }
        Ok(out)
    }

    async fn roster_version_row(&self, owner: &BareJid) -> StoreResult<Option<u64>> {
        Ok(self
            .roster_version
            .get(owner.as_str())
            .map_err(err("reading roster version"))?
            .map(|v| u64_at(&v, 0)))
    }

    async fn archive_prefs_row(&self, owner: &BareJid) -> StoreResult<Option<ArchivePrefs>> {
        match self
            .archive
            .prefs
            .get(owner.as_str())
            .map_err(err("reading archive preferences"))?
        {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError {
                    context: "decoding archive preferences".into(),
                    source: Box::new(e),
                }),
            None => Ok(None),
        }
    }

    async fn offline_meta(&self, owner: &BareJid) -> StoreResult<Option<(u64, u64)>> {
        Ok(self
            .offline
            .meta
            .get(owner.as_str())
            .map_err(err("reading offline counters"))?
            .map(|m| (u64_at(&m, 0), u64_at(&m, 8))))
    }

    async fn owns_anything(&self, owner: &BareJid) -> StoreResult<bool> {
        let key = owner.as_str().as_bytes();
        for t in [
            &self.accounts,
            &self.roster_version,
            &self.last,
            &self.offline.meta,
            &self.archive.prefs,
        ] {
            if t.contains_key(key).map_err(err("looking for owned rows"))? {
                return Ok(true);
            }
        }
        let prefix = trees::owner_prefix(owner.as_str());
        for t in [
            &self.roster,
            &self.offline.queue,
            &self.archive.messages,
            &self.archive.by_with,
            &self.archive.ids,
            &self.push.regs,
            &self.push.queue,
            &self.appserver.devices,
            &self.uploads.rows,
        ] {
            if has_prefix(t, &prefix)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn put_account(&self, user: &BareJid, account: &Account) -> Result<(), AccountError> {
        let v = serde_json::to_vec(account).map_err(|e| StoreError {
            context: "encoding account".into(),
            source: Box::new(e),
        })?;
        let swapped = self
            .accounts
            .compare_and_swap(user.as_str(), None as Option<&[u8]>, Some(v))
            .map_err(err("restoring account"))?;
        if swapped.is_err() {
            return Err(AccountError::Exists(user.clone()));
        }
        Ok(())
    }

    async fn put_roster_item(&self, user: &BareJid, item: &RosterItem) -> StoreResult<()> {
        let v = serde_json::to_vec(item).map_err(|e| StoreError {
            context: "encoding roster item".into(),
            source: Box::new(e),
        })?;
        self.roster
            .insert(trees::owner_key(user.as_str(), &item.jid), v)
            .map_err(err("restoring roster item"))?;
        Ok(())
    }

    async fn set_roster_version(&self, user: &BareJid, version: u64) -> StoreResult<()> {
        self.roster_version
            .insert(user.as_str(), &version.to_be_bytes())
            .map_err(err("restoring roster version"))?;
        Ok(())
    }

    async fn put_archived(
        &self,
        owner: &BareJid,
        key: ArchiveKey,
        id: &str,
        with: &str,
        stanza: &str,
        running: Option<Running>,
    ) -> StoreResult<()> {
        const CTX: &str = "restoring an archived message";
        if id.is_empty() || id.len() > u8::MAX as usize {
            return Err(fail(CTX, format!("id {id:?} must be 1 to 255 bytes")));
        }
        if with.len() > u16::MAX as usize {
            return Err(fail(CTX, "the `with` JID is longer than 65535 bytes"));
        }
        let a = &self.archive;
        let mut stripe = a.lock(owner);
        let taken = a.has_key(owner, key)? || a.find_id(owner, id)?.is_some();
        if taken {
            return Err(fail(
                CTX,
                format!(
                    "{owner}'s archive already holds id {id:?} or key ({}, {})",
                    key.ts_micros, key.seq
                ),
            ));
        }
        let run = match running {
            Some(r) => r,
            None => a.next_running(&mut stripe, owner, with)?.0,
        };
        // A restored row may land anywhere in the archive: the remembered tail no longer holds.
        stripe.forget(owner);
        a.write_rows(owner, key, id, with, stanza, run).map(|_| ())
    }

    async fn archive_running(
        &self,
        owner: &BareJid,
        key: ArchiveKey,
    ) -> StoreResult<Option<Running>> {
        self.archive.running(owner, key)
    }

    async fn set_archive_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()> {
        let v = serde_json::to_vec(prefs).map_err(|e| StoreError {
            context: "encoding archive preferences".into(),
            source: Box::new(e),
        })?;
        self.archive
            .prefs
            .insert(owner.as_str(), v)
            .map_err(err("restoring archive preferences"))?;
        Ok(())
    }

    async fn put_offline(&self, owner: &BareJid, msg: &OfflineMessage) -> StoreResult<()> {
        let o = &self.offline;
        let owner_key = owner.as_str().as_bytes().to_vec();
        let mut key = trees::owner_prefix(owner.as_str());
        key.extend_from_slice(&msg.seq.to_be_bytes());
        let mut value = msg.ts_micros.to_be_bytes().to_vec();
        value.extend_from_slice(msg.stanza.as_bytes());
        (&o.queue, &o.meta)
            .transaction(|(queue, meta)| {
                if queue.get(key.as_slice())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                let (next, count) = meta
                    .get(owner_key.as_slice())?
                    .map(|m| (u64_at(&m, 0), u64_at(&m, 8)))
                    .unwrap_or((0, 0));
                queue.insert(key.as_slice(), value.as_slice())?;
                let next = next.max(msg.seq.saturating_add(1));
                meta.insert(owner_key.as_slice(), &pair(next, count + 1)[..])?;
                Ok(())
            })
            .map_err(tx_err(
                "restoring an offline message",
                format!("{owner}'s offline queue already holds seq {}", msg.seq).as_str(),
            ))
    }

    async fn set_offline_meta(
        &self,
        owner: &BareJid,
        next_seq: u64,
        count: u64,
    ) -> StoreResult<()> {
        self.offline
            .meta
            .insert(owner.as_str(), &pair(next_seq, count)[..])
            .map_err(err("restoring offline counters"))?;
        Ok(())
    }

    async fn put_push_device(
        &self,
        reg: &crate::store::appserver::Registration,
    ) -> StoreResult<()> {
        self.appserver.put_exact(reg)
    }

    async fn put_upload(&self, upload: &crate::store::upload::Upload) -> StoreResult<()> {
        self.uploads.put_exact(upload)
    }

    async fn new_seq(&self) -> StoreResult<u64> {
        self.db
            .generate_id()
            .map_err(err("allocating an archive key"))
    }

    async fn reserve_seqs(&self, max_seq: u64) -> StoreResult<()> {
        // sled cannot set its id generator; reading ids until one exceeds `max_seq` advances it
        // (it persists its position, so this holds across restarts too). Costs one atomic
        // increment per id, so it runs off the async workers.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || loop {
            if db
                .generate_id()
                .map_err(err("advancing the archive key generator"))?
                > max_seq
            {
                return Ok(());
            }
        })
        .await
        .map_err(|e| fail("advancing the archive key generator", e.to_string()))?
    }

    async fn discard(&self, owner: &BareJid, with_account: bool) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for k in self
            .roster
            .scan_prefix(trees::owner_prefix(owner.as_str()))
            .keys()
        {
            batch.remove(k.map_err(err("scanning roster for removal"))?);
        }
        self.roster
            .apply_batch(batch)
            .map_err(err("removing roster"))?;
        self.roster_version
            .remove(owner.as_str())
            .map_err(err("removing roster version"))?;
        self.last
            .remove(owner.as_str())
            .map_err(err("removing last activity"))?;
        self.offline.remove_owner(owner)?;
        self.archive.remove_owner(owner)?;
        self.push.remove_owner(owner)?;
        self.appserver.remove_owner(owner)?;
        self.uploads.remove_owner(owner, false)?;
        if with_account {
            self.accounts
                .remove(owner.as_str())
                .map_err(err("removing account"))?;
        }
        Ok(())
    }

    async fn flush(&self) -> StoreResult<()> {
        super::flush_tree(&self.db)
            .await
            .map(|_| ())
            .map_err(err("flushing the store"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halyard_xep::host::{ArchiveStore, KeyRange, OfflineStore};

    fn j(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    #[tokio::test]
    async fn restored_archive_rows_match_appended_ones() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = SledStore::open(d1.path(), 1 << 20).unwrap();
        let b = SledStore::open(d2.path(), 1 << 20).unwrap();
        let me = j("me@x");
        for i in 0..5u64 {
            let with = if i % 2 == 0 { j("b@x") } else { j("c@x") };
            a.archive
                .append(&me, &with.into(), 100 + i / 2, &format!("<m n='{i}'/>"))
                .await
                .unwrap();
        }
        let all = a
            .archive
            .scan(&me, None, KeyRange::default(), false, 100)
            .await
            .unwrap();
        for (k, m) in &all {
            let run = a.archive_running(&me, *k).await.unwrap();
            b.put_archived(&me, *k, &m.id, &m.with, &m.stanza, run)
                .await
                .unwrap();
        }
        let (k, m) = &all[0];
        assert!(
            b.put_archived(&me, *k, "other", &m.with, "<x/>", None)
                .await
                .is_err(),
            "an existing key is refused"
        );
        for (ta, tb) in [
            (&a.archive.messages, &b.archive.messages),
            (&a.archive.by_with, &b.archive.by_with),
            (&a.archive.ids, &b.archive.ids),
        ] {
            let ra: Vec<_> = ta.iter().map(|r| r.unwrap()).collect();
            let rb: Vec<_> = tb.iter().map(|r| r.unwrap()).collect();
            assert_eq!(ra, rb);
        }
        let max = all.iter().map(|(k, _)| k.seq).max().unwrap();
        b.reserve_seqs(max + 10).await.unwrap();
        assert!(b.new_seq().await.unwrap() > max + 10);
    }

    #[tokio::test]
    async fn offline_counters_and_owners() {
        let d = tempfile::tempdir().unwrap();
        let s = SledStore::open(d.path(), 1 << 20).unwrap();
        let me = j("me@x");
        for (seq, ts) in [(3, 30), (7, 70)] {
            s.put_offline(
                &me,
                &OfflineMessage {
                    seq,
                    ts_micros: ts,
                    stanza: format!("<m{seq}/>"),
                },
            )
            .await
            .unwrap();
        }
        assert_eq!(s.offline_meta(&me).await.unwrap(), Some((8, 2)));
        let l = s.offline.list(&me).await.unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].seq, l[1].ts_micros), (7, 70));
        assert!(s.put_offline(&me, &l[0]).await.is_err());
        s.set_roster_version(&j("other@y"), 4).await.unwrap();
        assert_eq!(s.owners().await.unwrap(), vec![me.clone(), j("other@y")]);
        assert!(s.owns_anything(&me).await.unwrap());
        s.discard(&me, true).await.unwrap();
        assert!(!s.owns_anything(&me).await.unwrap());
        assert_eq!(s.owners().await.unwrap(), vec![j("other@y")]);
    }
}
