//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Authentication is OAuth2 with a service account (RFC 7523 JWT-bearer grant): an RS256 JWT
//! signed with the account's key (`iss` = `client_email`, `scope` = firebase.messaging, `aud` =
//! the token endpoint, one hour of validity) is exchanged at `token_uri` for an access token,
//! which is cached until five minutes before it expires. Each notification is a data-only
//! message with high Android priority, so the app wakes up and fetches the message over XMPP:
//!
//! ```text
//! POST {endpoint}/v1/projects/{project_id}/messages:send
//! Authorization: Bearer <access token>
//! {"message":{"token":"…","android":{"priority":"high"},
//!   "data":{"node":"…","device-id":"…","message-count":"3","last-message-sender":"…",
//!           "last-message-body":"…"}}}
//! ```
//!
//! A 404 (`UNREGISTERED`) or a 403 `SENDER_ID_MISMATCH` means the token is dead for us.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Uri};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::HttpClient;
use super::jwt::Rs256;
use super::{classify, Notification, Outcome};
use crate::store::appserver::Registration;

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// The fields of a service account key file that we use.
#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

pub struct Fcm {
    http: HttpClient,
    signer: Rs256,
    client_email: String,
    key_id: Option<String>,
    token_uri: Uri,
    send_uri: Uri,
    /// The access token and when to stop using it. The lock is held while a new one is fetched,
    /// so concurrent notifications share one fetch.
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

/// Why there is no access token.
enum TokenError {
    /// The token endpoint refused our credentials or could not be reached: the deployment's
    /// problem, not the device's, so the sender should retry later.
    Unavailable(String),
}

impl Fcm {
    pub fn new(cfg: &crate::config::Fcm, http: HttpClient) -> anyhow::Result<Fcm> {
        let path = &cfg.service_account_file;
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading appserver.fcm.service_account_file {}",
                path.display()
            )
        })?;
        let sa: ServiceAccount = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a service account key file", path.display()))?;
        let signer = Rs256::from_pem(&sa.private_key)
            .with_context(|| format!("the private_key of {}", path.display()))?;
        let project = if cfg.project_id.is_empty() {
            sa.project_id.clone().unwrap_or_default()
        } else {
            cfg.project_id.clone()
        };
        if project.is_empty() {
            anyhow::bail!(
                "no FCM project: set appserver.fcm.project_id (the service account file has none)"
            );
        }
        let token_uri = if cfg.token_uri.is_empty() {
            sa.token_uri
                .clone()
                .unwrap_or_else(|| "https://oauth2.googleapis.com/token".into())
        } else {
            cfg.token_uri.clone()
        };
        let token_uri: Uri = token_uri
            .parse()
            .with_context(|| format!("FCM token_uri {token_uri:?}"))?;
        let send = format!(
            "{}/v1/projects/{}/messages:send",
            cfg.endpoint.trim_end_matches('/'),
            project
        );
        let send_uri: Uri = send
            .parse()
            .with_context(|| format!("appserver.fcm.endpoint {:?}", cfg.endpoint))?;
        Ok(Fcm {
            http,
            signer,
            client_email: sa.client_email,
            key_id: sa.private_key_id,
            token_uri,
            send_uri,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The signed JWT-bearer assertion (RFC 7523 §2.1).
    fn assertion(&self, now: u64) -> Result<String, TokenError> {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri.to_string(),
            "iat": now,
            "exp": now + 3600,
        });
        self.signer
            .sign(&header, &claims)
            .map_err(|e| TokenError::Unavailable(format!("signing the FCM grant: {e}")))
    }

    async fn access_token(&self) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let assertion = self.assertion(super::now_secs())?;
        let form = format!(
            "grant_type={}&assertion={assertion}",
            form_encode(GRANT_TYPE)
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.token_uri.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| TokenError::Unavailable(format!("building the token request: {e}")))?;
        let a = self
            .http
            .send(req, false)
            .await
            .map_err(|e| TokenError::Unavailable(format!("FCM token endpoint: {e}")))?;
        if !a.status.is_success() {
            return Err(TokenError::Unavailable(format!(
                "FCM token endpoint answered {}",
                a.status
            )));
        }
        let v = a.json();
        let Some(token) = v["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(TokenError::Unavailable(
                "FCM token endpoint answered without access_token".into(),
            ));
        };
        let lifetime = v["expires_in"].as_u64().unwrap_or(3600);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(300).max(30));
        *cached = Some((token.to_string(), until));
        tracing::debug!(expires_in = lifetime, "FCM access token obtained");
        Ok(token.to_string())
    }

    pub async fn deliver(&self, reg: &Registration, n: &Notification) -> Outcome {
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(TokenError::Unavailable(e)) => return Outcome::Retry(e),
        };
        let mut data = Map::new();
        data.insert("node".into(), reg.node.clone().into());
        data.insert("device-id".into(), reg.device_id.clone().into());
        for (k, v) in [
            ("message-count", &n.message_count),
            ("last-message-sender", &n.last_message_sender),
            ("last-message-body", &n.last_message_body),
        ] {
            if let Some(v) = v {
                data.insert(k.into(), v.clone().into());
            }
        }
        let body = json!({"message": {
            "token": reg.token,
            "data": Value::Object(data),
            "android": {"priority": "high"},
        }});
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.send_uri.clone())
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body.to_string())));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("building the FCM request: {e}")),
        };
        let a = match self.http.send(req, false).await {
            Ok(a) => a,
            Err(e) => return Outcome::Retry(format!("FCM: {e}")),
        };
        let body = String::from_utf8_lossy(&a.body);
        match a.status.as_u16() {
            404 => Outcome::Gone("FCM: UNREGISTERED".into()),
            403 if body.contains("SENDER_ID_MISMATCH") => {
                Outcome::Gone("FCM: SENDER_ID_MISMATCH".into())
            }
            400 if body.contains("UNREGISTERED") => Outcome::Gone("FCM: UNREGISTERED".into()),
            401 => {
                // Our access token was refused: fetch a new one next time.
                *self.cached.lock().await = None;
                Outcome::Retry("FCM refused the access token".into())
            }
            _ => classify("FCM", a.status),
        }
    }
}

/// `application/x-www-form-urlencoded` for the few characters a grant type URN holds.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appserver_fcm_grant_type_is_form_encoded() {
        assert_eq!(
            form_encode(GRANT_TYPE),
            "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        );
    }
}
