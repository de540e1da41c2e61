//! Offline storage (XEP-0160) on sled: a per-owner queue in key order.

use async_trait::async_trait;
use halyard_xep::host::{OfflineMessage, OfflineStore, StoreError, StoreResult};
use jid::BareJid;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::trees;
use super::{err, u64_at};

pub struct SledOffline {
    /// `owner \0 seq_be` → `ts_be ‖ stanza`.
    pub(crate) queue: sled::Tree,
    /// owner → (next seq, count), both u64 BE.
    pub(crate) meta: sled::Tree,
}

impl SledOffline {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledOffline> {
        Ok(SledOffline {
            queue: db.open_tree(trees::OFFLINE)?,
            meta: db.open_tree(trees::OFFLINE_META)?,
        })
    }

    /// Removes everything `owner` has waiting (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for kv in self.queue.scan_prefix(trees::owner_prefix(owner.as_str())) {
            batch.remove(kv.map_err(err("scanning offline queue"))?.0);
        }
        self.queue
            .apply_batch(batch)
            .map_err(err("removing offline queue"))?;
        self.meta
            .remove(owner.as_str())
            .map_err(err("removing offline counters"))?;
        Ok(())
    }
}

#[async_trait]
impl OfflineStore for SledOffline {
    async fn push(
        &self,
        owner: &BareJid,
        ts_micros: u64,
        stanza: &str,
        quota: usize,
    ) -> StoreResult<bool> {
        let owner_key = owner.as_str().as_bytes().to_vec();
        let res: Result<bool, TransactionError<()>> =
            (&self.queue, &self.meta).transaction(|(queue, meta)| {
                let m = meta.get(&owner_key)?;
                let (next, count) = m
                    .as_ref()
                    .map(|m| (u64_at(m, 0), u64_at(m, 8)))
                    .unwrap_or((0, 0));
                if count as usize >= quota {
                    return Ok(false);
                }
                let mut key = trees::owner_prefix(owner.as_str());
                key.extend_from_slice(&next.to_be_bytes());
                let mut value = ts_micros.to_be_bytes().to_vec();
                value.extend_from_slice(stanza.as_bytes());
                queue.insert(key, value)?;
                let mut m2 = (next + 1).to_be_bytes().to_vec();
                m2.extend_from_slice(&(count + 1).to_be_bytes());
                meta.insert(owner_key.as_slice(), m2)?;
                Ok::<bool, ConflictableTransactionError<()>>(true)
            });
        res.map_err(|e| StoreError {
            context: "offline push".into(),
            source: format!("{e:?}").into(),
        })
    }

    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<OfflineMessage>> {
        let prefix = trees::owner_prefix(owner.as_str());
        let mut out = Vec::new();
        for kv in self.queue.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(err("reading offline queue"))?;
            let seq = u64_at(&k, prefix.len());
            let stanza = String::from_utf8_lossy(v.get(8..).unwrap_or_default()).into_owned();
            out.push(OfflineMessage {
                seq,
                ts_micros: u64_at(&v, 0),
                stanza,
            });
        }
        Ok(out)
    }

    async fn remove(&self, owner: &BareJid, seqs: &[u64]) -> StoreResult<()> {
        let owner_key = owner.as_str().as_bytes().to_vec();
        let res: Result<(), TransactionError<()>> =
            (&self.queue, &self.meta).transaction(|(queue, meta)| {
                let mut removed = 0u64;
                for seq in seqs {
                    let mut key = trees::owner_prefix(owner.as_str());
                    key.extend_from_slice(&seq.to_be_bytes());
                    if queue.remove(key)?.is_some() {
                        removed += 1;
                    }
                }
                if let Some(m) = meta.get(&owner_key)? {
                    let mut m2 = u64_at(&m, 0).to_be_bytes().to_vec();
                    m2.extend_from_slice(&u64_at(&m, 8).saturating_sub(removed).to_be_bytes());
                    meta.insert(owner_key.as_slice(), m2)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            });
        res.map_err(|e| StoreError {
            context: "offline remove".into(),
            source: format!("{e:?}").into(),
        })
    }

    async fn count(&self, owner: &BareJid) -> StoreResult<usize> {
        let m = self
            .meta
            .get(owner.as_str())
            .map_err(err("reading offline counters"))?;
        Ok(m.map(|m| u64_at(&m, 8) as usize).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_ordered_bounded_and_removable() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SledOffline::open(&db).unwrap();
        let a = BareJid::new("a@x").unwrap();
        assert!(s.push(&a, 1, "<m1/>", 2).await.unwrap());
        assert!(s.push(&a, 2, "<m2/>", 2).await.unwrap());
        assert!(!s.push(&a, 3, "<m3/>", 2).await.unwrap(), "quota reached");
        let l = s.list(&a).await.unwrap();
        assert_eq!(
            l.iter().map(|m| m.stanza.as_str()).collect::<Vec<_>>(),
            vec!["<m1/>", "<m2/>"]
        );
        assert_eq!(l[0].ts_micros, 1);
        s.remove(&a, &[l[0].seq]).await.unwrap();
        assert_eq!(s.count(&a).await.unwrap(), 1);
        assert!(s.push(&a, 4, "<m4/>", 2).await.unwrap());
        let l = s.list(&a).await.unwrap();
        assert_eq!(
            l.iter().map(|m| m.stanza.as_str()).collect::<Vec<_>>(),
            vec!["<m2/>", "<m4/>"]
        );
        s.remove_owner(&a).unwrap();
        assert_eq!(s.count(&a).await.unwrap(), 0);
    }
}
