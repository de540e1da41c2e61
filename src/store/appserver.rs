//! Device registrations of the XEP-0357 app server (`crate::appserver`) on sled.
//!
//! A registration belongs to the account that ran the ad-hoc command (`owner`, a bare JID) and
//! is named by the device id the app chose; it holds the provider, the device's token, and the
//! push node and secret the app passes to `<enable/>` at its server. Re-registering the same
//! `(owner, device id)` replaces provider and token but keeps node and secret, so registering
//! again on every login (as apps do) never invalidates what the user's server stored.

use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use halyard_xep::host::{StoreError, StoreResult};
use jid::BareJid;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{err, trees};

/// Where a device's notifications go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Fcm,
    Apns,
    Webhook,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Fcm => "fcm",
            Provider::Apns => "apns",
            Provider::Webhook => "webhook",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The bare JID that registered the device.
    pub owner: String,
    pub device_id: String,
    pub provider: Provider,
    /// The provider's device token (FCM registration token, APNs device token, or for webhooks
    /// an opaque string passed through).
    pub token: String,
    pub node: String,
    pub secret: String,
    /// Seconds since the Unix epoch of the last (re-)registration.
    pub registered: u64,
}

/// Token and secret are credentials: never in logs, so not in `Debug` either.
impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("owner", &self.owner)
            .field("device_id", &self.device_id)
            .field("provider", &self.provider)
            .field("node", &self.node)
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("the account already has {0} devices registered")]
    TooMany(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[async_trait]
pub trait RegistrationStore: Send + Sync {
    /// Registers `device_id` for `owner`, or replaces its provider and token keeping node and
    /// secret. A new device is refused when `owner` already has `max_devices`. Durable when it
    /// returns.
    async fn register(
        &self,
        owner: &BareJid,
        device_id: &str,
        provider: Provider,
        token: &str,
        max_devices: usize,
    ) -> Result<Registration, RegisterError>;
    /// The registration a publish to `node` is for.
    async fn by_node(&self, node: &str) -> StoreResult<Option<Registration>>;
    /// Removes `owner`'s `device_id`; returns what was removed. Durable when it returns.
    async fn unregister(
        &self,
        owner: &BareJid,
        device_id: &str,
    ) -> StoreResult<Option<Registration>>;
    /// Removes the registration behind `node` if its token is still `token` (the provider said
    /// that token is dead; a re-registration with a new token in the meantime survives).
    async fn remove_dead(&self, node: &str, token: &str) -> StoreResult<bool>;
    /// `owner`'s registrations, by device id.
    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Registration>>;
}

pub struct SledRegistrations {
    /// `owner \0 device_id` → JSON [`Registration`].
    pub(crate) devices: sled::Tree,
    /// node → `owner \0 device_id`.
    pub(crate) nodes: sled::Tree,
}

fn random_b64(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn decode(v: &[u8]) -> StoreResult<Registration> {
    serde_json::from_slice(v).map_err(err("decoding a push registration"))
}

fn encode(r: &Registration) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(r).map_err(err("encoding a push registration"))
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

impl SledRegistrations {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledRegistrations> {
        Ok(SledRegistrations {
            devices: db.open_tree(trees::APPSERVER_DEVICES)?,
            nodes: db.open_tree(trees::APPSERVER_NODES)?,
        })
    }

    /// Removes every device `owner` registered (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        for kv in self
            .devices
            .scan_prefix(trees::owner_prefix(owner.as_str()))
        {
            let (k, v) = kv.map_err(err("scanning push registrations"))?;
            if let Ok(r) = decode(&v) {
                self.nodes
                    .remove(r.node.as_bytes())
                    .map_err(err("removing a push node"))?;
            }
            self.devices
                .remove(k)
                .map_err(err("removing a push registration"))?;
        }
        Ok(())
    }

    /// Writes `reg` as given (import): its device row and node index. Refuses a node that is
    /// already registered, or a device that already exists. Not flushed.
    pub fn put_exact(&self, reg: &Registration) -> StoreResult<()> {
        let key = trees::owner_key(&reg.owner, &reg.device_id);
        let v = encode(reg)?;
        let res = (&self.devices, &self.nodes).transaction(|(devices, nodes)| {
            if nodes.get(reg.node.as_bytes())?.is_some() || devices.get(&key)?.is_some() {
                return Err(ConflictableTransactionError::Abort(StoreError {
                    context: "restoring a push registration".into(),
                    source: format!(
                        "node {:?} or device {:?} of {} is already registered",
                        reg.node, reg.device_id, reg.owner
                    )
                    .into(),
                }));
            }
            devices.insert(key.as_slice(), v.as_slice())?;
            nodes.insert(reg.node.as_bytes(), key.as_slice())?;
            Ok(())
        });
        res.map_err(tx_fail("restoring a push registration"))
    }

    async fn flush(&self, what: &str) -> StoreResult<()> {
        super::flush_tree(&self.devices)
            .await
            .map(|_| ())
            .map_err(err(&format!("flushing after {what}")))
    }
}

#[async_trait]
impl RegistrationStore for SledRegistrations {
    async fn register(
        &self,
        owner: &BareJid,
        device_id: &str,
        provider: Provider,
        token: &str,
        max_devices: usize,
    ) -> Result<Registration, RegisterError> {
        let key = trees::owner_key(owner.as_str(), device_id);
        if !self
            .devices
            .contains_key(&key)
            .map_err(err("reading a push registration"))?
        {
            // Counted outside the transaction (sled cannot scan inside one): two concurrent
            // registrations of new devices may exceed the limit by one, which is harmless.
            let have = self
                .devices
                .scan_prefix(trees::owner_prefix(owner.as_str()))
                .count();
            if have >= max_devices {
                return Err(RegisterError::TooMany(have));
            }
        }
        let fresh = Registration {
            owner: owner.to_string(),
            device_id: device_id.to_string(),
            provider,
            token: token.to_string(),
            node: random_b64(12),
            secret: random_b64(24),
            registered: now_secs(),
        };
        let res = (&self.devices, &self.nodes).transaction(|(devices, nodes)| {
            let reg = match devices.get(&key)? {
                Some(old) => {
                    let old = decode(&old).map_err(ConflictableTransactionError::Abort)?;
                    Registration {
                        provider,
                        token: fresh.token.clone(),
                        registered: fresh.registered,
                        ..old
                    }
                }
                None => fresh.clone(),
            };
            let v = encode(&reg).map_err(ConflictableTransactionError::Abort)?;
            devices.insert(key.as_slice(), v)?;
            nodes.insert(reg.node.as_bytes(), key.as_slice())?;
            Ok(reg)
        });
        let reg = res.map_err(tx_fail("storing a push registration"))?;
        self.flush("a push registration").await?;
        Ok(reg)
    }

    async fn by_node(&self, node: &str) -> StoreResult<Option<Registration>> {
        let Some(key) = self
            .nodes
            .get(node.as_bytes())
            .map_err(err("reading a push node"))?
        else {
            return Ok(None);
        };
        match self
            .devices
            .get(&key)
            .map_err(err("reading a push registration"))?
        {
            Some(v) => {
                let r = decode(&v)?;
                // An index row left behind by an older registration is not followed.
                Ok((r.node == node).then_some(r))
            }
            None => Ok(None),
        }
    }

    async fn unregister(
        &self,
        owner: &BareJid,
        device_id: &str,
    ) -> StoreResult<Option<Registration>> {
        let key = trees::owner_key(owner.as_str(), device_id);
        let res = (&self.devices, &self.nodes).transaction(|(devices, nodes)| {
            let Some(old) = devices.remove(key.as_slice())? else {
                return Ok(None);
            };
            let old = decode(&old).map_err(ConflictableTransactionError::Abort)?;
            nodes.remove(old.node.as_bytes())?;
            Ok(Some(old))
        });
        let removed = res.map_err(tx_fail("removing a push registration"))?;
        self.flush("removing a push registration").await?;
        Ok(removed)
    }

    async fn remove_dead(&self, node: &str, token: &str) -> StoreResult<bool> {
        let res = (&self.devices, &self.nodes).transaction(|(devices, nodes)| {
            let Some(key) = nodes.get(node.as_bytes())? else {
                return Ok(false);
            };
            let Some(v) = devices.get(&key)? else {
                nodes.remove(node.as_bytes())?;
                return Ok(false);
            };
            let r = decode(&v).map_err(ConflictableTransactionError::Abort)?;
            if r.node != node || r.token != token {
                return Ok(false);
            }
            devices.remove(&key)?;
            nodes.remove(node.as_bytes())?;
            Ok(true)
        });
        let removed = res.map_err(tx_fail("removing a dead push registration"))?;
        if removed {
            self.flush("removing a dead push registration").await?;
        }
        Ok(removed)
    }

    async fn list(&self, owner: &BareJid) -> StoreResult<Vec<Registration>> {
        let mut out = Vec::new();
        for kv in self
            .devices
            .scan_prefix(trees::owner_prefix(owner.as_str()))
        {
            let (_, v) = kv.map_err(err("listing push registrations"))?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, SledRegistrations) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SledRegistrations::open(&db).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn appserver_reregistering_keeps_node_and_secret() {
        let (_d, s) = open();
        let a = BareJid::new("a@x").unwrap();
        let r1 = s
            .register(&a, "dev1", Provider::Fcm, "t1", 5)
            .await
            .unwrap();
        assert_eq!(r1.node.len(), 16);
        assert!(r1.secret.len() >= 32);
        let r2 = s
            .register(&a, "dev1", Provider::Apns, "t2", 5)
            .await
            .unwrap();
        assert_eq!(
            (r2.node.as_str(), r2.secret.as_str()),
            (r1.node.as_str(), r1.secret.as_str())
        );
        assert_eq!((r2.provider, r2.token.as_str()), (Provider::Apns, "t2"));
        assert_eq!(s.by_node(&r1.node).await.unwrap(), Some(r2.clone()));
        // Another account's device with the same id is another registration.
        let b = BareJid::new("b@x").unwrap();
        let rb = s
            .register(&b, "dev1", Provider::Fcm, "t1", 5)
            .await
            .unwrap();
        assert_ne!(rb.node, r1.node);
        assert_eq!(s.list(&a).await.unwrap(), vec![r2]);
    }

    #[tokio::test]
    async fn appserver_device_limit_and_removal() {
        let (_d, s) = open();
        let a = BareJid::new("a@x").unwrap();
        s.register(&a, "d1", Provider::Fcm, "t", 2).await.unwrap();
        let r2 = s.register(&a, "d2", Provider::Fcm, "t", 2).await.unwrap();
        assert!(matches!(
            s.register(&a, "d3", Provider::Fcm, "t", 2).await,
            Err(RegisterError::TooMany(2))
        ));
        // Re-registering an existing device is not a new one.
        s.register(&a, "d2", Provider::Fcm, "t2", 2).await.unwrap();
        // A dead token only removes the registration that still has it.
        assert!(!s.remove_dead(&r2.node, "t").await.unwrap());
        assert!(s.remove_dead(&r2.node, "t2").await.unwrap());
        assert_eq!(s.by_node(&r2.node).await.unwrap(), None);
        let gone = s.unregister(&a, "d1").await.unwrap().unwrap();
        assert_eq!(s.by_node(&gone.node).await.unwrap(), None);
        assert_eq!(s.unregister(&a, "d1").await.unwrap(), None);
        s.register(&a, "d4", Provider::Webhook, "t", 2)
            .await
            .unwrap();
        s.remove_owner(&a).unwrap();
        assert!(s.list(&a).await.unwrap().is_empty());
        assert_eq!(s.nodes.len(), 0);
    }

    #[test]
    fn appserver_registration_debug_hides_credentials() {
        let r = Registration {
            owner: "a@x".into(),
            device_id: "d".into(),
            provider: Provider::Fcm,
            token: "TOKEN123".into(),
            node: "n".into(),
            secret: "SECRET456".into(),
            registered: 0,
        };
        let d = format!("{r:?}");
        assert!(!d.contains("TOKEN123") && !d.contains("SECRET456"), "{d}");
    }
}
