//! The providers' HTTP client: hyper's pooled client over rustls (ring), trusting the system's
//! CA certificates plus an optional extra PEM file. One client speaks HTTP/1.1 or HTTP/2 as ALPN
//! decides (FCM, webhooks); APNs gets one that speaks HTTP/2 only, as Apple requires. Every
//! request, answer body included, is bounded by the configured timeout, and answer bodies by
//! [`MAX_BODY`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest provider answer read; providers answer with small JSON documents.
pub const MAX_BODY: usize = 64 * 1024;

type Inner = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
pub struct HttpClient {
    any: Inner,
    h2: Inner,
    timeout: Duration,
}

/// A provider's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, or `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Why a request got no answer. The message names the stage, never the URL's query or a header.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Request(String),
    #[error("reading the answer failed: {0}")]
    Body(String),
}

/// The client TLS configuration; ALPN is left to the connector builder (`h2` and `http/1.1`, or
/// `h2` alone).
fn tls_config(extra_ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        tracing::warn!("no system CA certificates found: provider connections will trust only appserver.extra_ca_file");
    }
    if !extra_ca_file.as_os_str().is_empty() {
        let pem = std::fs::read(extra_ca_file).with_context(|| {
            format!(
                "reading appserver.extra_ca_file {}",
                extra_ca_file.display()
            )
        })?;
        let mut n = 0;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.with_context(|| format!("parsing {}", extra_ca_file.display()))?;
            roots
                .add(c)
                .with_context(|| format!("adding a CA from {}", extra_ca_file.display()))?;
            n += 1;
        }
        if n == 0 {
            anyhow::bail!(
                "appserver.extra_ca_file {} holds no PEM certificate",
                extra_ca_file.display()
            );
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl HttpClient {
    pub fn new(extra_ca_file: &Path, timeout: Duration) -> anyhow::Result<HttpClient> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let tls = tls_config(extra_ca_file)?;
        let any = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http.clone());
        let h2 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        Ok(HttpClient {
            any: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(any),
            h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .pool_idle_timeout(Duration::from_secs(600))
                .build(h2),
            timeout,
        })
    }

    /// Sends `req` and reads the whole answer, within the timeout.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        h2_only: bool,
    ) -> Result<Answer, HttpError> {
        let client = if h2_only { &self.h2 } else { &self.any };
        let t = self.timeout;
        tokio::time::timeout(t, async {
            let res = client
                .request(req)
                .await
                .map_err(|e| HttpError::Request(error_chain(&e)))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| HttpError::Body(e.to_string()))?
                .to_bytes();
            Ok(Answer { status, body })
        })
        .await
        .map_err(|_| HttpError::Timeout(t))?
    }
}

/// An error with its sources, which is where hyper puts the reason (refused, TLS, ...).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
