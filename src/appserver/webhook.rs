//! The generic webhook provider: one HTTP POST per notification, a JSON document signed with
//! HMAC-SHA256 so the receiver knows it comes from this server.
//!
//! ```text
//! POST <appserver.webhook.url>
//! Content-Type: application/json
//! X-Halyard-Signature: sha256=<hex HMAC-SHA256(appserver.webhook.secret, body)>
//!
//! {"node":"…","device_id":"…","token":"…","owner":"user@example.org","timestamp":1700000000,
//!  "message_count":"3","last_message_sender":"juliet@example.org","last_message_body":"…"}
//! ```
//!
//! Keys whose value the publish did not carry are left out (the body in particular is only
//! present when the user's server chose to send it). `timestamp` (seconds since the Unix epoch)
//! lets the receiver refuse replays. The receiver answers 2xx when it took the notification;
//! 404 or 410 when the device is gone (the registration is then removed and the user's server
//! told `item-not-found`); 429 or 5xx when it is temporarily unable (the sender retries).

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::{Method, Request, Uri};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::http::HttpClient;
use super::{classify, Notification, Outcome};
use crate::store::appserver::Registration;

pub const SIGNATURE_HEADER: &str = "x-halyard-signature";

pub struct Webhook {
    url: Uri,
    secret: Vec<u8>,
    http: HttpClient,
}

/// `sha256=<hex>` of the body under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error case cannot happen.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(7 + 64);
    hex.push_str("sha256=");
    for b in tag {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The JSON document for one notification.
pub fn document(reg: &Registration, n: &Notification, timestamp: u64) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("node".into(), reg.node.clone().into());
    m.insert("device_id".into(), reg.device_id.clone().into());
    m.insert("token".into(), reg.token.clone().into());
    m.insert("owner".into(), reg.owner.clone().into());
    m.insert("timestamp".into(), timestamp.into());
    for (k, v) in [
        ("message_count", &n.message_count),
        ("last_message_sender", &n.last_message_sender),
        ("last_message_body", &n.last_message_body),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), v.clone().into());
        }
    }
    Value::Object(m).to_string().into_bytes()
}

impl Webhook {
    pub fn new(cfg: &crate::config::Webhook, http: HttpClient) -> anyhow::Result<Webhook> {
        let url: Uri = cfg
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("appserver.webhook.url is not a valid URL: {e}"))?;
        Ok(Webhook {
            url,
            secret: cfg.secret.as_bytes().to_vec(),
            http,
        })
    }

    pub async fn deliver(&self, reg: &Registration, n: &Notification) -> Outcome {
        let body = document(reg, n, super::now_secs());
        let sig = signature(&self.secret, &body);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, sig)
            .body(Full::new(Bytes::from(body)));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(format!("building the webhook request: {e}")),
        };
        match self.http.send(req, false).await {
            Ok(a) => match a.status.as_u16() {
                404 | 410 => Outcome::Gone(format!("webhook answered {}", a.status)),
                _ => classify("webhook", a.status),
            },
            Err(e) => Outcome::Retry(format!("webhook: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::appserver::Provider;

    #[test]
    fn appserver_webhook_document_and_signature() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let reg = Registration {
            owner: "a@x".into(),
            device_id: "d".into(),
            provider: Provider::Webhook,
            token: "t".into(),
            node: "n".into(),
            secret: "s".into(),
            registered: 0,
        };
        let n = Notification {
            message_count: Some("2".into()),
            last_message_sender: Some("b@x".into()),
            last_message_body: None,
        };
        let v: Value = serde_json::from_slice(&document(&reg, &n, 7)).unwrap();
        assert_eq!(v["node"], "n");
        assert_eq!(v["message_count"], "2");
        assert_eq!(v["timestamp"], 7);
        assert!(v.get("last_message_body").is_none());
        assert!(v.get("secret").is_none(), "the push secret is not sent");
    }
}
