//! TLS: certificates from `certs/` (or generated self-signed for development), one rustls
//! configuration for every TLS listener, and the channel-binding data SCRAM-PLUS needs.
//!
//! The acceptor never changes. The certificates it serves sit behind a lock in the certificate
//! resolver, so [`Tls::reload`] (SIGHUP) swaps them for new handshakes while established TLS
//! sessions go on untouched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnection};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_rustls::TlsAcceptor;

use crate::sasl::scram::ChannelBindings;

/// The server's TLS state: the acceptor and the certificates it serves, per domain with what
/// tls-server-end-point binds to. Clones share the certificates: a reload through one is seen
/// by all.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
}

#[derive(Debug)]
struct Resolver {
    certs_dir: PathBuf,
    /// The served domains, the primary (the fallback for an unknown or absent SNI) first.
    domains: Vec<String>,
    provider: Arc<CryptoProvider>,
    served: RwLock<Arc<Served>>,
    /// Milliseconds a handshake can take before its session asks for channel bindings (see
    /// [`Tls::bindings`]).
    handshake_window_ms: AtomicU64,
}

/// One generation of certificates, replaced as a whole.
#[derive(Debug)]
struct Served {
    by_name: HashMap<String, Entry>,
    default: Entry,
}

#[derive(Debug, Clone)]
struct Entry {
    key: Arc<CertifiedKey>,
    /// RFC 5929 §4.1 hash of the end-entity certificate.
    end_point: Vec<u8>,
    /// When a reload put this certificate in place of a different one; `None` when it has been
    /// served since start.
    replaced_at: Option<Instant>,
}

impl Served {
    fn entry(&self, name: Option<&str>) -> &Entry {
        name.and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default)
    }
}

impl Resolver {
    fn current(&self) -> Arc<Served> {
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().entry(hello.server_name()).key.clone())
    }
}

fn cert_paths(dir: &Path, domain: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    )
}

/// Loads `certs/<domain>.crt` and `.key` for every domain, generating a self-signed pair for a
/// domain that has none.
pub fn load(certs_dir: &Path, domains: &[String]) -> anyhow::Result<Tls> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    anyhow::ensure!(!domains.is_empty(), "no domain configured");
    for domain in domains {
        let (crt, key) = cert_paths(certs_dir, domain);
        if !crt.exists() && !key.exists() {
            generate(certs_dir, domain)?;
        }
    }
    let served = read_all(&provider, certs_dir, domains, None)?;
    let resolver = Arc::new(Resolver {
        certs_dir: certs_dir.to_path_buf(),
        domains: domains.to_vec(),
        provider: provider.clone(),
        served: RwLock::new(Arc::new(served)),
        handshake_window_ms: AtomicU64::new(60_000),
    });
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("building the TLS configuration")?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        resolver,
    })
}

/// Reads every domain's pair; all or nothing. `previous` carries over when each certificate
/// was last replaced.
fn read_all(
    provider: &CryptoProvider,
    dir: &Path,
    domains: &[String],
    previous: Option<&Served>,
) -> anyhow::Result<Served> {
    let now = Instant::now();
    let mut by_name = HashMap::new();
    let mut default = None;
    for domain in domains {
        let key = read_pair(provider, dir, domain)?;
        let end_point = end_point_hash(key.cert[0].as_ref());
        let replaced_at = match previous.and_then(|p| p.by_name.get(domain)) {
            None => None,
            Some(old) if old.key.cert == key.cert => old.replaced_at,
            Some(_) => Some(now),
        };
        let entry = Entry {
            key: Arc::new(key),
            end_point,
            replaced_at,
        };
        default.get_or_insert_with(|| entry.clone());
        by_name.insert(domain.clone(), entry);
    }
    Ok(Served {
        by_name,
        default: default.context("no domain configured")?,
    })
}

/// One domain's certificate chain and private key, checked to belong together (a certificate
/// replaced before its key must not be served with the old key).
fn read_pair(provider: &CryptoProvider, dir: &Path, domain: &str) -> anyhow::Result<CertifiedKey> {
    let (crt, key) = cert_paths(dir, domain);
    let chain = read_chain(&crt)?;
    let key_der = read_key(&key)?;
    CertifiedKey::from_der(chain, key_der, provider).with_context(|| {
        format!(
            "{} does not hold the private key of {} (or is not supported)",
            key.display(),
            crt.display()
        )
    })
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate {}", path.display()))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", path.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", path.display());
    Ok(chain)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read private key {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("{} is not a PEM private key", path.display()))?
        .with_context(|| format!("{} holds no private key", path.display()))
}

/// Generates a self-signed certificate for `domain`, `*.domain` and 127.0.0.1.
fn generate(dir: &Path, domain: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create certs folder {}", dir.display()))?;
    let names = vec![
        domain.to_string(),
        format!("*.{domain}"),
        "127.0.0.1".to_string(),
    ];
    let ck = rcgen::generate_simple_self_signed(names)
        .context("generating a self-signed certificate")?;
    let (crt, key) = cert_paths(dir, domain);
    write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&crt, ck.cert.pem())
        .with_context(|| format!("cannot write {}", crt.display()))?;
    tracing::warn!(
        domain,
        cert = %crt.display(),
        "generated a SELF-SIGNED certificate for development: clients will not trust it; put a real certificate and key at this path for production"
    );
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// RFC 5929 §4.1: the certificate hashed with its signature's hash function, SHA-256 for MD5 and
/// SHA-1. We find the signature algorithm by its OID bytes in the DER rather than pulling in an
/// X.509 parser for one field: the OIDs below are unambiguous byte strings.
fn end_point_hash(der: &[u8]) -> Vec<u8> {
    const SHA384_OIDS: [&[u8]; 3] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
        &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02], // id-sha384 (RSASSA-PSS params)
    ];
    const SHA512_OIDS: [&[u8]; 3] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
        &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03], // id-sha512
    ];
    // The outer signatureAlgorithm follows the TBSCertificate: look in the tail only, so an OID
    // inside an extension cannot mislead us.
    let tail = &der[der.len().saturating_sub(160)..];
    let has = |oids: &[&[u8]]| oids.iter().any(|o| tail.windows(o.len()).any(|w| w == *o));
    if has(&SHA512_OIDS) {
        Sha512::digest(der).to_vec()
    } else if has(&SHA384_OIDS) {
        Sha384::digest(der).to_vec()
    } else {
        Sha256::digest(der).to_vec()
    }
}

impl Tls {
    /// How long a TLS handshake and the stream negotiation around it may take before the
    /// session asks for channel bindings (the longest of the handshake and pre-authentication
    /// timeouts). See [`Tls::bindings`].
    pub fn set_handshake_window(&self, window: Duration) {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.resolver
            .handshake_window_ms
            .store(ms, Ordering::Relaxed);
    }

    /// Re-reads `<certs_dir>/<domain>.crt` and `.key` for every domain and serves them to new
    /// handshakes; established sessions keep theirs. All or nothing: if any file is missing,
    /// unreadable, not PEM, or a key does not match its certificate, the certificates served
    /// so far stay and the error names the file and the reason. Logs the outcome (what SIGHUP
    /// does). Returns the domains whose certificate changed.
    pub fn reload(&self) -> anyhow::Result<Vec<String>> {
        let r = &self.resolver;
        let old = r.current();
        let result = read_all(&r.provider, &r.certs_dir, &r.domains, Some(&old));
        match result {
            Ok(served) => {
                let changed: Vec<String> = r
                    .domains
                    .iter()
                    .filter(|d| {
                        let cert = |s: &Served| s.by_name.get(*d).map(|e| e.key.cert.clone());
                        cert(&served) != cert(&old)
                    })
                    .cloned()
                    .collect();
                *r.served.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(served);
                tracing::info!(
                    certs_dir = %r.certs_dir.display(),
                    changed = ?changed,
                    "TLS certificates reloaded"
                );
                Ok(changed)
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    "TLS certificates NOT reloaded; still serving the previous ones"
                );
                Err(e)
            }
        }
    }

    /// The end-entity certificate (DER) served to a client that names `sni` (or none).
    pub fn served_certificate(&self, sni: Option<&str>) -> Vec<u8> {
        self.resolver.current().entry(sni).key.cert[0].to_vec()
    }

    /// Channel-binding data for an established server connection.
    pub fn bindings(&self, conn: &ServerConnection) -> ChannelBindings {
        // RFC 9266: tls-exporter is defined for TLS 1.3 (TLS 1.2 would need extended master
        // secret, which rustls does not report), so it is offered on 1.3 only.
        //
        // No -PLUS at all on TLS 1.2: clients there (slixmpp, others using OpenSSL) pick
        // `tls-unique`, which rustls cannot provide, and would fail instead of falling back.
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return ChannelBindings {
                tls_exporter: None,
                tls_server_end_point: None,
                tls: true,
            };
        }
        let tls_exporter = conn
            .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
            .ok()
            .map(|o| o.to_vec());
        // tls-server-end-point is the hash of the certificate this connection was served.
        // rustls does not say which that was, so we take the one served now for its name; that
        // is the same unless a reload replaced it while this handshake ran. A handshake and the
        // negotiation before this call are bounded by the handshake window: within it after a
        // replacement we cannot tell, and leave tls-server-end-point out rather than make a
        // correct client fail (tls-exporter, bound to this very connection, stays).
        let served = self.resolver.current();
        let entry = served.entry(conn.server_name());
        let window =
            Duration::from_millis(self.resolver.handshake_window_ms.load(Ordering::Relaxed));
        let ambiguous = entry.replaced_at.is_some_and(|at| at.elapsed() < window);
        ChannelBindings {
            tls_exporter,
            tls_server_end_point: (!ambiguous).then(|| entry.end_point.clone()),
            tls: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ClientConnection;

    const DOMAIN: &str = "localhost";

    /// Writes a new self-signed pair for `DOMAIN` over whatever is there; returns its DER.
    fn write_pair(dir: &Path) -> Vec<u8> {
        let ck = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).expect("cert");
        let (crt, key) = cert_paths(dir, DOMAIN);
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        std::fs::write(&crt, ck.cert.pem()).expect("write crt");
        ck.cert.der().to_vec()
    }

    /// A full handshake in memory with a client trusting `trusted`; returns both ends.
    fn handshake(tls: &Tls, trusted: &[&[u8]]) -> (ClientConnection, ServerConnection) {
        crate::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for der in trusted {
            roots.add(CertificateDer::from(der.to_vec())).expect("root");
        }
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(DOMAIN).expect("name");
        let mut c = ClientConnection::new(Arc::new(cfg), name).expect("client");
        let mut s = ServerConnection::new(tls.acceptor.config().clone()).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).expect("client writes");
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                s.read_tls(&mut rd).expect("server reads");
                s.process_new_packets().expect("server handshake");
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).expect("server writes");
            }
            let mut rd = buf.as_slice();
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client reads");
                c.process_new_packets().expect("client handshake");
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return (c, s);
            }
        }
        panic!("handshake did not complete");
    }

    fn peer_cert(c: &ClientConnection) -> Vec<u8> {
        c.peer_certificates().expect("server certificate")[0].to_vec()
    }

    #[test]
    fn reload_serves_the_new_certificate_and_binds_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = write_pair(dir.path());
        let tls = load(dir.path(), &[DOMAIN.to_string()]).expect("load");
        let (c, s) = handshake(&tls, &[&old]);
        assert_eq!(peer_cert(&c), old);
        let cb = tls.bindings(&s);
        assert_eq!(cb.tls_server_end_point, Some(end_point_hash(&old)));

        let new = write_pair(dir.path());
        assert_eq!(tls.reload().expect("reload"), vec![DOMAIN.to_string()]);
        assert_eq!(tls.served_certificate(Some(DOMAIN)), new);
        assert_eq!(
            tls.served_certificate(None),
            new,
            "the primary domain's is the default"
        );
        // The acceptor is the same one: a clone taken before the reload serves the new one.
        let (c2, s2) = handshake(&tls.clone(), &[&old, &new]);
        assert_eq!(peer_cert(&c2), new);
        // Right after the replacement, a connection may have been handed either certificate:
        // tls-server-end-point is left out, tls-exporter stays.
        let cb = tls.bindings(&s2);
        assert_eq!(cb.tls_server_end_point, None);
        assert!(cb.tls_exporter.is_some());
        assert_eq!(cb.types(), ["tls-exporter"]);
        // Past the handshake window it binds to the certificate served now, the new one.
        tls.set_handshake_window(Duration::ZERO);
        let cb = tls.bindings(&s2);
        assert_eq!(cb.tls_server_end_point, Some(end_point_hash(&new)));
        // The connection made before the reload goes on.
        let (mut c, mut s) = (c, s);
        std::io::Write::write_all(&mut c.writer(), b"still here").expect("write");
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client writes");
        }
        s.read_tls(&mut buf.as_slice()).expect("server reads");
        s.process_new_packets().expect("server decrypts");
        let mut got = [0u8; 10];
        std::io::Read::read_exact(&mut s.reader(), &mut got).expect("read");
        assert_eq!(&got, b"still here");

        // Reloading unchanged files changes nothing.
        assert!(tls.reload().expect("reload").is_empty());
    }

    #[test]
    fn a_failed_reload_keeps_the_certificates_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = write_pair(dir.path());
        let tls = load(dir.path(), &[DOMAIN.to_string()]).expect("load");
        let (crt, key) = cert_paths(dir.path(), DOMAIN);
        let key_pem = std::fs::read(&key).expect("key");
        let crt_pem = std::fs::read(&crt).expect("crt");

        // A key cut off halfway through being written.
        std::fs::write(&key, &key_pem[..key_pem.len() / 2]).expect("write");
        let e = format!("{:#}", tls.reload().expect_err("half a key"));
        assert!(
            e.contains(&key.display().to_string()),
            "names the file: {e}"
        );
        assert_eq!(tls.served_certificate(None), good);

        // A new certificate whose key has not been written yet.
        std::fs::write(&key, &key_pem).expect("write");
        let other = rcgen::generate_simple_self_signed(vec![DOMAIN.to_string()]).expect("cert");
        std::fs::write(&crt, other.cert.pem()).expect("write");
        let e = format!("{:#}", tls.reload().expect_err("mismatched pair"));
        assert!(e.contains("does not hold the private key"), "{e}");
        assert_eq!(tls.served_certificate(None), good);

        // Garbage, an empty file, a missing file.
        std::fs::write(&crt, b"-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
        let e = format!("{:#}", tls.reload().expect_err("garbage"));
        assert!(
            e.contains(&crt.display().to_string()),
            "names the file: {e}"
        );
        std::fs::write(&crt, b"").expect("write");
        assert!(tls.reload().is_err(), "an empty certificate file");
        std::fs::remove_file(&crt).expect("remove");
        let e = format!("{:#}", tls.reload().expect_err("missing"));
        assert!(
            e.contains(&crt.display().to_string()),
            "names the file: {e}"
        );
        assert_eq!(tls.served_certificate(None), good);
        let (c, _) = handshake(&tls, &[&good]);
        assert_eq!(peer_cert(&c), good, "still served after every failure");

        // Once the files are whole again, the reload goes through.
        std::fs::write(&crt, &crt_pem).expect("write");
        assert!(tls.reload().expect("reload").is_empty(), "the same pair");
    }
}
