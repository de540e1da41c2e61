//! The embedded backend: sled 0.34.7 (pinned; its on-disk format will change before 1.0, which
//! is why everything goes through the store traits).

use std::path::Path;

use async_trait::async_trait;
use halyard_xep::host::{
    LastActivity, LastActivityStore, RosterItem, RosterStore, StoreError, StoreResult,
};
use jid::BareJid;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::trees;
use super::{err, u64_at};
use super::{Account, AccountError, AccountStore};

pub struct SledStore {
    pub db: sled::Db,
    pub archive: std::sync::Arc<super::archive::SledArchive>,
    pub offline: std::sync::Arc<super::offline::SledOffline>,
    pub push: std::sync::Arc<super::push::SledPush>,
    pub appserver: std::sync::Arc<super::appserver::SledRegistrations>,
    pub uploads: std::sync::Arc<super::upload::SledUploads>,
    pub tokens: std::sync::Arc<super::tokens::SledTokens>,
    pub(crate) accounts: sled::Tree,
    pub(crate) roster: sled::Tree,
    pub(crate) roster_version: sled::Tree,
    pub(crate) last: sled::Tree,
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(err(&format!("decoding {what}")))
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(err(&format!("encoding {what}")))
}

impl SledStore {
    pub fn open(dir: &Path, cache_bytes: u64) -> anyhow::Result<SledStore> {
        super::create_data_dir(dir)?;
        let path = dir.join("store");
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(Some(200))
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the store at {}: {e} (another halyard process may be using it: \
                     stop it, or use its admin socket)",
                    path.display()
                )
            })?;
        let open = |name: &str| {
            db.open_tree(name)
                .map_err(|e| anyhow::anyhow!("cannot open tree {name}: {e}"))
        };
        Ok(SledStore {
            archive: std::sync::Arc::new(super::archive::SledArchive::open(&db)?),
            offline: std::sync::Arc::new(super::offline::SledOffline::open(&db)?),
            push: std::sync::Arc::new(super::push::SledPush::open(&db)?),
            appserver: std::sync::Arc::new(super::appserver::SledRegistrations::open(&db)?),
            uploads: std::sync::Arc::new(super::upload::SledUploads::open(
                &db,
                &dir.join("uploads"),
            )?),
            tokens: std::sync::Arc::new(super::tokens::SledTokens::open(&db)?),
            accounts: open(trees::ACCOUNTS)?,
            roster: open(trees::ROSTER)?,
            roster_version: open(trees::ROSTER_VERSION)?,
            last: open(trees::LAST_ACTIVITY)?,
            db,
        })
    }

    pub fn flush(&self) -> StoreResult<()> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(err("flushing the store"))
    }

    async fn flush_async(&self, what: &str) -> StoreResult<()> {
        super::flush_tree(&self.db)
            .await
            .map(|_| ())
            .map_err(err(&format!("flushing after {what}")))
    }

    /// Applies a roster change and bumps the version in one transaction.
    async fn roster_change(
        &self,
        user: &BareJid,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> StoreResult<u64> {
        let owner = user.as_str().as_bytes().to_vec();
        let res: Result<u64, TransactionError<()>> = (&self.roster, &self.roster_version)
            .transaction(|(roster, versions)| {
                match &value {
                    Some(v) => roster.insert(key.as_slice(), v.as_slice())?,
                    None => roster.remove(key.as_slice())?,
                };
                let cur = versions
                    .get(&owner)?
                    .map(|v| u64_at(v.as_ref(), 0))
                    .unwrap_or(0);
                let next = cur + 1;
                versions.insert(owner.as_slice(), &next.to_be_bytes())?;
                Ok::<u64, ConflictableTransactionError<()>>(next)
            });
        let ver = res.map_err(|e| StoreError {
            context: "roster transaction".into(),
            source: format!("{e:?}").into(),
        })?;
        self.flush_async("roster change").await?;
        Ok(ver)
    }
}

impl super::StoreStats for SledStore {
    fn size_on_disk(&self) -> StoreResult<u64> {
        self.db
            .size_on_disk()
            .map_err(err("reading the store's size"))
    }

    fn push_queue_depth(&self) -> StoreResult<u64> {
        // sled counts by iterating; the due index holds one row per pending notification
        // batch, which stays small (bounded by registrations).
        Ok(self.push.due.len() as u64)
    }
}

#[async_trait]
impl AccountStore for SledStore {
    async fn create(&self, user: &BareJid, account: &Account) -> Result<(), AccountError> {
        let v = encode("account", account)?;
        let swapped = self
            .accounts
            .compare_and_swap(user.as_str(), None as Option<&[u8]>, Some(v))
            .map_err(err("creating account"))?;
        if swapped.is_err() {
            return Err(AccountError::Exists(user.clone()));
        }
        self.flush_async("account creation").await?;
        Ok(())
    }

    async fn exists(&self, user: &BareJid) -> StoreResult<bool> {
        self.accounts
            .contains_key(user.as_str())
            .map_err(err("reading account"))
    }

    async fn get(&self, user: &BareJid) -> StoreResult<Option<Account>> {
        match self
            .accounts
            .get(user.as_str())
            .map_err(err("reading account"))?
        {
            Some(v) => decode("account", &v).map(Some),
            None => Ok(None),
        }
    }

    async fn update(&self, user: &BareJid, account: &Account) -> Result<(), AccountError> {
        let v = encode("account", account)?;
        let prev = self
            .accounts
            .fetch_and_update(user.as_str(), |old| old.map(|_| v.clone()))
            .map_err(err("updating account"))?;
        if prev.is_none() {
            return Err(AccountError::NotFound(user.clone()));
        }
        self.flush_async("account update").await?;
        Ok(())
    }

    async fn remove(&self, user: &BareJid) -> Result<(), AccountError> {
        // The account row goes first, so no one can log in while the rest is removed.
        if self
            .accounts
            .remove(user.as_str())
            .map_err(err("removing account"))?
            .is_none()
        {
            return Err(AccountError::NotFound(user.clone()));
        }
        let prefix = trees::owner_prefix(user.as_str());
        let mut batch = sled::Batch::default();
        for kv in self.roster.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(err("scanning roster for removal"))?;
            batch.remove(k);
        }
        self.roster
            .apply_batch(batch)
            .map_err(err("removing roster"))?;
        self.roster_version
            .remove(user.as_str())
            .map_err(err("removing roster version"))?;
        self.last
            .remove(user.as_str())
            .map_err(err("removing last activity"))?;
        self.offline.remove_owner(user)?;
        self.archive.remove_owner(user)?;
        self.push.remove_owner(user)?;
        self.appserver.remove_owner(user)?;
        self.uploads.remove_owner(user, true)?;
        self.tokens.remove_owner(user)?;
        self.flush_async("account removal").await?;
        Ok(())
    }

    async fn list(&self) -> StoreResult<Vec<BareJid>> {
        let mut out = Vec::new();
        for kv in self.accounts.iter() {
            let (k, _) = kv.map_err(err("listing accounts"))?;
            let s = String::from_utf8_lossy(&k);
            match BareJid::new(&s) {
                Ok(j) => out.push(j),
                Err(e) => {
                    tracing::warn!(key = %s, error = %e, "skipping an account row with an invalid JID")
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl RosterStore for SledStore {
    async fn items(&self, user: &BareJid) -> StoreResult<Vec<RosterItem>> {
        let mut out = Vec::new();
        for kv in self.roster.scan_prefix(trees::owner_prefix(user.as_str())) {
            let (_, v) = kv.map_err(err("scanning roster"))?;
            out.push(decode("roster item", &v)?);
        }
        Ok(out)
    }

    async fn item(&self, user: &BareJid, contact: &BareJid) -> StoreResult<Option<RosterItem>> {
        match self
            .roster
            .get(trees::owner_key(user.as_str(), contact.as_str()))
            .map_err(err("reading roster item"))?
        {
            Some(v) => decode("roster item", &v).map(Some),
            None => Ok(None),
        }
    }

    async fn put(&self, user: &BareJid, item: &RosterItem) -> StoreResult<u64> {
        let key = trees::owner_key(user.as_str(), &item.jid);
        self.roster_change(user, key, Some(encode("roster item", item)?))
            .await
    }

    async fn remove(&self, user: &BareJid, contact: &BareJid) -> StoreResult<u64> {
        self.roster_change(
            user,
            trees::owner_key(user.as_str(), contact.as_str()),
            None,
        )
        .await
    }

    async fn version(&self, user: &BareJid) -> StoreResult<u64> {
        Ok(self
            .roster_version
            .get(user.as_str())
            .map_err(err("reading roster version"))?
            .map(|v| u64_at(&v, 0))
            .unwrap_or(0))
    }
}

#[async_trait]
impl LastActivityStore for SledStore {
    async fn get(&self, user: &BareJid) -> StoreResult<Option<LastActivity>> {
        match self
            .last
            .get(user.as_str())
            .map_err(err("reading last activity"))?
        {
            Some(v) => decode("last activity", &v).map(Some),
            None => Ok(None),
        }
    }

    async fn set(&self, user: &BareJid, last: &LastActivity) -> StoreResult<()> {
        // Not flushed here: sled's periodic flush is enough for an informational timestamp.
        self.last
            .insert(user.as_str(), encode("last activity", last)?)
            .map_err(err("writing last activity"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    /// Many writers that each wait for their flush at once (account creations from the API or
    /// the bench tool, roster changes from many sessions): sled 0.34's `flush_async` deadlocks
    /// under this (spacejam/sled#1308); `flush_tree` must not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_flushing_writers_all_finish() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SledStore::open(dir.path(), 64 << 20).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400 {
            let s = s.clone();
            tasks.spawn(async move {
                let a = Account {
                    scram: Default::default(),
                    created: i,
                };
                s.create(&jid(&format!("u{i}@x")), &a).await
            });
        }
        let all = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            while let Some(r) = tasks.join_next().await {
                r.unwrap().unwrap();
            }
        })
        .await;
        assert!(
            all.is_ok(),
            "concurrent creations with flushes did not finish"
        );
        assert_eq!(s.list().await.unwrap().len(), 400);
    }

    #[tokio::test]
    async fn accounts_create_once_and_remove_everything() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let a = Account {
            scram: Default::default(),
            created: 1,
        };
        s.create(&jid("a@x"), &a).await.unwrap();
        assert!(matches!(
            s.create(&jid("a@x"), &a).await,
            Err(AccountError::Exists(_))
        ));
        let item = RosterItem {
            jid: "b@x".into(),
            in_roster: true,
            ..Default::default()
        };
        assert_eq!(RosterStore::put(&s, &jid("a@x"), &item).await.unwrap(), 1);
        assert_eq!(s.items(&jid("a@x")).await.unwrap(), vec![item]);
        use halyard_xep::host::{PushJob, PushKey, PushRegistration, PushStore};
        let reg = PushRegistration {
            jid: "push.x".into(),
            node: "n".into(),
            options: None,
        };
        s.push.put_registration(&jid("a@x"), &reg).await.unwrap();
        let key = PushKey {
            owner: jid("a@x"),
            jid: "push.x".into(),
            node: "n".into(),
        };
        let due = |_| {
            Some(PushJob {
                pending: true,
                due_micros: Some(1),
                ..Default::default()
            })
        };
        s.push.update_job(&key, &due).await.unwrap();
        AccountStore::remove(&s, &jid("a@x")).await.unwrap();
        for tree in [&s.push.regs, &s.push.queue, &s.push.due] {
            assert!(tree.is_empty(), "push rows go with the account");
        }
        assert!(s.items(&jid("a@x")).await.unwrap().is_empty());
        assert_eq!(s.version(&jid("a@x")).await.unwrap(), 0);
        assert!(AccountStore::get(&s, &jid("a@x")).await.unwrap().is_none());
        assert!(matches!(
            AccountStore::remove(&s, &jid("a@x")).await,
            Err(AccountError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn roster_prefix_does_not_leak_between_owners() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path(), 64 << 20).unwrap();
        let item = RosterItem {
            jid: "c@x".into(),
            ..Default::default()
        };
        RosterStore::put(&s, &jid("a@x"), &item).await.unwrap();
        RosterStore::put(&s, &jid("a@xy"), &item).await.unwrap();
        assert_eq!(s.items(&jid("a@x")).await.unwrap().len(), 1);
    }
}
