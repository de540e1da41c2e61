//! Apple Push Notification service over HTTP/2 with token-based authentication.
//!
//! The provider token is an ES256 JWT (header `alg` ES256 and `kid` = key id; claims `iss` =
//! team id, `iat`), signed with the `.p8` key. Apple refuses tokens older than an hour and
//! throttles ones renewed more often than every 20 minutes, so one token is used for
//! [`TOKEN_REUSE`] (40 minutes), or until APNs calls it expired or invalid. Each notification is
//!
//! ```text
//! POST {endpoint}/3/device/{device token}          (HTTP/2 only)
//! authorization: bearer <provider token>
//! apns-topic: <bundle id>
//! apns-push-type: alert | background
//! apns-priority: 10 (alert) | 5 (background)
//! {"aps":{"alert":{"title":"…","body":"…"},"mutable-content":1,"sound":"default"},
//!  "node":"…","device-id":"…","message-count":"3","last-message-sender":"…"}
//! ```
//!
//! or, for `background`, `{"aps":{"content-available":1}, …}`. A 410 (`Unregistered`) or a 400
//! `BadDeviceToken` / `DeviceTokenNotForTopic` means the token is dead.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request};
use serde_json::{json, Map, Value};

use super::http::HttpClient;
use super::jwt::Es256;
use super::{classify, Notification, Outcome};
use crate::store::appserver::Registration;

/// How long one provider token is used (Apple: at most 60 minutes, renewed at most every 20).
pub const TOKEN_REUSE: Duration = Duration::from_secs(40 * 60);

pub struct Apns {
    http: HttpClient,
    signer: Es256,
    key_id: String,
    team_id: String,
    topic: String,
    base: String,
    background: bool,
    cached: std::sync::Mutex<Option<(String, Instant)>>,
}

/// Whether `token` looks like an APNs device token (hexadecimal, as the app gets it from
/// `didRegisterForRemoteNotificationsWithDeviceToken` and formats it).
pub fn valid_token(token: &str) -> bool {
    (32..=200).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Apns {
    pub fn new(cfg: &crate::config::Apns, http: HttpClient) -> anyhow::Result<Apns> {
        let pem = std::fs::read_to_string(&cfg.key_file).with_context(|| {
            format!("reading appserver.apns.key_file {}", cfg.key_file.display())
        })?;
        let signer = Es256::from_pem(&pem)
            .with_context(|| format!("appserver.apns.key_file {}", cfg.key_file.display()))?;
        let base = cfg.endpoint.trim_end_matches('/').to_string();
        // Checked once here so a request URI built from it can only fail on the device token,
        // which registration has already checked.
        base.parse::<hyper::Uri>()
            .with_context(|| format!("appserver.apns.endpoint {:?}", cfg.endpoint))?;
        Ok(Apns {
            http,
            signer,
            key_id: cfg.key_id.clone(),
            team_id: cfg.team_id.clone(),
            topic: cfg.topic.clone(),
            base,
            background: cfg.push_type == "background",
            cached: std::sync::Mutex::new(None),
        })
    }

    fn provider_token(&self) -> Result<String, String> {
        let mut cached = match self.cached.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some((t, made)) = cached.as_ref() {
            if made.elapsed() < TOKEN_REUSE {
                return Ok(t.clone());
            }
        }
        let t = self
            .signer
            .sign(
                &json!({"alg": "ES256", "kid": self.key_id}),
                &json!({"iss": self.team_id, "iat": super::now_secs()}),
            )
            .map_err(|e| format!("signing the APNs provider token: {e}"))?;
        *cached = Some((t.clone(), Instant::now()));
        Ok(t)
    }

    fn forget_token(&self) {
        match self.cached.lock() {
            Ok(mut c) => *c = None,
            Err(p) => *p.into_inner() = None,
        }
    }

    /// The JSON payload for one notification.
    pub fn payload(&self, reg: &Registration, n: &Notification) -> Value {
        let aps = if self.background {
            json!({"content-available": 1})
        } else {
            let mut alert = Map::new();
            alert.insert(
                "title".into(),
                n.last_message_sender
                    .clone()
                    .unwrap_or_else(|| "New message".into())
                    .into(),
            );
            alert.insert(
                "body".into(),
                n.last_message_body
                    .clone()
                    .unwrap_or_else(|| "You have a new message".into())
                    .into(),
            );
            json!({"alert": alert, "mutable-content": 1, "sound": "default"})
        };
        let mut m = Map::new();
        m.insert("aps".into(), aps);
        m.insert("node".into(), reg.node.clone().into());
        m.insert("device-id".into(), reg.device_id.clone().into());
        for (k, v) in [
            ("message-count", &n.message_count),
            ("last-message-sender", &n.last_message_sender),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        }
        Value::Object(m)
    }

    pub async fn deliver(&self, reg: &Registration, n: &Notification) -> Outcome {
        if !valid_token(&reg.token) {
            return Outcome::Gone("APNs device token is not hexadecimal".into());
        }
        let jwt = match self.provider_token() {
            Ok(t) => t,
            Err(e) => return Outcome::Retry(e),
        };
        let (push_type, priority) = if self.background {
            ("background", "5")
        } else {
            ("alert", "10")
        };
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/3/device/{}", self.base, reg.token))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(self.payload(reg, n).to_string())));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("building the APNs request: {e}")),
        };
        let a = match self.http.send(req, true).await {
            Ok(a) => a,
            Err(e) => return Outcome::Retry(format!("APNs: {e}")),
        };
        let reason = a.json()["reason"].as_str().unwrap_or("").to_string();
        match (a.status.as_u16(), reason.as_str()) {
            (410, _) => Outcome::Gone(format!("APNs: 410 {reason}")),
            (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                Outcome::Gone(format!("APNs: {reason}"))
            }
            (403, "ExpiredProviderToken" | "InvalidProviderToken") => {
                self.forget_token();
                Outcome::Retry(format!("APNs: {reason}"))
            }
            (s, _) if s >= 400 && !reason.is_empty() => {
                let o = classify("APNs", a.status);
                o.with_reason(&reason)
            }
            _ => classify("APNs", a.status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appserver_apns_token_shape() {
        assert!(valid_token(&"ab12".repeat(16)));
        assert!(!valid_token("../../x"));
        assert!(!valid_token(&"zz".repeat(32)));
    }
}
