//! The built-in XEP-0357 app server (`push.localhost`): device registration with ad-hoc
//! commands over a real client socket, publishes delivered to local stand-ins of FCM (OAuth2
//! JWT-bearer grant + HTTP v1 send), APNs (HTTP/2 over TLS, ES256 provider token) and a signed
//! webhook, and the answers the sender gets.
//!
//! The stand-ins check what the real providers check (signatures with the public keys, the
//! bearer token, required headers) and refuse what they would refuse, so a request of the
//! wrong shape fails the test twice: by the stand-in's answer and by the recorded request.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use minidom::Element;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

use super::common::*;

const PW: &str = "pw";
const PUSH: &str = "push.localhost";
const NS_COMMANDS: &str = "http://jabber.org/protocol/commands";
const NS_DATA: &str = "jabber:x:data";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";

const SA_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fcm-test-service-account.json"
);
const SA_PUBLIC: &str = include_str!("../fixtures/fcm-test-public-key.pem");
const CLIENT_EMAIL: &str = "halyard-test@halyard-test.iam.gserviceaccount.com";
const APNS_KEY_ID: &str = "KEY1234567";
const APNS_TEAM: &str = "TEAM123456";
const APNS_TOPIC: &str = "org.halyard.test";
const HOOK_SECRET: &str = "webhook-test-secret";

/// Device tokens the stand-ins treat specially.
const FCM_DEAD: &str = "fcm-dead-token";
const FCM_BUSY: &str = "fcm-busy-token";
fn apns_good() -> String {
    "ab".repeat(32)
}
fn apns_dead() -> String {
    format!("dead{}", "0".repeat(60))
}
const HOOK_GONE: &str = "hook-gone";
const HOOK_BUSY: &str = "hook-busy";

// ---------------------------------------------------------------------------------------------
// Stand-ins
// ---------------------------------------------------------------------------------------------

/// One request as a stand-in received it.
#[derive(Debug, Clone)]
struct Recorded {
    version: Version,
    path: String,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

type Responder = Box<dyn Fn(&Recorded) -> (u16, String) + Send + Sync>;

struct StandIn {
    log: Mutex<Vec<Recorded>>,
    respond: Responder,
}

impl StandIn {
    fn requests(&self, path_prefix: &str) -> Vec<Recorded> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let version = req.version();
        let path = req.uri().path().to_string();
        let headers = req.headers().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let rec = Recorded {
            version,
            path,
            headers,
            body,
        };
        let (status, body) = (self.respond)(&rec);
        self.log.lock().unwrap().push(rec);
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    }
}

/// Serves `stand_in` on a loopback port: HTTP/1.1 in the clear, or HTTP/2 only over TLS.
async fn serve(stand_in: Arc<StandIn>, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let s = stand_in.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(s.handle(req).await) }
                });
                match tls {
                    Some(acc) => {
                        let Ok(stream) = acc.accept(tcp).await else {
                            return;
                        };
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    }
                    None => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tcp), svc)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

fn b64url(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| format!("{e}"))
        .unwrap_or_default()
}

/// Verifies a compact JWS with `public`; returns (header, claims).
fn verify_jwt(
    jwt: &str,
    alg: &'static dyn VerificationAlgorithm,
    public: &[u8],
) -> Result<(Value, Value), String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return Err("not a compact JWS".into());
    }
    let input = format!("{}.{}", parts[0], parts[1]);
    UnparsedPublicKey::new(alg, public)
        .verify(input.as_bytes(), &b64url(parts[2]))
        .map_err(|_| "bad signature".to_string())?;
    let header = serde_json::from_slice(&b64url(parts[0])).map_err(|e| e.to_string())?;
    let claims = serde_json::from_slice(&b64url(parts[1])).map_err(|e| e.to_string())?;
    Ok((header, claims))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The service account's public key (PKCS#1 DER) from the committed PEM.
fn sa_public_key() -> Vec<u8> {
    let b64: String = SA_PUBLIC
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn form_field<'a>(form: &'a str, key: &str) -> Option<&'a str> {
    form.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Google's OAuth2 token endpoint and the FCM v1 send endpoint, on one HTTP/1.1 port.
fn fcm_stand_in(token_uri: Arc<Mutex<String>>) -> Arc<StandIn> {
    let issued: Arc<Mutex<HashSet<String>>> = Default::default();
    let public = sa_public_key();
    Arc::new(StandIn {
        log: Mutex::default(),
        respond: Box::new(move |r| {
            let err = |code: u16, status: &str, msg: &str| {
                (
                    code,
                    json!({"error": {"code": code, "status": status, "message": msg}}).to_string(),
                )
            };
            if r.path == "/token" {
                let form = String::from_utf8_lossy(&r.body).to_string();
                if r.header("content-type") != Some("application/x-www-form-urlencoded") {
                    return err(400, "invalid_request", "content type");
                }
                if form_field(&form, "grant_type")
                    != Some("urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
                {
                    return err(400, "unsupported_grant_type", "grant_type");
                }
                let Some(assertion) = form_field(&form, "assertion") else {
                    return err(400, "invalid_request", "no assertion");
                };
                let (h, c) =
                    match verify_jwt(assertion, &signature::RSA_PKCS1_2048_8192_SHA256, &public) {
                        Ok(v) => v,
                        Err(e) => return err(400, "invalid_grant", &e),
                    };
                let t = now();
                let iat = c["iat"].as_u64().unwrap_or(0);
                let exp = c["exp"].as_u64().unwrap_or(0);
                let ok = h["alg"] == "RS256"
                    && c["iss"] == CLIENT_EMAIL
                    && c["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
                    && c["aud"] == *token_uri.lock().unwrap()
                    && iat <= t + 60
                    && exp > t
                    && exp - iat <= 3600;
                if !ok {
                    return err(400, "invalid_grant", &format!("claims {c}"));
                }
                let mut set = issued.lock().unwrap();
                let tok = format!("ya29.test-{}", set.len());
                set.insert(tok.clone());
                return (
                    200,
                    json!({"access_token": tok, "expires_in": 3599, "token_type": "Bearer"})
                        .to_string(),
                );
            }
            if r.path != "/v1/projects/halyard-test/messages:send" {
                return err(404, "NOT_FOUND", "no such path");
            }
            let bearer = r
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("");
            if !issued.lock().unwrap().contains(bearer) {
                return err(401, "UNAUTHENTICATED", "bad bearer");
            }
            let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
                return err(400, "INVALID_ARGUMENT", "not JSON");
            };
            let m = &v["message"];
            let data_ok = m["data"]
                .as_object()
                .is_some_and(|d| d.values().all(Value::is_string));
            if !m["token"].is_string() || !data_ok {
                return err(400, "INVALID_ARGUMENT", "message.token and string data");
            }
            match m["token"].as_str() {
                Some(FCM_DEAD) => (
                    404,
                    json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
                        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}})
                    .to_string(),
                ),
                Some(FCM_BUSY) => err(503, "UNAVAILABLE", "try later"),
                _ => (
                    200,
                    json!({"name": "projects/halyard-test/messages/0:1"}).to_string(),
                ),
            }
        }),
    })
}

/// APNs: HTTP/2 only, checks the provider token and the required headers.
fn apns_stand_in(public: Vec<u8>) -> Arc<StandIn> {
    Arc::new(StandIn {
        log: Mutex::default(),
        respond: Box::new(move |r| {
            let reason = |code: u16, reason: &str| (code, json!({"reason": reason}).to_string());
            if r.version != Version::HTTP_2 {
                return reason(505, "HTTP2Required");
            }
            let Some(token) = r.path.strip_prefix("/3/device/") else {
                return reason(404, "BadPath");
            };
            let Some(jwt) = r
                .header("authorization")
                .and_then(|a| a.strip_prefix("bearer "))
            else {
                return reason(403, "MissingProviderToken");
            };
            let Ok((h, c)) = verify_jwt(jwt, &signature::ECDSA_P256_SHA256_FIXED, &public) else {
                return reason(403, "InvalidProviderToken");
            };
            let iat = c["iat"].as_u64().unwrap_or(0);
            if h["alg"] != "ES256" || h["kid"] != APNS_KEY_ID || c["iss"] != APNS_TEAM {
                return reason(403, "InvalidProviderToken");
            }
            if iat + 3600 < now() || iat > now() + 60 {
                return reason(403, "ExpiredProviderToken");
            }
            if r.header("apns-topic") != Some(APNS_TOPIC) {
                return reason(400, "TopicDisallowed");
            }
            match (r.header("apns-push-type"), r.header("apns-priority")) {
                (Some("alert"), Some("10")) | (Some("background"), Some("5")) => {}
                _ => return reason(400, "InvalidPushType"),
            }
            if serde_json::from_slice::<Value>(&r.body).map_or(true, |v| !v["aps"].is_object()) {
                return reason(400, "PayloadEmpty");
            }
            if token == apns_dead() {
                return (
                    410,
                    json!({"reason": "Unregistered", "timestamp": now() * 1000}).to_string(),
                );
            }
            (200, String::new())
        }),
    })
}

fn webhook_stand_in() -> Arc<StandIn> {
    Arc::new(StandIn {
        log: Mutex::default(),
        respond: Box::new(|r| {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
            mac.update(&r.body);
            let hex: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if r.header("x-halyard-signature") != Some(format!("sha256={hex}").as_str()) {
                return (401, "{}".into());
            }
            match serde_json::from_slice::<Value>(&r.body).ok() {
                Some(v) if v["token"] == HOOK_GONE => (410, "{}".into()),
                Some(v) if v["token"] == HOOK_BUSY => (503, "{}".into()),
                Some(_) => (204, String::new()),
                None => (400, "{}".into()),
            }
        }),
    })
}

/// All three providers' stand-ins and the files the server needs to reach them.
struct Providers {
    fcm: Arc<StandIn>,
    apns: Arc<StandIn>,
    hook: Arc<StandIn>,
    fcm_addr: SocketAddr,
    apns_addr: SocketAddr,
    hook_addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Providers {
    async fn start() -> Providers {
        halyard::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        // APNs: a signing key (the .p8) and a TLS certificate trusted through extra_ca_file.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        std::fs::write(dir.path().join("apns.p8"), key.serialize_pem()).unwrap();
        let public = key.public_key_raw().to_vec();
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ck.cert.pem()).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];

        let token_uri = Arc::new(Mutex::new(String::new()));
        let fcm = fcm_stand_in(token_uri.clone());
        let fcm_addr = serve(fcm.clone(), None).await;
        *token_uri.lock().unwrap() = format!("http://{fcm_addr}/token");
        let apns = apns_stand_in(public);
        let apns_addr = serve(
            apns.clone(),
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
        )
        .await;
        let hook = webhook_stand_in();
        let hook_addr = serve(hook.clone(), None).await;
        Providers {
            fcm,
            apns,
            hook,
            fcm_addr,
            apns_addr,
            hook_addr,
            dir,
        }
    }

    fn configure(&self, cfg: &mut halyard::config::Config) {
        let a = &mut cfg.appserver;
        a.enabled = true;
        a.timeout_secs = 5;
        a.extra_ca_file = self.dir.path().join("ca.pem");
        a.fcm.service_account_file = PathBuf::from(SA_FILE);
        a.fcm.endpoint = format!("http://{}", self.fcm_addr);
        a.fcm.token_uri = format!("http://{}/token", self.fcm_addr);
        a.apns.key_file = self.dir.path().join("apns.p8");
        a.apns.key_id = APNS_KEY_ID.into();
        a.apns.team_id = APNS_TEAM.into();
        a.apns.topic = APNS_TOPIC.into();
        a.apns.endpoint = format!("https://127.0.0.1:{}", self.apns_addr.port());
        a.webhook.url = format!("http://{}/hook", self.hook_addr);
        a.webhook.secret = HOOK_SECRET.into();
    }

    async fn server(&self) -> TestServer {
        let s = TestServer::start_with(|c| self.configure(c)).await;
        s.add_user("alice", PW).await;
        s
    }

    async fn server_in(&self, data_dir: &Path) -> TestServer {
        TestServer::start_with(|c| {
            self.configure(c);
            c.data_dir = data_dir.to_path_buf();
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

async fn iq(c: &mut RawClient, id: &str, typ: &str, payload: &str) -> Element {
    c.send(&format!(
        "<iq type='{typ}' id='{id}' to='{PUSH}'>{payload}</iq>"
    ))
    .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
        .await
}

fn command_xml(node: &str, fields: &[(&str, &str)]) -> String {
    let f: String = fields
        .iter()
        .map(|(k, v)| format!("<field var='{k}'><value>{v}</value></field>"))
        .collect();
    format!("<command xmlns='{NS_COMMANDS}' node='{node}' action='execute'><x xmlns='{NS_DATA}' type='submit'>{f}</x></command>")
}

fn result_fields(r: &Element) -> Vec<(String, String)> {
    r.get_child("command", NS_COMMANDS)
        .and_then(|c| c.get_child("x", NS_DATA))
        .map(|x| {
            x.children()
                .filter(|f| f.is("field", NS_DATA))
                .map(|f| {
                    (
                        f.attr("var").unwrap_or("").to_string(),
                        f.children().next().map(|v| v.text()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs a register command; returns (node, secret).
async fn register(c: &mut RawClient, cmd: &str, token: &str, device: &str) -> (String, String) {
    let r = iq(
        c,
        &format!("reg-{device}-{token}"),
        "set",
        &command_xml(cmd, &[("token", token), ("device-id", device)]),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    assert_eq!(r.attr("from"), Some(PUSH));
    let c_el = r.get_child("command", NS_COMMANDS).expect("command");
    assert_eq!(c_el.attr("status"), Some("completed"), "{}", xml(&r));
    let f = result_fields(&r);
    let get = |k: &str| {
        f.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in {}", xml(&r)))
    };
    let (node, secret) = (get("node"), get("secret"));
    assert!(!node.is_empty() && secret.len() >= 16, "{}", xml(&r));
    (node, secret)
}

fn publish_xml(node: &str, secret: Option<&str>, body: Option<&str>) -> String {
    let body = body
        .map(|b| format!("<field var='last-message-body'><value>{b}</value></field>"))
        .unwrap_or_default();
    let opts = secret
        .map(|s| format!("<publish-options><x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#publish-options</value></field><field var='secret'><value>{s}</value></field></x></publish-options>"))
        .unwrap_or_default();
    format!(
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='{node}'><item>\
         <notification xmlns='urn:xmpp:push:0'><x xmlns='{NS_DATA}' type='submit'>\
         <field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>\
         <field var='message-count'><value>2</value></field>\
         <field var='last-message-sender'><value>juliet@capulet.example/balcony</value></field>\
         {body}</x></notification></item></publish>{opts}</pubsub>"
    )
}

async fn publish(
    c: &mut RawClient,
    id: &str,
    node: &str,
    secret: Option<&str>,
    body: Option<&str>,
) -> Element {
    iq(c, id, "set", &publish_xml(node, secret, body)).await
}

/// The error's condition and type.
fn error_of(r: &Element) -> (String, String) {
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(r));
    let t = r
        .get_child("error", NS_CLIENT)
        .and_then(|e| e.attr("type"))
        .unwrap_or("")
        .to_string();
    (stanza_error(r).unwrap_or_default(), t)
}

fn assert_delivered(r: &Element) {
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(r));
    assert_eq!(r.attr("from"), Some(PUSH));
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn appserver_disco_shows_push_identity_and_commands() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;

    let r = iq(
        &mut c,
        "i1",
        "get",
        &format!("<query xmlns='{NS_DISCO_INFO}'/>"),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    let q = r.get_child("query", NS_DISCO_INFO).unwrap();
    assert!(q.children().any(|i| i.is("identity", NS_DISCO_INFO)
        && i.attr("category") == Some("pubsub")
        && i.attr("type") == Some("push")));
    let features: Vec<_> = q.children().filter_map(|f| f.attr("var")).collect();
    for f in [NS_COMMANDS, "urn:xmpp:push:0", NS_DISCO_INFO] {
        assert!(features.contains(&f), "{f} missing: {}", xml(&r));
    }

    let r = iq(
        &mut c,
        "i2",
        "get",
        &format!("<query xmlns='{NS_DISCO_ITEMS}' node='{NS_COMMANDS}'/>"),
    )
    .await;
    let mut nodes: Vec<_> = r
        .get_child("query", NS_DISCO_ITEMS)
        .unwrap()
        .children()
        .map(|i| {
            assert_eq!(i.attr("jid"), Some(PUSH));
            i.attr("node").unwrap().to_string()
        })
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [
            "register-push-apns",
            "register-push-fcm",
            "register-push-webhook",
            "unregister-push"
        ]
    );

    // The server lists the component among its items.
    c.send(&format!(
        "<iq type='get' id='i3' to='{DOMAIN}'><query xmlns='{NS_DISCO_ITEMS}'/></iq>"
    ))
    .await;
    let r = c.recv_until(|e| e.attr("id") == Some("i3")).await;
    assert!(
        r.get_child("query", NS_DISCO_ITEMS)
            .unwrap()
            .children()
            .any(|i| i.attr("jid") == Some(PUSH)),
        "{}",
        xml(&r)
    );

    // Executing a command without a form returns the form to fill in.
    let r = iq(
        &mut c,
        "i4",
        "set",
        &format!("<command xmlns='{NS_COMMANDS}' node='register-push-fcm' action='execute'/>"),
    )
    .await;
    let cmd = r.get_child("command", NS_COMMANDS).expect("command");
    assert_eq!(cmd.attr("status"), Some("executing"), "{}", xml(&r));
    let x = cmd.get_child("x", NS_DATA).expect("form");
    assert_eq!(x.attr("type"), Some("form"));
    let vars: Vec<_> = x.children().filter_map(|f| f.attr("var")).collect();
    assert_eq!(vars, ["token", "device-id"]);
}

#[tokio::test]
async fn appserver_fcm_publish_uses_jwt_grant_and_data_message() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-fcm", "fcm-token-1", "pixel").await;

    let r = publish(
        &mut c,
        "p1",
        &node,
        Some(&secret),
        Some("wherefore art thou"),
    )
    .await;
    assert_delivered(&r);
    let r = publish(&mut c, "p2", &node, Some(&secret), None).await;
    assert_delivered(&r);

    // One grant, verified by the stand-in; the access token is reused.
    assert_eq!(p.fcm.requests("/token").len(), 1);
    let sends = p.fcm.requests("/v1/");
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[0].header("authorization"), Some("Bearer ya29.test-0"));
    let m = &sends[0].json()["message"];
    assert_eq!(m["token"], "fcm-token-1");
    assert_eq!(m["android"]["priority"], "high");
    assert!(m.get("notification").is_none(), "data-only message: {m}");
    let d = &m["data"];
    assert_eq!(d["node"], node.as_str());
    assert_eq!(d["device-id"], "pixel");
    assert_eq!(d["message-count"], "2");
    assert_eq!(d["last-message-sender"], "juliet@capulet.example/balcony");
    assert_eq!(d["last-message-body"], "wherefore art thou");
    let d2 = &sends[1].json()["message"]["data"];
    assert!(d2.get("last-message-body").is_none(), "{d2}");
    // The push secret never leaves the app server.
    assert!(!String::from_utf8_lossy(&sends[0].body).contains(&secret));
}

#[tokio::test]
async fn appserver_apns_publish_over_http2_with_provider_token() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-apns", &apns_good(), "iphone").await;

    let r = publish(&mut c, "p1", &node, Some(&secret), Some("hello")).await;
    assert_delivered(&r);
    let reqs = p.apns.requests("/3/device/");
    assert_eq!(reqs.len(), 1);
    let q = &reqs[0];
    assert_eq!(q.version, Version::HTTP_2);
    assert_eq!(q.path, format!("/3/device/{}", apns_good()));
    assert_eq!(q.header("apns-topic"), Some(APNS_TOPIC));
    assert_eq!(q.header("apns-push-type"), Some("alert"));
    assert_eq!(q.header("apns-priority"), Some("10"));
    let v = q.json();
    assert_eq!(v["aps"]["alert"]["body"], "hello");
    assert_eq!(v["aps"]["mutable-content"], 1);
    assert_eq!(v["node"], node.as_str());
    assert_eq!(v["message-count"], "2");

    // The provider token is reused for the next notification.
    let r = publish(&mut c, "p2", &node, Some(&secret), None).await;
    assert_delivered(&r);
    let reqs = p.apns.requests("/3/device/");
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs[0].header("authorization"),
        reqs[1].header("authorization")
    );
}

#[tokio::test]
async fn appserver_webhook_publish_is_signed() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-webhook", "hook-dev-1", "laptop").await;
    let r = publish(&mut c, "p1", &node, Some(&secret), None).await;
    assert_delivered(&r);
    let reqs = p.hook.requests("/hook");
    assert_eq!(reqs.len(), 1);
    // The stand-in answered 204 only because the signature verified; check the document too.
    let v = reqs[0].json();
    assert_eq!(v["node"], node.as_str());
    assert_eq!(v["device_id"], "laptop");
    assert_eq!(v["token"], "hook-dev-1");
    assert_eq!(v["owner"], "alice@localhost");
    assert_eq!(v["message_count"], "2");
    assert_eq!(v["last_message_sender"], "juliet@capulet.example/balcony");
    assert!(v.get("last_message_body").is_none(), "{v}");
    assert!(reqs[0]
        .header("x-halyard-signature")
        .is_some_and(|h| h.starts_with("sha256=") && h.len() == 71));
}

/// `appserver.max_per_device_per_minute`: a device is sent that many notifications a minute;
/// the next publish gets resource-constraint (wait) naming the limit, and nothing reaches the
/// provider; another device is unaffected.
#[tokio::test]
async fn appserver_limits_notifications_per_device_per_minute() {
    let p = Providers::start().await;
    let s = TestServer::start_with(|c| {
        p.configure(c);
        c.appserver.max_per_device_per_minute = 2;
    })
    .await;
    s.add_user("alice", PW).await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-webhook", "hook-rate-1", "one").await;
    let (node2, secret2) = register(&mut c, "register-push-webhook", "hook-rate-2", "two").await;
    for id in ["r1", "r2"] {
        assert_delivered(&publish(&mut c, id, &node, Some(&secret), None).await);
    }
    let r = publish(&mut c, "r3", &node, Some(&secret), None).await;
    assert_eq!(error_of(&r), ("resource-constraint".into(), "wait".into()));
    let text = r
        .get_child("error", NS_CLIENT)
        .and_then(|e| e.get_child("text", NS_STANZAS))
        .map(|t| t.text())
        .unwrap_or_default();
    assert!(text.contains("max_per_device_per_minute"), "{text}");
    assert_eq!(p.hook.requests("/hook").len(), 2, "the third never left");
    assert_delivered(&publish(&mut c, "r4", &node2, Some(&secret2), None).await);
    assert_eq!(p.hook.requests("/hook").len(), 3);
}

#[tokio::test]
async fn appserver_refuses_wrong_secret_unknown_node_and_bad_registrations() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-fcm", "fcm-token-2", "pixel").await;

    let r = publish(&mut c, "p1", &node, Some("not-the-secret"), None).await;
    assert_eq!(error_of(&r), ("forbidden".into(), "auth".into()));
    let r = publish(&mut c, "p2", &node, None, None).await;
    assert_eq!(error_of(&r), ("not-authorized".into(), "auth".into()));
    let r = publish(&mut c, "p3", "no-such-node", Some(&secret), None).await;
    assert_eq!(error_of(&r), ("item-not-found".into(), "cancel".into()));
    assert!(
        p.fcm.requests("/").is_empty(),
        "nothing reaches the provider"
    );

    // Registrations without a token, or an APNs token that is not hexadecimal, are refused.
    let r = iq(
        &mut c,
        "r1",
        "set",
        &command_xml("register-push-fcm", &[("device-id", "x")]),
    )
    .await;
    assert_eq!(error_of(&r).0, "bad-request");
    let r = iq(
        &mut c,
        "r2",
        "set",
        &command_xml(
            "register-push-apns",
            &[("token", "../../etc"), ("device-id", "x")],
        ),
    )
    .await;
    assert_eq!(error_of(&r).0, "bad-request");
    let r = iq(
        &mut c,
        "r3",
        "set",
        &command_xml("no-such-command", &[("device-id", "x")]),
    )
    .await;
    assert_eq!(error_of(&r).0, "item-not-found");
}

#[tokio::test]
async fn appserver_dead_token_yields_item_not_found_and_removes_registration() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (fnode, fsecret) = register(&mut c, "register-push-fcm", FCM_DEAD, "old-pixel").await;
    let (anode, asecret) = register(&mut c, "register-push-apns", &apns_dead(), "old-iphone").await;
    let (hnode, hsecret) = register(&mut c, "register-push-webhook", HOOK_GONE, "old-hook").await;

    for (i, (node, secret)) in [(&fnode, &fsecret), (&anode, &asecret), (&hnode, &hsecret)]
        .into_iter()
        .enumerate()
    {
        let r = publish(&mut c, &format!("d{i}"), node, Some(secret), None).await;
        assert_eq!(error_of(&r), ("item-not-found".into(), "cancel".into()));
        // The registration is gone: the next publish is refused without asking the provider.
        let r = publish(&mut c, &format!("e{i}"), node, Some(secret), None).await;
        assert_eq!(error_of(&r).0, "item-not-found");
    }
    assert_eq!(p.fcm.requests("/v1/").len(), 1);
    assert_eq!(p.apns.requests("/3/").len(), 1);
    assert_eq!(p.hook.requests("/hook").len(), 1);
}

#[tokio::test]
async fn appserver_provider_failure_yields_wait_error_and_keeps_registration() {
    let p = Providers::start().await;
    let s = p.server().await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (fnode, fsecret) = register(&mut c, "register-push-fcm", FCM_BUSY, "pixel").await;
    let (hnode, hsecret) = register(&mut c, "register-push-webhook", HOOK_BUSY, "hook").await;
    for round in 0..2 {
        let r = publish(&mut c, &format!("f{round}"), &fnode, Some(&fsecret), None).await;
        assert_eq!(error_of(&r).1, "wait", "{}", xml(&r));
        let r = publish(&mut c, &format!("h{round}"), &hnode, Some(&hsecret), None).await;
        assert_eq!(error_of(&r).1, "wait", "{}", xml(&r));
    }
    // Both attempts reached the provider: a temporary failure keeps the registration.
    assert_eq!(p.fcm.requests("/v1/").len(), 2);
    assert_eq!(p.hook.requests("/hook").len(), 2);
}

#[tokio::test]
async fn appserver_unregister_push_removes_the_device() {
    let p = Providers::start().await;
    let s = p.server().await;
    s.add_user("bob", PW).await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-fcm", "fcm-token-3", "pixel").await;

    // Another account cannot unregister alice's device.
    let mut b = RawClient::login(&s, "bob", PW, "phone").await;
    let r = iq(
        &mut b,
        "u0",
        "set",
        &command_xml("unregister-push", &[("device-id", "pixel")]),
    )
    .await;
    assert_eq!(error_of(&r).0, "item-not-found");
    assert_delivered(&publish(&mut c, "p0", &node, Some(&secret), None).await);

    let r = iq(
        &mut c,
        "u1",
        "set",
        &command_xml("unregister-push", &[("device-id", "pixel")]),
    )
    .await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    assert_eq!(
        r.get_child("command", NS_COMMANDS)
            .and_then(|c| c.attr("status")),
        Some("completed")
    );
    let r = publish(&mut c, "p1", &node, Some(&secret), None).await;
    assert_eq!(error_of(&r).0, "item-not-found");
    let r = iq(
        &mut c,
        "u2",
        "set",
        &command_xml("unregister-push", &[("device-id", "pixel")]),
    )
    .await;
    assert_eq!(error_of(&r).0, "item-not-found");
    assert_eq!(p.fcm.requests("/v1/").len(), 1);
}

#[tokio::test]
async fn appserver_registrations_survive_restart_and_reregistration_keeps_node() {
    let p = Providers::start().await;
    let data = tempfile::tempdir().unwrap();
    let s = p.server_in(data.path()).await;
    s.add_user("alice", PW).await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-fcm", "fcm-token-4", "pixel").await;
    drop(c);
    s.stop().await;

    let s = p.server_in(data.path()).await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    assert_delivered(&publish(&mut c, "p1", &node, Some(&secret), None).await);
    // The app registers again with a new token: same node and secret, new token used.
    let again = register(&mut c, "register-push-fcm", "fcm-token-5", "pixel").await;
    assert_eq!(again, (node.clone(), secret.clone()));
    // Conversations names the field `android-id`: the same device.
    let r = iq(
        &mut c,
        "conv",
        "set",
        &command_xml(
            "register-push-fcm",
            &[("token", "fcm-token-5"), ("android-id", "pixel")],
        ),
    )
    .await;
    let f = result_fields(&r);
    assert!(
        f.contains(&("node".to_string(), node.clone())),
        "{}",
        xml(&r)
    );
    assert_delivered(&publish(&mut c, "p2", &node, Some(&secret), None).await);
    let sends = p.fcm.requests("/v1/");
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[0].json()["message"]["token"], "fcm-token-4");
    assert_eq!(sends[1].json()["message"]["token"], "fcm-token-5");
}

#[tokio::test]
async fn appserver_provider_timeout_yields_wait_error_without_blocking_the_session() {
    // A webhook that accepts connections and never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            h.lock().unwrap().push(tcp);
        }
    });
    let p = Providers::start().await;
    let s = TestServer::start_with(|c| {
        p.configure(c);
        c.appserver.timeout_secs = 1;
        c.appserver.webhook.url = format!("http://{addr}/hook");
    })
    .await;
    s.add_user("alice", PW).await;
    let mut c = RawClient::login(&s, "alice", PW, "phone").await;
    let (node, secret) = register(&mut c, "register-push-webhook", "hook-dev", "laptop").await;
    let started = std::time::Instant::now();
    c.send(&format!(
        "<iq type='set' id='t1' to='{PUSH}'>{}</iq>",
        publish_xml(&node, Some(&secret), None)
    ))
    .await;
    // The delivery waits on its own task: the session goes on meanwhile.
    c.send(&format!(
        "<iq type='get' id='ping1' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let first = c.recv_until(|e| e.name() == "iq").await;
    assert_eq!(first.attr("id"), Some("ping1"), "{}", xml(&first));
    let r = c.recv_until(|e| e.attr("id") == Some("t1")).await;
    assert_eq!(
        error_of(&r),
        ("internal-server-error".into(), "wait".into())
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(
        held.lock().unwrap().len(),
        1,
        "the request reached the webhook"
    );
}

// ---------------------------------------------------------------------------------------------
// The whole chain: a message for a user without a live stream → the push module's durable
// queue → a publish to the built-in app server → the provider (here the webhook stand-in).
// ---------------------------------------------------------------------------------------------

/// Bob registers a webhook device and enables push at his server with the node and secret he
/// got, as the companion app does; then his phone goes away.
async fn bob_registers_and_leaves(s: &TestServer, token: &str) {
    let mut bob = RawClient::login(s, "bob", PW, "phone").await;
    let (node, secret) = register(&mut bob, "register-push-webhook", token, "bob-phone").await;
    bob.send(&format!(
        "<iq type='set' id='en'><enable xmlns='urn:xmpp:push:0' jid='{PUSH}' node='{node}'>\
         <x xmlns='{NS_DATA}' type='submit'><field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>\
         <field var='secret'><value>{secret}</value></field></x></enable></iq>"
    ))
    .await;
    let r = bob.recv_until(|e| e.attr("id") == Some("en")).await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    bob.send("</stream:stream>").await;
    while let Some(ev) = bob.next_event().await {
        if matches!(ev, halyard::stream::StreamEvent::Close) {
            break;
        }
    }
}

/// Waits until the stand-in has recorded `n` requests under `path`, at most `limit`.
async fn wait_requests(s: &StandIn, path: &str, n: usize, limit: std::time::Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if s.requests(path).len() >= n {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    false
}

#[tokio::test]
async fn a_burst_for_an_absent_phone_reaches_the_webhook_coalesced() {
    let p = Providers::start().await;
    let s = TestServer::start_with(|c| {
        p.configure(c);
        c.push.coalesce_window_ms = 1_000;
    })
    .await;
    for u in ["alice", "bob"] {
        s.add_user(u, PW).await;
    }
    bob_registers_and_leaves(&s, "bob-hook-token").await;
    let mut alice = RawClient::login(&s, "alice", PW, "desk").await;
    let sent = std::time::Instant::now();
    for i in 0..5 {
        alice
            .send(&format!(
                "<message to='bob@localhost' type='chat'><body>m{i}</body></message>"
            ))
            .await;
    }
    assert!(
        wait_requests(&p.hook, "/hook", 1, std::time::Duration::from_secs(5)).await,
        "the first message is pushed at once"
    );
    eprintln!("message sent → webhook called: {:?}", sent.elapsed());
    // The rest of the burst: one more notification when the window ends, with the count.
    assert!(wait_requests(&p.hook, "/hook", 2, std::time::Duration::from_secs(5)).await);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let reqs = p.hook.requests("/hook");
    assert_eq!(reqs.len(), 2, "exactly two deliveries for one burst");
    let (first, second) = (reqs[0].json(), reqs[1].json());
    assert_eq!(first["message_count"], "1");
    assert_eq!(second["message_count"], "5");
    for v in [&first, &second] {
        assert_eq!(v["token"], "bob-hook-token");
        assert_eq!(v["owner"], "bob@localhost");
        assert_eq!(v["last_message_sender"], "alice@localhost");
        assert!(
            v.get("last_message_body").is_none(),
            "no body by default: {v}"
        );
    }

    // Bob is back, online and active: nothing more is pushed.
    let mut bob = RawClient::login(&s, "bob", PW, "phone2").await;
    bob.online().await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>live</body></message>")
        .await;
    bob.recv_until(|e| e.name() == "message" && body(e).as_deref() == Some("live"))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(p.hook.requests("/hook").len(), 2, "no push while online");
}

#[tokio::test]
async fn a_dead_device_is_disabled_at_the_users_server() {
    let p = Providers::start().await;
    let s = TestServer::start_with(|c| {
        p.configure(c);
        c.push.coalesce_window_ms = 300;
    })
    .await;
    for u in ["alice", "bob"] {
        s.add_user(u, PW).await;
    }
    bob_registers_and_leaves(&s, HOOK_GONE).await;
    let mut alice = RawClient::login(&s, "alice", PW, "desk").await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>one</body></message>")
        .await;
    assert!(wait_requests(&p.hook, "/hook", 1, std::time::Duration::from_secs(5)).await);
    // The webhook said 410: the app server answered item-not-found, Bob's server disabled the
    // registration, so later messages are not published at all.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    alice
        .send("<message to='bob@localhost' type='chat'><body>two</body></message>")
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        p.hook.requests("/hook").len(),
        1,
        "disabled after the dead token"
    );
}
