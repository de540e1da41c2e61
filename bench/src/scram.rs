//! The client side of SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, RFC 7677), without channel
//! binding, plus a cache of salted passwords.
//!
//! Hand-written on `hmac`/`sha1`/`sha2`/`pbkdf2` rather than the `sasl` crate's client (0.5.2)
//! because: (1) its client nonce cannot be set through the public API, so the client could not
//! be checked against the RFC 7677 test vector; (2) it takes the password before the exchange
//! starts, so a salted-password cache would have to know the server's salt in advance (its
//! `Password::Pbkdf2` fails on a different salt rather than deriving again); (3) it does not
//! SASLprep the password (a TODO in its source). The exchange itself is ~100 lines.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub fn mechanism(self) -> &'static str {
        match self {
            Hash::Sha1 => "SCRAM-SHA-1",
            Hash::Sha256 => "SCRAM-SHA-256",
        }
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length, so new_from_slice cannot fail.
        match self {
            Hash::Sha1 => match Hmac::<Sha1>::new_from_slice(key) {
                Ok(mut m) => {
                    m.update(data);
                    m.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            },
            Hash::Sha256 => match Hmac::<Sha256>::new_from_slice(key) {
                Ok(mut m) => {
                    m.update(data);
                    m.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            },
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha1 => Sha1::digest(data).to_vec(),
            Hash::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Hash::Sha1 => {
                pbkdf2::pbkdf2_hmac_array::<Sha1, 20>(password, salt, iterations).to_vec()
            }
            Hash::Sha256 => {
                pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations).to_vec()
            }
        }
    }
}

type CacheKey = (Hash, String, Vec<u8>, u32);

/// Salted passwords by (hash, password, salt, iterations): PBKDF2 is the costly part of a
/// client login (~1-2 ms at 4096 iterations), and it depends on nothing else, so repeated logins
/// — in one run, or across runs with `--scram-cache FILE` — cost the tool only HMACs. The
/// server's work per login is unchanged (it stores salted credentials and never runs PBKDF2).
#[derive(Default)]
pub struct SaltCache {
    map: Mutex<HashMap<CacheKey, Vec<u8>>>,
    pub hits: std::sync::atomic::AtomicU64,
    pub misses: std::sync::atomic::AtomicU64,
}

impl SaltCache {
    pub fn salted(&self, hash: Hash, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
        use std::sync::atomic::Ordering::Relaxed;
        let key = (hash, password.to_string(), salt.to_vec(), iterations);
        if let Some(v) = self.map.lock().ok().and_then(|m| m.get(&key).cloned()) {
            self.hits.fetch_add(1, Relaxed);
            return v;
        }
        self.misses.fetch_add(1, Relaxed);
        let v = hash.salted_password(password.as_bytes(), salt, iterations);
        if let Ok(mut m) = self.map.lock() {
            m.insert(key, v.clone());
        }
        v
    }

    /// Loads entries saved by [`SaltCache::save`]; a missing file is an empty cache. Lines:
    /// `hash<TAB>password-b64<TAB>salt-b64<TAB>iterations<TAB>salted-b64`. The file holds the
    /// benchmark accounts' passwords: keep it to benchmark machines.
    pub fn load(path: &Path) -> anyhow::Result<SaltCache> {
        let c = SaltCache::default();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(c),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut map = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split('\t').collect();
            let parsed = (|| {
                let [h, pw, salt, it, v] = f.as_slice() else {
                    return None;
                };
                let hash = match *h {
                    "SHA-1" => Hash::Sha1,
                    "SHA-256" => Hash::Sha256,
                    _ => return None,
                };
                let pw = String::from_utf8(B64.decode(pw).ok()?).ok()?;
                Some((
                    (hash, pw, B64.decode(salt).ok()?, it.parse().ok()?),
                    B64.decode(v).ok()?,
                ))
            })();
            let (k, v) = parsed
                .with_context(|| format!("{}:{}: not a cache line", path.display(), n + 1))?;
            map.insert(k, v);
        }
        if let Ok(mut m) = c.map.lock() {
            *m = map;
        }
        Ok(c)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = String::new();
        if let Ok(m) = self.map.lock() {
            for ((h, pw, salt, it), v) in m.iter() {
                let h = match h {
                    Hash::Sha1 => "SHA-1",
                    Hash::Sha256 => "SHA-256",
                };
                out.push_str(&format!(
                    "{h}\t{}\t{}\t{it}\t{}\n",
                    B64.encode(pw),
                    B64.encode(salt),
                    B64.encode(v)
                ));
            }
        }
        std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
    }
}

/// One SCRAM exchange (client side).
pub struct ScramClient {
    hash: Hash,
    password: String,
    client_first_bare: String,
    nonce: String,
    server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    /// A client with a random 24-character nonce.
    pub fn new(hash: Hash, user: &str, password: &str) -> anyhow::Result<ScramClient> {
        use rand::distributions::{Alphanumeric, DistString};
        let nonce = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        Self::with_nonce(hash, user, password, &nonce)
    }

    pub fn with_nonce(
        hash: Hash,
        user: &str,
        password: &str,
        nonce: &str,
    ) -> anyhow::Result<ScramClient> {
        // SASLprep (RFC 4013); ASCII passwords are left as they are.
        let password = if password.is_ascii() {
            password.to_string()
        } else {
            stringprep::saslprep(password)
                .map_err(|e| anyhow::anyhow!("SASLprep refused the password: {e}"))?
                .into_owned()
        };
        // RFC 5802 §5.1: ',' and '=' in the username are escaped.
        let user = user.replace('=', "=3D").replace(',', "=2C");
        Ok(ScramClient {
            hash,
            password,
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_string(),
            server_signature: None,
        })
    }

    /// client-first-message: no channel binding ("n,,").
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers server-first-message with client-final-message.
    pub fn client_final(
        &mut self,
        server_first: &[u8],
        cache: &SaltCache,
    ) -> anyhow::Result<String> {
        let sf = std::str::from_utf8(server_first).context("server-first-message is not UTF-8")?;
        let (mut r, mut s, mut i) = (None, None, None);
        for part in sf.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => r = Some(v),
                Some(("s", v)) => s = Some(v),
                Some(("i", v)) => i = Some(v),
                Some(("m", _)) => bail!("server-first-message has a mandatory extension"),
                _ => {}
            }
        }
        let r = r.context("server-first-message has no nonce")?;
        if !r.starts_with(&self.nonce) || r.len() == self.nonce.len() {
            bail!("server nonce does not extend the client's");
        }
        let salt = B64
            .decode(s.context("server-first-message has no salt")?)
            .context("server salt is not base64")?;
        let iterations: u32 = i
            .context("server-first-message has no iteration count")?
            .parse()
            .context("iteration count is not a number")?;
        if iterations == 0 {
            bail!("iteration count is 0");
        }
        let salted = cache.salted(self.hash, &self.password, &salt, iterations);
        // "biws" = base64("n,,"): no channel binding.
        let without_proof = format!("c=biws,r={r}");
        let auth_message = format!("{},{sf},{without_proof}", self.client_first_bare);
        let client_key = self.hash.hmac(&salted, b"Client Key");
        let stored_key = self.hash.digest(&client_key);
        let signature = self.hash.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = self.hash.hmac(&salted, b"Server Key");
        self.server_signature = Some(self.hash.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final-message (`v=…`, carried in `<success/>`).
    pub fn verify_server_final(&self, server_final: &[u8]) -> anyhow::Result<()> {
        let sf = std::str::from_utf8(server_final).context("server-final-message is not UTF-8")?;
        if let Some(e) = sf.strip_prefix("e=") {
            bail!("server error: {e}");
        }
        let v = sf
            .strip_prefix("v=")
            .context("server-final-message has no verifier")?;
        let v = B64.decode(v).context("server verifier is not base64")?;
        match &self.server_signature {
            Some(expected) if *expected == v => Ok(()),
            Some(_) => {
                bail!("the server's signature does not match: it does not know the password")
            }
            None => bail!("server-final-message before client-final-message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_scram_sha_256() {
        let cache = SaltCache::default();
        let mut c = ScramClient::with_nonce(Hash::Sha256, "user", "pencil", "rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(c.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let fin = c
            .client_final(
                b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                &cache,
            )
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        c.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(c
            .verify_server_final(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
    }

    #[test]
    fn rfc5802_scram_sha_1() {
        let cache = SaltCache::default();
        let mut c =
            ScramClient::with_nonce(Hash::Sha1, "user", "pencil", "fyko+d2lbbFgONRv9qkxdawL")
                .unwrap();
        let fin = c
            .client_final(
                b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
                &cache,
            )
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
        );
        c.verify_server_final(b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=")
            .unwrap();
    }

    #[test]
    fn cache_hits_on_the_second_login_and_survives_a_file() {
        use std::sync::atomic::Ordering::Relaxed;
        let cache = SaltCache::default();
        let sf = b"r=abcXYZ,s=QSXCR+Q6sek8bf92,i=4096";
        for _ in 0..2 {
            let mut c = ScramClient::with_nonce(Hash::Sha256, "u1", "pw", "abc").unwrap();
            c.client_final(sf, &cache).unwrap();
        }
        assert_eq!(cache.misses.load(Relaxed), 1);
        assert_eq!(cache.hits.load(Relaxed), 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        cache.save(&path).unwrap();
        let loaded = SaltCache::load(&path).unwrap();
        let mut c = ScramClient::with_nonce(Hash::Sha256, "u1", "pw", "abc").unwrap();
        let a = c.client_final(sf, &loaded).unwrap();
        assert_eq!(loaded.hits.load(Relaxed), 1);
        let mut c = ScramClient::with_nonce(Hash::Sha256, "u1", "pw", "abc").unwrap();
        assert_eq!(a, c.client_final(sf, &SaltCache::default()).unwrap());
    }

    #[test]
    fn bad_server_first_messages() {
        let cache = SaltCache::default();
        let mut c = ScramClient::with_nonce(Hash::Sha256, "u", "pw", "abc").unwrap();
        assert!(c.client_final(b"r=xyz,s=QSXC,i=4096", &cache).is_err());
        assert!(c.client_final(b"r=abc,s=QSXC,i=4096", &cache).is_err());
        assert!(c.client_final(b"r=abcd,i=4096", &cache).is_err());
        assert!(c.client_final(b"r=abcd,s=QSXC,i=x", &cache).is_err());
        assert!(c.verify_server_final(b"e=invalid-proof").is_err());
    }

    #[test]
    fn username_is_escaped() {
        let c = ScramClient::with_nonce(Hash::Sha1, "a,b=c", "pw", "n").unwrap();
        assert_eq!(c.client_first(), "n,,n=a=2Cb=3Dc,r=n");
    }
}
