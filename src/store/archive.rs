//! The message archive (XEP-0313) on sled, as the ordered index `ArchiveStore` describes; the
//! query semantics are the `mam` module's.
//!
//! Layout (see trees.rs): messages keyed `owner \0 ts_be seq_be`, so a page is one range scan;
//! a per-contact index keyed `owner \0 with \0 ts_be seq_be`; stable ids → keys; counters per
//! owner and per contact, so counts never scan. Every append is one transaction over the four
//! trees, so a crash never leaves an index pointing nowhere.

use async_trait::async_trait;
use base64::Engine;
use halyard_xep::host::{
    ArchiveKey, ArchivePrefs, ArchiveStore, ArchivedMessage, KeyRange, StoreError, StoreResult,
};
use jid::{BareJid, Jid};
use rand::RngCore;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::trees;
use super::{err, u64_at};

pub struct SledArchive {
    pub(crate) db: sled::Db,
    pub(crate) messages: sled::Tree,
    pub(crate) by_with: sled::Tree,
    pub(crate) ids: sled::Tree,
    pub(crate) counts: sled::Tree,
    pub(crate) prefs: sled::Tree,
}

fn tx_err(context: &str) -> impl FnOnce(TransactionError<()>) -> StoreError + '_ {
    move |e| StoreError {
        context: context.to_string(),
        source: format!("{e:?}").into(),
    }
}

pub(crate) fn key_bytes(k: ArchiveKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&k.ts_micros.to_be_bytes());
    out[8..].copy_from_slice(&k.seq.to_be_bytes());
    out
}

fn key_from(b: &[u8]) -> ArchiveKey {
    ArchiveKey {
        ts_micros: u64_at(b, 0),
        seq: u64_at(b, 8),
    }
}

/// `prefix ‖ key`.
pub(crate) fn with_key(prefix: &[u8], k: ArchiveKey) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(&key_bytes(k));
    v
}

/// `owner \0 with \0`.
pub(crate) fn with_prefix(owner: &BareJid, with: &str) -> Vec<u8> {
    let mut p = trees::owner_key(owner.as_str(), with);
    p.push(0);
    p
}

/// Value of a message row: `id_len u8 ‖ id ‖ with_len u16 ‖ with ‖ stanza`.
pub(crate) fn encode(id: &str, with: &str, stanza: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(3 + id.len() + with.len() + stanza.len());
    v.push(id.len() as u8);
    v.extend_from_slice(id.as_bytes());
    v.extend_from_slice(&(with.len() as u16).to_be_bytes());
    v.extend_from_slice(with.as_bytes());
    v.extend_from_slice(stanza.as_bytes());
    v
}

fn decode(key: ArchiveKey, v: &[u8]) -> Option<ArchivedMessage> {
    let id_len = *v.first()? as usize;
    let id = std::str::from_utf8(v.get(1..1 + id_len)?).ok()?;
    let at = 1 + id_len;
    let with_len = u16::from_be_bytes(v.get(at..at + 2)?.try_into().ok()?) as usize;
    let with = std::str::from_utf8(v.get(at + 2..at + 2 + with_len)?).ok()?;
    let stanza = std::str::from_utf8(v.get(at + 2 + with_len..)?).ok()?;
    Some(ArchivedMessage {
        id: id.to_string(),
        ts_micros: key.ts_micros,
        with: with.to_string(),
        stanza: stanza.to_string(),
    })
}

/// Adds `delta` to a (count, bytes) counter row inside a transaction.
pub(crate) fn bump(
    t: &TransactionalTree,
    key: &[u8],
    count: i64,
    bytes: i64,
) -> Result<(), ConflictableTransactionError<()>> {
    let cur = t.get(key)?;
    let (c, b) = cur
        .as_ref()
        .map(|v| (u64_at(v, 0), u64_at(v, 8)))
        .unwrap_or((0, 0));
    let c = c.saturating_add_signed(count);
    let b = b.saturating_add_signed(bytes);
    if c == 0 {
        t.remove(key)?;
    } else {
        let mut v = c.to_be_bytes().to_vec();
        v.extend_from_slice(&b.to_be_bytes());
        t.insert(key, v)?;
    }
    Ok(())
}

fn new_id() -> String {
    let mut raw = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

impl SledArchive {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledArchive> {
        Ok(SledArchive {
            db: db.clone(),
            messages: db.open_tree(trees::ARCHIVE)?,
            by_with: db.open_tree(trees::ARCHIVE_WITH)?,
            ids: db.open_tree(trees::ARCHIVE_IDS)?,
            counts: db.open_tree(trees::ARCHIVE_COUNTS)?,
            prefs: db.open_tree(trees::ARCHIVE_PREFS)?,
        })
    }

    /// Removes one message and its index rows and counts.
    fn delete(&self, owner: &BareJid, key: ArchiveKey, value: &[u8]) -> StoreResult<()> {
        let Some(msg) = decode(key, value) else {
            return Ok(());
        };
        let prefix = trees::owner_prefix(owner.as_str());
        let wprefix = with_prefix(owner, &msg.with);
        let count_with = trees::owner_key(owner.as_str(), &msg.with);
        let len = value.len() as i64;
        (&self.messages, &self.by_with, &self.ids, &self.counts)
            .transaction(|(m, w, i, c)| {
                m.remove(with_key(&prefix, key))?;
                w.remove(with_key(&wprefix, key))?;
                i.remove(trees::owner_key(owner.as_str(), &msg.id))?;
                bump(c, &prefix, -1, -len)?;
                bump(c, &count_with, -1, -len)?;
                Ok(())
            })
            .map_err(tx_err("removing an archived message"))
    }

    /// Removes everything `owner` has archived, and its preferences (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        let prefix = trees::owner_prefix(owner.as_str());
        for tree in [&self.messages, &self.by_with, &self.ids, &self.counts] {
            let mut batch = sled::Batch::default();
            for kv in tree.scan_prefix(&prefix) {
                batch.remove(kv.map_err(err("scanning archive for removal"))?.0);
            }
            tree.apply_batch(batch)
                .map_err(err("removing archive rows"))?;
        }
        self.prefs
            .remove(owner.as_str())
            .map_err(err("removing archive preferences"))?;
        Ok(())
    }

    /// Owners with a non-empty archive.
    fn owners(&self) -> StoreResult<Vec<BareJid>> {
        let mut out = Vec::new();
        for kv in self.counts.iter() {
            let (k, _) = kv.map_err(err("listing archive owners"))?;
            // Owner total rows are exactly `owner \0`.
            if k.last() == Some(&0) && !k[..k.len() - 1].contains(&0) {
                if let Ok(j) = BareJid::new(&String::from_utf8_lossy(&k[..k.len() - 1])) {
                    out.push(j);
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ArchiveStore for SledArchive {
    async fn append(
        &self,
        owner: &BareJid,
        with: &Jid,
        ts_micros: u64,
        stanza: &str,
    ) -> StoreResult<String> {
        let with = with.to_bare();
        let seq = self
            .db
            .generate_id()
            .map_err(err("allocating an archive key"))?;
        let key = ArchiveKey { ts_micros, seq };
        let id = new_id();
        let value = encode(&id, with.as_str(), stanza);
        let prefix = trees::owner_prefix(owner.as_str());
        let wprefix = with_prefix(owner, with.as_str());
        let count_with = trees::owner_key(owner.as_str(), with.as_str());
        let id_key = trees::owner_key(owner.as_str(), &id);
        let len = value.len() as i64;
        (&self.messages, &self.by_with, &self.ids, &self.counts)
            .transaction(|(m, w, i, c)| {
                m.insert(with_key(&prefix, key), value.as_slice())?;
                w.insert(with_key(&wprefix, key), &[][..])?;
                i.insert(id_key.as_slice(), &key_bytes(key)[..])?;
                bump(c, &prefix, 1, len)?;
                bump(c, &count_with, 1, len)?;
                Ok(())
            })
            .map_err(tx_err("appending to the archive"))?;
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
        let prefix = match with {
            Some(w) => with_prefix(owner, w.as_str()),
            None => trees::owner_prefix(owner.as_str()),
        };
        // Exclusive bounds: the key just after `after`, up to (not including) `before`.
        let lo = match range.after {
            Some(k) => {
                let mut v = with_key(&prefix, k);
                v.push(0);
                v
            }
            None => prefix.clone(),
        };
        let hi = match range.before {
            Some(k) => with_key(&prefix, k),
            None => {
                let mut v = prefix.clone();
                v.extend_from_slice(&[0xff; 17]);
                v
            }
        };
        if lo >= hi {
            return Ok(Vec::new());
        }
        let tree = if with.is_some() {
            &self.by_with
        } else {
            &self.messages
        };
        let iter = tree.range(lo..hi);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if reverse {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        let owner_prefix = trees::owner_prefix(owner.as_str());
        let mut out = Vec::with_capacity(limit.min(1024));
        for kv in iter.take(limit) {
            let (k, v) = kv.map_err(err("scanning the archive"))?;
            let key = key_from(&k[prefix.len()..]);
            let value = if with.is_some() {
                match self
                    .messages
                    .get(with_key(&owner_prefix, key))
                    .map_err(err("reading an archived message"))?
                {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                v
            };
            if let Some(m) = decode(key, &value) {
                out.push((key, m));
            }
        }
        Ok(out)
    }

    async fn locate(&self, owner: &BareJid, id: &str) -> StoreResult<Option<ArchiveKey>> {
        Ok(self
            .ids
            .get(trees::owner_key(owner.as_str(), id))
            .map_err(err("looking up an archive id"))?
            .map(|v| key_from(&v)))
    }

    async fn get(&self, owner: &BareJid, key: ArchiveKey) -> StoreResult<Option<ArchivedMessage>> {
        let prefix = trees::owner_prefix(owner.as_str());
        Ok(self
            .messages
            .get(with_key(&prefix, key))
            .map_err(err("reading an archived message"))?
            .and_then(|v| decode(key, &v)))
    }

    async fn count(&self, owner: &BareJid, with: Option<&BareJid>) -> StoreResult<u64> {
        let k = match with {
            Some(w) => trees::owner_key(owner.as_str(), w.as_str()),
            None => trees::owner_prefix(owner.as_str()),
        };
        Ok(self
            .counts
            .get(k)
            .map_err(err("reading archive counters"))?
            .map(|v| u64_at(&v, 0))
            .unwrap_or(0))
    }

    async fn prefs(&self, owner: &BareJid) -> StoreResult<ArchivePrefs> {
        match self
            .prefs
            .get(owner.as_str())
            .map_err(err("reading archive preferences"))?
        {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError {
                context: "decoding archive preferences".into(),
                source: Box::new(e),
            }),
            None => Ok(ArchivePrefs::default()),
        }
    }

    async fn set_prefs(&self, owner: &BareJid, prefs: &ArchivePrefs) -> StoreResult<()> {
        let v = serde_json::to_vec(prefs).map_err(|e| StoreError {
            context: "encoding archive preferences".into(),
            source: Box::new(e),
        })?;
        self.prefs
            .insert(owner.as_str(), v)
            .map_err(err("writing archive preferences"))?;
        self.db
            .flush_async()
            .await
            .map_err(err("flushing archive preferences"))?;
        Ok(())
    }

    async fn size(&self, owner: &BareJid) -> StoreResult<(u64, u64)> {
        let v = self
            .counts
            .get(trees::owner_prefix(owner.as_str()))
            .map_err(err("reading archive counters"))?;
        Ok(v.map(|v| (u64_at(&v, 0), u64_at(&v, 8))).unwrap_or((0, 0)))
    }

    async fn prune(&self, owner: Option<&BareJid>, before_micros: u64) -> StoreResult<u64> {
        let owners = match owner {
            Some(o) => vec![o.clone()],
            None => self.owners()?,
        };
        let mut removed = 0;
        for owner in owners {
            let prefix = trees::owner_prefix(owner.as_str());
            let hi = with_key(
                &prefix,
                ArchiveKey {
                    ts_micros: before_micros,
                    seq: 0,
                },
            );
            // Collected first (bounded batches), deleted after, so no iterator spans the writes.
            loop {
                let batch: Vec<(ArchiveKey, sled::IVec)> = self
                    .messages
                    .range(prefix.clone()..hi.clone())
                    .take(1000)
                    .map(|kv| kv.map(|(k, v)| (key_from(&k[prefix.len()..]), v)))
                    .collect::<Result<_, _>>()
                    .map_err(err("scanning for expired archive entries"))?;
                if batch.is_empty() {
                    break;
                }
                for (key, value) in &batch {
                    self.delete(&owner, *key, value)?;
                    removed += 1;
                }
                // Yield between batches so delivery is never stalled behind a long prune.
                tokio::task::yield_now().await;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn j(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    #[tokio::test]
    async fn append_scan_locate_count_prune() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let a = SledArchive::open(&db).unwrap();
        let (me, b, c) = (j("me@x"), j("b@x"), j("c@x"));
        let mut ids = Vec::new();
        for i in 0..10u64 {
            let with: Jid = if i % 2 == 0 {
                b.clone().into()
            } else {
                c.clone().into()
            };
            ids.push(
                a.append(&me, &with, 1000 + i, &format!("<m n='{i}'/>"))
                    .await
                    .unwrap(),
            );
        }
        a.append(&j("other@x"), &b.clone().into(), 5, "<x/>")
            .await
            .unwrap();
        assert_eq!(a.count(&me, None).await.unwrap(), 10);
        assert_eq!(a.count(&me, Some(&b)).await.unwrap(), 5);
        let all = a
            .scan(&me, None, KeyRange::default(), false, 100)
            .await
            .unwrap();
        assert_eq!(all.len(), 10, "other owners' rows are not included");
        assert_eq!(all[0].1.stanza, "<m n='0'/>");
        let last3 = a
            .scan(&me, None, KeyRange::default(), true, 3)
            .await
            .unwrap();
        assert_eq!(
            last3
                .iter()
                .map(|(_, m)| m.stanza.as_str())
                .collect::<Vec<_>>(),
            vec!["<m n='9'/>", "<m n='8'/>", "<m n='7'/>"]
        );
        let k3 = a.locate(&me, &ids[3]).await.unwrap().unwrap();
        let k7 = a.locate(&me, &ids[7]).await.unwrap().unwrap();
        let mid = a
            .scan(
                &me,
                None,
                KeyRange {
                    after: Some(k3),
                    before: Some(k7),
                },
                false,
                100,
            )
            .await
            .unwrap();
        assert_eq!(mid.len(), 3);
        let withb = a
            .scan(
                &me,
                Some(&b),
                KeyRange {
                    after: Some(k3),
                    before: None,
                },
                false,
                100,
            )
            .await
            .unwrap();
        assert_eq!(
            withb
                .iter()
                .map(|(_, m)| m.stanza.as_str())
                .collect::<Vec<_>>(),
            vec!["<m n='4'/>", "<m n='6'/>", "<m n='8'/>"]
        );
        assert_eq!(a.get(&me, k3).await.unwrap().unwrap().id, ids[3]);
        assert!(a.locate(&me, "nope").await.unwrap().is_none());
        assert_eq!(a.prune(Some(&me), 1005).await.unwrap(), 5);
        assert_eq!(a.count(&me, None).await.unwrap(), 5);
        assert!(a.locate(&me, &ids[0]).await.unwrap().is_none());
        assert_eq!(a.prune(None, u64::MAX).await.unwrap(), 6);
        assert_eq!(a.size(&me).await.unwrap(), (0, 0));
    }
}
