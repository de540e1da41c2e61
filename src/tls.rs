//! TLS: certificates from `certs/` (or generated self-signed for development), one rustls
//! configuration for every TLS listener, and the channel-binding data SCRAM-PLUS needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConnection};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_rustls::TlsAcceptor;

use crate::sasl::scram::ChannelBindings;

/// The server's TLS state: the acceptor and, per domain, what tls-server-end-point binds to.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
}

#[derive(Debug)]
struct Resolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// RFC 5929 §4.1 hash of each domain's end-entity certificate.
    end_point: HashMap<String, Vec<u8>>,
    default_end_point: Vec<u8>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = hello
            .server_name()
            .and_then(|n| self.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.default);
        Some(key.clone())
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
    let mut by_name = HashMap::new();
    let mut end_point = HashMap::new();
    let mut first = None;
    for domain in domains {
        let (crt, key) = cert_paths(certs_dir, domain);
        if !crt.exists() && !key.exists() {
            generate(certs_dir, domain)?;
        }
        let chain = read_chain(&crt)?;
        let key_der = read_key(&key)?;
        let signing = provider
            .key_provider
            .load_private_key(key_der)
            .with_context(|| format!("unsupported private key in {}", key.display()))?;
        let ck = Arc::new(CertifiedKey::new(chain.clone(), signing));
        let hash = chain
            .first()
            .map(|c| end_point_hash(c.as_ref()))
            .unwrap_or_default();
        first.get_or_insert_with(|| (ck.clone(), hash.clone()));
        by_name.insert(domain.clone(), ck);
        end_point.insert(domain.clone(), hash);
    }
    let (default, default_end_point) = first.context("no domain configured")?;
    let resolver = Arc::new(Resolver {
        by_name,
        default,
        end_point,
        default_end_point,
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
        let ep = conn
            .server_name()
            .and_then(|n| self.resolver.end_point.get(&n.to_ascii_lowercase()))
            .unwrap_or(&self.resolver.default_end_point)
            .clone();
        ChannelBindings {
            tls_exporter,
            tls_server_end_point: Some(ep),
            tls: true,
        }
    }
}
