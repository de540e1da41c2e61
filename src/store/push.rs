//! XEP-0357 push registrations and the durable notification queue on sled.
//!
//! Three trees (see [`trees`]): registrations and queue rows keyed `owner \0 jid \0 node`, and a
//! due index keyed `due_be ‖ owner \0 jid \0 node` that a queue row and its index entry only ever
//! change together, in one transaction.

use async_trait::async_trait;
use halyard_xep::host::{
    PushJob, PushJobUpdate, PushKey, PushRegistration, PushStore, StoreError, StoreResult,
};
use jid::BareJid;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::Notify;

use super::{err, trees, u64_at};

pub struct SledPush {
    /// `owner \0 jid \0 node` → JSON [`PushRegistration`].
    pub(crate) regs: sled::Tree,
    /// `owner \0 jid \0 node` → JSON [`PushJob`].
    pub(crate) queue: sled::Tree,
    /// `due_be ‖ owner \0 jid \0 node` → empty.
    pub(crate) due: sled::Tree,
    wake: Notify,
}

/// `owner \0 jid \0 node`.
pub(crate) fn row_key(owner: &str, jid: &str, node: &str) -> Vec<u8> {
    let mut k = trees::owner_key(owner, jid);
    k.push(0);
    k.extend_from_slice(node.as_bytes());
    k
}

/// The registration a row key names.
fn parse_key(k: &[u8]) -> Option<PushKey> {
    let mut parts = k.splitn(3, |b| *b == 0);
    let owner = std::str::from_utf8(parts.next()?).ok()?;
    let jid = std::str::from_utf8(parts.next()?).ok()?;
    let node = std::str::from_utf8(parts.next()?).ok()?;
    Some(PushKey {
        owner: BareJid::new(owner).ok()?,
        jid: jid.to_string(),
        node: node.to_string(),
    })
}

fn due_key(due: u64, row: &[u8]) -> Vec<u8> {
    let mut k = due.to_be_bytes().to_vec();
    k.extend_from_slice(row);
    k
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(v).map_err(err(&format!("decoding {what}")))
}

fn tx_failed(context: &str) -> impl FnOnce(TransactionError<String>) -> StoreError + '_ {
    move |e| StoreError {
        context: context.to_string(),
        source: match e {
            TransactionError::Abort(msg) => msg.into(),
            TransactionError::Storage(e) => Box::new(e),
        },
    }
}

impl SledPush {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledPush> {
        Ok(SledPush {
            regs: db.open_tree(trees::PUSH_REGISTRATIONS)?,
            queue: db.open_tree(trees::PUSH_QUEUE)?,
            due: db.open_tree(trees::PUSH_DUE)?,
            wake: Notify::new(),
        })
    }

    /// Applies `f` to the queue row at `row` and its due index entry, atomically.
    fn update_row(&self, row: &[u8], f: PushJobUpdate<'_>) -> StoreResult<Option<PushJob>> {
        let res: Result<Option<PushJob>, TransactionError<String>> = (&self.queue, &self.due)
            .transaction(|(queue, due)| {
                let old: Option<PushJob> = match queue.get(row)? {
                    Some(v) => Some(serde_json::from_slice(&v).map_err(|e| {
                        ConflictableTransactionError::Abort(format!("decoding a queue row: {e}"))
                    })?),
                    None => None,
                };
                if let Some(d) = old.as_ref().and_then(|j| j.due_micros) {
                    due.remove(due_key(d, row))?;
                }
                let new = f(old);
                match &new {
                    Some(j) => {
                        let v = serde_json::to_vec(j).map_err(|e| {
                            ConflictableTransactionError::Abort(format!(
                                "encoding a queue row: {e}"
                            ))
                        })?;
                        queue.insert(row, v)?;
                        if let Some(d) = j.due_micros {
                            due.insert(due_key(d, row), &[][..])?;
                        }
                    }
                    None => {
                        queue.remove(row)?;
                    }
                }
                Ok(new)
            });
        let new = res.map_err(tx_failed("updating a push queue row"))?;
        if new.as_ref().is_some_and(|j| j.due_micros.is_some()) {
            self.wake.notify_one();
        }
        Ok(new)
    }

    /// Removes every registration and queue row of `owner` (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for k in self
            .regs
            .scan_prefix(trees::owner_prefix(owner.as_str()))
            .keys()
        {
            batch.remove(k.map_err(err("scanning push registrations"))?);
        }
        self.regs
            .apply_batch(batch)
            .map_err(err("removing push registrations"))?;
        self.clear_rows(&trees::owner_prefix(owner.as_str()))
    }

    /// Removes the queue rows (with their index entries) whose key starts with `prefix`.
    fn clear_rows(&self, prefix: &[u8]) -> StoreResult<()> {
        for k in self.queue.scan_prefix(prefix).keys() {
            let k = k.map_err(err("scanning the push queue"))?;
            self.update_row(&k, &|_| None)?;
        }
        Ok(())
    }
}

#[async_trait]
impl PushStore for SledPush {
    async fn registrations(&self, owner: &BareJid) -> StoreResult<Vec<PushRegistration>> {
        let mut out = Vec::new();
        for kv in self.regs.scan_prefix(trees::owner_prefix(owner.as_str())) {
            let (_, v) = kv.map_err(err("reading push registrations"))?;
            out.push(decode("a push registration", &v)?);
        }
        Ok(out)
    }

    async fn put_registration(&self, owner: &BareJid, reg: &PushRegistration) -> StoreResult<()> {
        let v = serde_json::to_vec(reg).map_err(err("encoding a push registration"))?;
        self.regs
            .insert(row_key(owner.as_str(), &reg.jid, &reg.node), v)
            .map_err(err("storing a push registration"))?;
        Ok(())
    }

    async fn remove_registrations(
        &self,
        owner: &BareJid,
        jid: &str,
        node: Option<&str>,
    ) -> StoreResult<usize> {
        let keys: Vec<sled::IVec> = match node {
            Some(node) => {
                let k = row_key(owner.as_str(), jid, node);
                self.regs
                    .contains_key(&k)
                    .map_err(err("reading push registrations"))?
                    .then(|| k.into())
                    .into_iter()
                    .collect()
            }
            None => {
                let mut prefix = trees::owner_key(owner.as_str(), jid);
                prefix.push(0);
                self.regs
                    .scan_prefix(prefix)
                    .keys()
                    .collect::<Result<_, _>>()
                    .map_err(err("reading push registrations"))?
            }
        };
        for k in &keys {
            self.regs
                .remove(k)
                .map_err(err("removing a push registration"))?;
            self.update_row(k, &|_| None)?;
        }
        Ok(keys.len())
    }

    async fn update_job(
        &self,
        key: &PushKey,
        f: PushJobUpdate<'_>,
    ) -> StoreResult<Option<PushJob>> {
        self.update_row(&row_key(key.owner.as_str(), &key.jid, &key.node), f)
    }

    async fn due_jobs(
        &self,
        now_micros: u64,
        limit: usize,
    ) -> StoreResult<Vec<(PushKey, PushJob)>> {
        let mut out = Vec::new();
        let upper = now_micros.saturating_add(1).to_be_bytes();
        for k in self.due.range(..upper.as_slice()).keys() {
            if out.len() >= limit {
                break;
            }
            let k = k.map_err(err("reading the push due index"))?;
            let row = k.get(8..).unwrap_or_default();
            let job: Option<PushJob> =
                match self.queue.get(row).map_err(err("reading the push queue"))? {
                    Some(v) => Some(decode("a push queue row", &v)?),
                    None => None,
                };
            match (parse_key(row), job) {
                (Some(key), Some(job)) if job.due_micros == Some(u64_at(&k, 0)) => {
                    out.push((key, job))
                }
                _ => {
                    // An entry no row stands behind (cannot happen through `update_row`).
                    tracing::warn!("push: dropping a stale due index entry");
                    self.due
                        .remove(&k)
                        .map_err(err("removing a stale push index entry"))?;
                }
            }
        }
        Ok(out)
    }

    async fn next_due(&self) -> StoreResult<Option<u64>> {
        Ok(self
            .due
            .first()
            .map_err(err("reading the push due index"))?
            .map(|(k, _)| u64_at(&k, 0)))
    }

    async fn clear_jobs(&self, owner: &BareJid) -> StoreResult<()> {
        self.clear_rows(&trees::owner_prefix(owner.as_str()))
    }

    fn wakeup(&self) -> &Notify {
        &self.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(owner: &str, node: &str) -> PushKey {
        PushKey {
            owner: BareJid::new(owner).unwrap(),
            jid: "app.example".into(),
            node: node.into(),
        }
    }

    fn due_at(d: Option<u64>) -> impl Fn(Option<PushJob>) -> Option<PushJob> + Send + Sync {
        move |j| {
            let mut j = j.unwrap_or_default();
            j.count += 1;
            j.pending = d.is_some();
            j.due_micros = d;
            Some(j)
        }
    }

    #[tokio::test]
    async fn queue_rows_and_due_index_move_together() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SledPush::open(&db).unwrap();
        let a = BareJid::new("a@x").unwrap();
        for node in ["n1", "n2"] {
            s.put_registration(
                &a,
                &PushRegistration {
                    jid: "app.example".into(),
                    node: node.into(),
                    options: Some("<x/>".into()),
                },
            )
            .await
            .unwrap();
        }
        s.update_job(&key("a@x", "n1"), &due_at(Some(30)))
            .await
            .unwrap();
        s.update_job(&key("a@x", "n2"), &due_at(Some(10)))
            .await
            .unwrap();
        s.update_job(&key("a@xy", "n1"), &due_at(Some(20)))
            .await
            .unwrap();
        assert_eq!(s.next_due().await.unwrap(), Some(10));
        let due = s.due_jobs(25, 10).await.unwrap();
        let names: Vec<_> = due
            .iter()
            .map(|(k, j)| (k.owner.to_string(), k.node.clone(), j.due_micros))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a@x".into(), "n2".into(), Some(10)),
                ("a@xy".into(), "n1".into(), Some(20))
            ]
        );
        // Rescheduling moves the index entry; going idle takes the row out of the index.
        s.update_job(&key("a@x", "n2"), &due_at(Some(40)))
            .await
            .unwrap();
        s.update_job(&key("a@xy", "n1"), &due_at(None))
            .await
            .unwrap();
        assert_eq!(s.due.len(), 2);
        assert_eq!(s.due_jobs(35, 10).await.unwrap().len(), 1);
        assert_eq!(s.due_jobs(100, 1).await.unwrap().len(), 1, "limit");

        // Disabling one node removes its row; removing the owner removes the rest.
        assert_eq!(
            s.remove_registrations(&a, "app.example", Some("n1"))
                .await
                .unwrap(),
            1
        );
        assert_eq!(s.registrations(&a).await.unwrap().len(), 1);
        assert_eq!(s.due_jobs(100, 10).await.unwrap().len(), 1);
        s.remove_owner(&a).unwrap();
        assert!(s.registrations(&a).await.unwrap().is_empty());
        assert_eq!(s.queue.len(), 1, "a@xy's idle row stays");
        assert!(s.due.is_empty());
        s.clear_jobs(&BareJid::new("a@xy").unwrap()).await.unwrap();
        assert!(s.queue.is_empty());
    }
}
