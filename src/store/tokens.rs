//! Bearer tokens of the HTTP API on sled. Only the SHA-256 of a token is stored: a copy of the
//! store does not let anyone call the API. A token belongs to an account (user tokens, issued
//! for a password) or to no one (admin tokens, issued by `halyard admin token`).

use async_trait::async_trait;
use base64::Engine;
use halyard_xep::host::StoreResult;
use jid::BareJid;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::{err, trees};

/// What a token grants, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The account (bare JID) a user token acts as; `None` for an admin token.
    pub owner: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Seconds since the Unix epoch after which the token is refused.
    pub expires: u64,
}

impl TokenRecord {
    pub fn is_admin(&self) -> bool {
        self.owner.is_none()
    }
}

/// The key a token is stored under.
pub fn hash(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A new random token: `hy_` and 32 random bytes in URL-safe base64 (256 bits from the OS).
pub fn generate() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    format!(
        "hy_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    )
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Stores a token's record under its hash. Durable when it returns.
    async fn insert(&self, hash: &[u8; 32], rec: &TokenRecord) -> StoreResult<()>;
    async fn get(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>>;
    /// Revokes a token; returns whether it existed. Durable when it returns.
    async fn remove(&self, hash: &[u8; 32]) -> StoreResult<bool>;
    /// Removes every token that expired before `now`; returns how many.
    async fn purge_expired(&self, now: u64) -> StoreResult<usize>;
}

/// Issues a token for `owner` (an admin token for `None`) valid for `ttl_secs`, and returns it:
/// the only time the token itself exists on the server.
pub async fn issue(
    store: &dyn TokenStore,
    owner: Option<&BareJid>,
    ttl_secs: u64,
) -> StoreResult<(String, TokenRecord)> {
    let token = generate();
    let now = now_secs();
    let rec = TokenRecord {
        owner: owner.map(|o| o.to_string()),
        created: now,
        expires: now.saturating_add(ttl_secs),
    };
    store.insert(&hash(&token), &rec).await?;
    Ok((token, rec))
}

pub struct SledTokens {
    /// SHA-256 of the token → JSON [`TokenRecord`].
    pub(crate) tokens: sled::Tree,
    /// `owner \0 hash` → empty: an account's tokens, for its removal.
    pub(crate) owners: sled::Tree,
}

fn owner_row(owner: &str, hash: &[u8]) -> Vec<u8> {
    let mut k = trees::owner_prefix(owner);
    k.extend_from_slice(hash);
    k
}

impl SledTokens {
    pub fn open(db: &sled::Db) -> anyhow::Result<SledTokens> {
        Ok(SledTokens {
            tokens: db.open_tree(trees::API_TOKENS)?,
            owners: db.open_tree(trees::API_TOKEN_OWNERS)?,
        })
    }

    /// Revokes every token of `owner` (account removal).
    pub fn remove_owner(&self, owner: &BareJid) -> StoreResult<()> {
        let prefix = trees::owner_prefix(owner.as_str());
        let mut tokens = sled::Batch::default();
        let mut owners = sled::Batch::default();
        for k in self.owners.scan_prefix(&prefix).keys() {
            let k = k.map_err(err("scanning an account's API tokens"))?;
            tokens.remove(&k[prefix.len()..]);
            owners.remove(k);
        }
        self.tokens
            .apply_batch(tokens)
            .map_err(err("removing an account's API tokens"))?;
        self.owners
            .apply_batch(owners)
            .map_err(err("removing an account's API token index"))?;
        Ok(())
    }

    fn decode(v: &[u8]) -> StoreResult<TokenRecord> {
        serde_json::from_slice(v).map_err(err("decoding an API token"))
    }

    async fn flush(&self, what: &str) -> StoreResult<()> {
        super::flush_tree(&self.tokens)
            .await
            .map(|_| ())
            .map_err(err(what))
    }
}

#[async_trait]
impl TokenStore for SledTokens {
    async fn insert(&self, hash: &[u8; 32], rec: &TokenRecord) -> StoreResult<()> {
        let v = serde_json::to_vec(rec).map_err(err("encoding an API token"))?;
        if let Some(o) = &rec.owner {
            self.owners
                .insert(owner_row(o, hash), &[])
                .map_err(err("indexing an API token"))?;
        }
        self.tokens
            .insert(hash, v)
            .map_err(err("storing an API token"))?;
        self.flush("flushing a new API token").await
    }

    async fn get(&self, hash: &[u8; 32]) -> StoreResult<Option<TokenRecord>> {
        match self.tokens.get(hash).map_err(err("reading an API token"))? {
            Some(v) => Self::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    async fn remove(&self, hash: &[u8; 32]) -> StoreResult<bool> {
        let Some(v) = self
            .tokens
            .remove(hash)
            .map_err(err("revoking an API token"))?
        else {
            return Ok(false);
        };
        if let Ok(TokenRecord { owner: Some(o), .. }) = Self::decode(&v) {
            self.owners
                .remove(owner_row(&o, hash))
                .map_err(err("unindexing an API token"))?;
        }
        self.flush("flushing a revoked API token").await?;
        Ok(true)
    }

    async fn purge_expired(&self, now: u64) -> StoreResult<usize> {
        let mut gone = Vec::new();
        for kv in self.tokens.iter() {
            let (k, v) = kv.map_err(err("scanning API tokens"))?;
            // An undecodable row grants nothing: it goes too.
            match Self::decode(&v) {
                Ok(r) if r.expires >= now => {}
                r => gone.push((k, r.ok().and_then(|r| r.owner))),
            }
        }
        for (k, owner) in &gone {
            self.tokens
                .remove(k)
                .map_err(err("removing an expired API token"))?;
            if let Some(o) = owner {
                self.owners
                    .remove(owner_row(o, k))
                    .map_err(err("unindexing an expired API token"))?;
            }
        }
        Ok(gone.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issue_get_revoke_and_remove_owner() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SledTokens::open(&db).unwrap();
        let a = BareJid::new("a@x").unwrap();
        let (t1, r1) = issue(&s, Some(&a), 60).await.unwrap();
        let (t2, _) = issue(&s, Some(&a), 60).await.unwrap();
        let (admin, ra) = issue(&s, None, 60).await.unwrap();
        assert!(t1.starts_with("hy_") && t1 != t2);
        assert!(ra.is_admin() && !r1.is_admin());
        assert_eq!(s.get(&hash(&t1)).await.unwrap(), Some(r1));
        // Only the hash is stored.
        assert!(s.tokens.get(t1.as_bytes()).unwrap().is_none());
        assert!(s.remove(&hash(&t1)).await.unwrap());
        assert!(!s.remove(&hash(&t1)).await.unwrap());
        assert_eq!(s.get(&hash(&t1)).await.unwrap(), None);
        s.remove_owner(&a).unwrap();
        assert_eq!(s.get(&hash(&t2)).await.unwrap(), None);
        assert!(s.owners.is_empty());
        assert!(s.get(&hash(&admin)).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn purge_removes_only_expired() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = SledTokens::open(&db).unwrap();
        let a = BareJid::new("a@x").unwrap();
        let (old, _) = issue(&s, Some(&a), 0).await.unwrap();
        let (new, _) = issue(&s, Some(&a), 3600).await.unwrap();
        assert_eq!(s.purge_expired(now_secs() + 10).await.unwrap(), 1);
        assert!(s.get(&hash(&old)).await.unwrap().is_none());
        assert!(s.get(&hash(&new)).await.unwrap().is_some());
        assert_eq!(s.owners.len(), 1);
    }
}
