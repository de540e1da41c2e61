//! The HTTP API (`/api/v1`), `/metrics` and `/health`. Every response a test gets through
//! [`Api::call`] is checked against the OpenAPI document the server serves: its status must be
//! documented for that operation and its body must match the documented schema.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::common::*;

const PW: &str = "correct horse";
const ADMIN: &str = "admin-token-for-tests-0123456789abcdef";

/// The OpenAPI document, as the server ships it.
fn doc() -> Value {
    serde_json::from_str(halyard::http::api::OPENAPI).expect("openapi.json")
}

/// A small JSON Schema check for the subset the document uses ($ref, type (one or a list),
/// properties, required, additionalProperties: false, items, enum, minimum). Hand-written
/// because the `jsonschema` crate's default features pull in an HTTP client and a regex engine
/// for remote references and formats this document does not use.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let target = doc
            .pointer(r.trim_start_matches('#'))
            .ok_or_else(|| format!("{at}: unresolved {r}"))?;
        return validate(doc, target, v, at);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = |t: &str| match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        if !types.iter().any(|t| fits(t)) {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if n < min {
            return Err(format!("{at}: {n} is below {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing required {r}"));
            }
        }
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(doc, s, val, &format!("{at}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: undocumented property {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            validate(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// The documented path template that `path` (no query) matches.
fn template_for<'a>(doc: &'a Value, path: &str) -> Option<&'a str> {
    let segs: Vec<&str> = path.split('/').collect();
    doc["paths"]
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|t| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts
                    .iter()
                    .zip(&segs)
                    .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
        })
}

/// Checks a response against the document: the status is documented, the body fits.
fn check_against_doc(method: &str, path: &str, status: u16, ctype: &str, body: &[u8]) {
    let doc = doc();
    let path_only = path.split('?').next().unwrap_or(path);
    let t = template_for(&doc, path_only)
        .unwrap_or_else(|| panic!("{method} {path_only} is not in the OpenAPI document"));
    let op = &doc["paths"][t][method.to_lowercase()];
    assert!(op.is_object(), "{method} {t} is not documented");
    let resp = &op["responses"][status.to_string()];
    assert!(
        resp.is_object(),
        "{method} {t} answered {status}, which the document does not list: {}",
        String::from_utf8_lossy(body)
    );
    let Some(content) = resp.get("content").and_then(Value::as_object) else {
        assert!(
            body.is_empty(),
            "{method} {t} {status}: a body the document does not describe"
        );
        return;
    };
    let media = ctype.split(';').next().unwrap_or("").trim();
    let schema = &content
        .get(media)
        .unwrap_or_else(|| panic!("{method} {t} {status}: undocumented content type {ctype:?}"))
        ["schema"];
    if media == "application/x-ndjson" {
        for (i, line) in body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let v: Value = serde_json::from_slice(line).expect("NDJSON line");
            if let Err(e) = validate(&doc, schema, &v, &format!("line {i}")) {
                panic!("{method} {t} {status}: {e}");
            }
        }
    } else {
        let v: Value = serde_json::from_slice(body).expect("a JSON body");
        if let Err(e) = validate(&doc, schema, &v, "body") {
            panic!("{method} {t} {status}: {e}");
        }
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    tokio::time::timeout(TIMEOUT, tx.send_request(req))
        .await
        .expect("answer in time")
        .expect("response")
}

/// One request; the answer is checked against the OpenAPI document (for `/api/v1` paths).
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let r = send(
        addr,
        method,
        path,
        token,
        body.map(|b| b.to_string().into_bytes()),
    )
    .await;
    let (parts, b) = r.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), b.collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    let ctype = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let status = parts.status.as_u16();
    if path.starts_with("/api/v1/")
        && template_for(&doc(), path.split('?').next().unwrap_or("")).is_some()
        && status != 405
    {
        check_against_doc(method, path, status, &ctype, &body);
    }
    Resp {
        status,
        headers: parts.headers,
        body,
    }
}

async fn login(s: &TestServer, user: &str, password: &str) -> Resp {
    call(
        s.http,
        "POST",
        "/api/v1/tokens",
        None,
        Some(json!({ "username": user, "password": password })),
    )
    .await
}

async fn token(s: &TestServer, user: &str) -> String {
    let r = login(s, user, PW).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()["token"].as_str().expect("token").to_string()
}

/// The value of one sample in the server's `/metrics`, 0 when absent.
async fn metric(s: &TestServer, sample: &str) -> f64 {
    let r = call(s.http, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

fn with_admin(c: &mut halyard::config::Config) {
    c.api.admin_tokens = vec![ADMIN.into()];
}

#[tokio::test]
async fn login_token_roster_and_the_served_document() {
    let s = TestServer::start_with(with_admin).await;
    s.add_user("alice", PW).await;
    s.add_user("bob", PW).await;
    let mut c = RawClient::login(&s, "alice", PW, "r").await;
    c.send("<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' name='Bob'><group>Friends</group></item></query></iq>").await;
    c.recv_until(|e| e.attr("id") == Some("r1")).await;

    let t = token(&s, "alice").await;
    let r = call(s.http, "GET", "/api/v1/me/roster", Some(&t), None).await;
    assert_eq!(r.status, 200);
    let items = r.json()["items"].clone();
    assert_eq!(items.as_array().map(Vec::len), Some(1), "{items}");
    assert_eq!(items[0]["jid"], "bob@localhost");
    assert_eq!(items[0]["name"], "Bob");
    assert_eq!(items[0]["groups"], json!(["Friends"]));

    // A full JID as username works too; the token says who it is.
    let r = login(&s, "bob@localhost", PW).await;
    assert_eq!(r.status, 201);
    let tb = r.json()["token"].as_str().unwrap().to_string();
    let r = call(s.http, "GET", "/api/v1/tokens/current", Some(&tb), None).await;
    assert_eq!(
        (r.status, r.json()["jid"].clone()),
        (200, json!("bob@localhost"))
    );
    assert_eq!(r.json()["kind"], "user");

    // The served document is the one the tests check against.
    let r = call(s.http, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), doc());

    // Every documented operation is routed: without a token each answers in the API's own
    // error format (never axum's 404/405), so the document lists nothing the router lacks.
    for (path, item) in doc()["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{jid}", "bob@localhost")
            .replace("{resource}", "r")
            .replace("{device_id}", "d");
        for method in item.as_object().unwrap().keys() {
            let r = send(
                s.http,
                &method.to_uppercase(),
                &concrete,
                None,
                Some(b"{}".to_vec()),
            )
            .await;
            let st = r.status().as_u16();
            assert!(
                st != 404 && st != 405,
                "{method} {path} is documented but not routed ({st})"
            );
        }
    }
    // Unknown endpoints answer in the API's format.
    let r = call(s.http, "GET", "/api/v1/nope", Some(&t), None).await;
    assert_eq!((r.status, r.error()), (404, "not_found".to_string()));
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_401_then_429() {
    let s = TestServer::start_with(|c| {
        c.auth.failures_per_minute_per_ip = 6;
        // Make PBKDF2 dominate the timing, so skipping it for unknown users would show.
        c.auth.scram_iterations = 60_000;
    })
    .await;
    s.add_user("alice", PW).await;
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let a = login(&s, "alice", "wrong").await;
        wrong.push(t.elapsed());
        let t = Instant::now();
        let b = login(&s, "mallory", "wrong").await;
        unknown.push(t.elapsed());
        answers.push((a, b));
    }
    for (a, b) in &answers {
        assert_eq!((a.status, b.status), (401, 401));
        assert_eq!(a.body, b.body, "the bodies tell users apart");
        assert_eq!(a.error(), "invalid_credentials");
        let hs = |r: &Resp| {
            let mut v: Vec<_> = r
                .headers
                .iter()
                .filter(|(k, _)| *k != "date")
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(hs(a), hs(b), "the headers tell users apart");
    }
    let (w, u) = (wrong.iter().min().unwrap(), unknown.iter().min().unwrap());
    assert!(
        u.as_secs_f64() > w.as_secs_f64() * 0.4,
        "an unknown user is answered much faster ({u:?}) than a wrong password ({w:?})"
    );
    // Six failures used the minute's allowance: the next attempt, even a right one, is 429.
    let r = login(&s, "alice", PW).await;
    assert_eq!((r.status, r.error()), (429, "rate_limited".to_string()));
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(metric(&s, "halyard_auth_failures_total{via=\"api\"}").await >= 6.0);
}

#[tokio::test]
async fn tokens_expire_are_revoked_and_go_with_their_account() {
    let s = TestServer::start_with(|c| {
        with_admin(c);
        c.api.token_ttl_secs = 1;
    })
    .await;
    s.add_user("alice", PW).await;
    let t = token(&s, "alice").await;
    assert_eq!(
        call(s.http, "GET", "/api/v1/me/roster", Some(&t), None)
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = call(s.http, "GET", "/api/v1/me/roster", Some(&t), None).await;
    assert_eq!((r.status, r.error()), (401, "unauthorized".to_string()));
    assert!(r.headers.contains_key("www-authenticate"));

    // Revocation.
    let t = token(&s, "alice").await;
    let r = call(s.http, "DELETE", "/api/v1/tokens/current", Some(&t), None).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        call(s.http, "GET", "/api/v1/me/roster", Some(&t), None)
            .await
            .status,
        401
    );
    // A configured admin token cannot be revoked through the API.
    let r = call(
        s.http,
        "DELETE",
        "/api/v1/tokens/current",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, 409);

    // Removing the account removes its tokens: a new account of the same name does not
    // inherit them.
    let s2 = TestServer::start_with(with_admin).await;
    s2.add_user("alice", PW).await;
    let t = token(&s2, "alice").await;
    let r = call(
        s2.http,
        "DELETE",
        "/api/v1/admin/users/alice@localhost",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    s2.add_user("alice", PW).await;
    assert_eq!(
        call(s2.http, "GET", "/api/v1/me/roster", Some(&t), None)
            .await
            .status,
        401
    );
}

/// Reads the response body frame by frame up to `n` complete lines; returns them and what is
/// left of a partial line.
async fn read_lines(body: &mut Incoming, n: usize, buf: &mut Vec<u8>) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            out.push(serde_json::from_slice(&line[..line.len() - 1]).expect("a JSON line"));
            continue;
        }
        let f = tokio::time::timeout(TIMEOUT, body.frame())
            .await
            .expect("a frame in time");
        match f {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => panic!("body failed: {e}"),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn history_of_100000_messages_streams_with_backpressure() {
    const N: u64 = 100_000;
    const PAGE: usize = 500;
    const T0: u64 = 1_700_000_000_000_000;
    // Fill the archive through the store's own types before the server opens it.
    let pre = tempfile::tempdir().unwrap();
    {
        let st = halyard::store::sled::SledStore::open(pre.path(), 64 << 20).unwrap();
        let alice = jid::BareJid::new("alice@localhost").unwrap();
        let bob: jid::Jid = jid::Jid::new("bob@localhost").unwrap();
        use halyard_xep::host::ArchiveStore;
        for i in 0..N {
            let stanza = format!("<message xmlns='jabber:client' from='alice@localhost/r' to='bob@localhost' type='chat' id='m{i}'><body>message {i}</body></message>");
            st.archive
                .append(&alice, &bob, T0 + i, &stanza)
                .await
                .unwrap();
        }
        st.flush().unwrap();
    }
    let dir = pre.path().to_path_buf();
    let s = TestServer::start_with(move |c| {
        c.data_dir = dir;
        c.api.history_page = PAGE;
    })
    .await;
    s.add_user("alice", PW).await;
    let t = token(&s, "alice").await;
    let pages = "halyard_api_history_pages_total";
    let total_pages = (N as usize / PAGE + 1) as f64;

    let r = send(s.http, "GET", "/api/v1/me/history", Some(&t), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let mut body = r.into_body();
    let mut buf = Vec::new();
    let first = read_lines(&mut body, 1, &mut buf).await;
    assert_eq!(first[0]["body"], "message 0");
    let at_first = metric(&s, pages).await;
    assert!(
        at_first < total_pages / 2.0,
        "the first record came after {at_first} of {total_pages} pages were read"
    );
    // A reader that stops reading holds the server still: it reads ahead only what the socket
    // buffers take, and then no further page.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let paused1 = metric(&s, pages).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let paused2 = metric(&s, pages).await;
    assert_eq!(
        paused1, paused2,
        "the server kept reading while the client did not"
    );
    assert!(
        paused2 < total_pages / 2.0,
        "the server read {paused2} of {total_pages} pages ahead of a stalled reader"
    );
    // Reading on gets everything, in order, each line fitting the documented schema.
    let mut count = 1u64;
    let mut last = first[0].clone();
    let d = doc();
    let schema = &d["components"]["schemas"]["HistoryRecord"];
    loop {
        let got = read_lines(&mut body, 10_000, &mut buf).await;
        if got.is_empty() {
            break;
        }
        for v in got {
            validate(&d, schema, &v, "line").unwrap();
            count += 1;
            last = v;
        }
    }
    assert_eq!(count, N);
    assert_eq!(last["body"], format!("message {}", N - 1));
    assert_eq!(last["with"], "bob@localhost");
    assert_eq!(metric(&s, pages).await, total_pages);
    assert!(metric(&s, "halyard_archive_query_seconds_count{via=\"api\"}").await >= total_pages);

    // Filters: after-id, end, with.
    let ids = {
        let r = call(
            s.http,
            "GET",
            "/api/v1/me/history?end=2023-11-14T22:13:20.000009Z",
            Some(&t),
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        let lines: Vec<Value> = r
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 10, "end is inclusive: messages 0 to 9");
        lines
    };
    let r = call(
        s.http,
        "GET",
        &format!(
            "/api/v1/me/history?after-id={}&end=2023-11-14T22:13:20.000009Z",
            ids[7]["id"].as_str().unwrap()
        ),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        r.body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        2
    );
    let r = call(
        s.http,
        "GET",
        "/api/v1/me/history?with=carol@localhost",
        Some(&t),
        None,
    )
    .await;
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = call(
        s.http,
        "GET",
        "/api/v1/me/history?start=yesterday",
        Some(&t),
        None,
    )
    .await;
    assert_eq!((r.status, r.error()), (422, "invalid".to_string()));
    let r = call(
        s.http,
        "GET",
        "/api/v1/me/history?after-id=nope",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_message_sent_through_the_api_reaches_a_tcp_client_and_moves_metrics() {
    let s = TestServer::start().await;
    s.add_user("alice", PW).await;
    s.add_user("bob", PW).await;
    let conn0 = metric(&s, "halyard_connections_total{transport=\"tcp\"}").await;
    let out0 = metric(&s, "halyard_stanzas_out_total{kind=\"message\"}").await;
    let in0 = metric(&s, "halyard_stanzas_in_total{kind=\"presence\"}").await;
    let mut bob = RawClient::login(&s, "bob", PW, "desk").await;
    bob.online().await;
    let t = token(&s, "alice").await;
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/messages",
        Some(&t),
        Some(json!({ "to": "bob@localhost", "body": "hello from HTTP" })),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let m = bob.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("hello from HTTP"));
    assert_eq!(m.attr("from"), Some("alice@localhost/api"));
    assert_eq!(m.attr("id"), Some(id.as_str()));
    // Archived like any message: it is in alice's history.
    let r = call(
        s.http,
        "GET",
        "/api/v1/me/history?with=bob@localhost",
        Some(&t),
        None,
    )
    .await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(text.contains("hello from HTTP"), "{text}");

    assert!(metric(&s, "halyard_connections_total{transport=\"tcp\"}").await >= conn0 + 1.0);
    assert!(metric(&s, "halyard_connections{transport=\"tcp\"}").await >= 1.0);
    assert!(metric(&s, "halyard_stanzas_out_total{kind=\"message\"}").await >= out0 + 1.0);
    assert!(metric(&s, "halyard_stanzas_in_total{kind=\"presence\"}").await >= in0 + 1.0);
    assert!(metric(&s, "halyard_logins_total{via=\"c2s\"}").await >= 1.0);
    assert!(metric(&s, "halyard_logins_total{via=\"api\"}").await >= 1.0);
    assert!(metric(&s, "halyard_routing_seconds_count").await >= 1.0);
    assert!(metric(&s, "halyard_storage_bytes").await > 0.0);
    assert_eq!(metric(&s, "halyard_sessions").await, 1.0);

    // Invalid input.
    for (to, code) in [
        ("not a jid@@", 422),
        ("x@remote.example", 422),
        ("\u{213b}@localhost", 422),
        ("nobody@localhost", 404),
    ] {
        let r = call(
            s.http,
            "POST",
            "/api/v1/me/messages",
            Some(&t),
            Some(json!({ "to": to, "body": "x" })),
        )
        .await;
        assert_eq!(r.status, code, "{to}");
    }
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/messages",
        Some(&t),
        Some(json!({ "to": "bob@localhost" })),
    )
    .await;
    assert_eq!(r.status, 422, "a missing field is well-formed but invalid");
    let r = send(
        s.http,
        "POST",
        "/api/v1/me/messages",
        Some(&t),
        Some(b"{not json".to_vec()),
    )
    .await;
    assert_eq!(r.status(), 400);
    // The app server is off here.
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/push-devices",
        Some(&t),
        Some(json!({ "provider": "webhook", "device_id": "d", "token": "x" })),
    )
    .await;
    assert_eq!(
        (r.status, r.error()),
        (404, "appserver_disabled".to_string())
    );
}

#[tokio::test]
async fn admin_manages_accounts_sessions_and_messages() {
    let s = TestServer::start_with(with_admin).await;
    s.add_user("bob", PW).await;
    let a = Some(ADMIN);
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/users",
        a,
        Some(json!({ "jid": "carol@localhost", "password": "pw1" })),
    )
    .await;
    assert_eq!(r.status, 201);
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/users",
        a,
        Some(json!({ "jid": "carol@localhost", "password": "pw1" })),
    )
    .await;
    assert_eq!((r.status, r.error()), (409, "exists".to_string()));
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/users",
        a,
        Some(json!({ "jid": "carol@elsewhere.example", "password": "pw1" })),
    )
    .await;
    assert_eq!(r.status, 422);
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/users",
        a,
        Some(json!({ "jid": "dave@localhost", "password": "" })),
    )
    .await;
    assert_eq!(r.status, 422);
    // Issue 7: ℻@localhost prepares to FAX@localhost, then to fax@localhost: refused, with why.
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/users",
        a,
        Some(json!({ "jid": "\u{213b}@localhost", "password": "pw1" })),
    )
    .await;
    assert_eq!((r.status, r.error()), (422, "invalid".to_string()));
    let why = r.json()["message"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("RFC 7622"), "says why: {why}");
    let r = call(s.http, "GET", "/api/v1/admin/users", a, None).await;
    assert_eq!(
        r.json()["users"],
        json!(["bob@localhost", "carol@localhost"])
    );
    // The CLI sees the same accounts.
    let cli = s.admin(halyard::admin::Request::UserList).await;
    assert_eq!(cli.lines, vec!["bob@localhost", "carol@localhost"]);

    let r = call(
        s.http,
        "PUT",
        "/api/v1/admin/users/carol@localhost/password",
        a,
        Some(json!({ "password": "pw2" })),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(login(&s, "carol", "pw1").await.status, 401);
    assert_eq!(login(&s, "carol", "pw2").await.status, 201);
    let r = call(
        s.http,
        "PUT",
        "/api/v1/admin/users/nobody@localhost/password",
        a,
        Some(json!({ "password": "x" })),
    )
    .await;
    assert_eq!(r.status, 404);

    // Sessions, a headline from the server, and a kick.
    let mut bob = RawClient::login(&s, "bob", PW, "desk").await;
    bob.online().await;
    let r = call(
        s.http,
        "GET",
        "/api/v1/admin/users/bob@localhost/sessions",
        a,
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["sessions"][0]["jid"], "bob@localhost/desk");
    let r = call(
        s.http,
        "POST",
        "/api/v1/admin/messages",
        a,
        Some(json!({ "to": "bob@localhost", "body": "maintenance at noon", "subject": "Notice" })),
    )
    .await;
    assert_eq!(r.status, 202);
    let m = bob.recv_until(|e| e.name() == "message").await;
    assert_eq!(m.attr("type"), Some("headline"));
    assert_eq!(m.attr("from"), Some(DOMAIN));
    assert_eq!(body(&m).as_deref(), Some("maintenance at noon"));

    let r = call(s.http, "GET", "/api/v1/admin/stats", a, None).await;
    assert_eq!(r.status, 200);
    let st = r.json();
    assert_eq!(
        (st["accounts"].clone(), st["sessions"].clone()),
        (json!(2), json!(1))
    );
    assert!(st["storage_bytes"].as_u64().unwrap() > 0);

    let r = call(
        s.http,
        "DELETE",
        "/api/v1/admin/users/bob@localhost/sessions/desk",
        a,
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(bob.expect_stream_error().await, "policy-violation");
    let r = call(
        s.http,
        "DELETE",
        "/api/v1/admin/users/bob@localhost/sessions/desk",
        a,
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = call(
        s.http,
        "GET",
        "/api/v1/admin/users/a%40b%40c/sessions",
        a,
        None,
    )
    .await;
    assert_eq!((r.status, r.error()), (422, "invalid".to_string()));

    // Who may call what.
    let ut = login(&s, "carol", "pw2").await.json()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = call(s.http, "GET", "/api/v1/admin/users", Some(&ut), None).await;
    assert_eq!((r.status, r.error()), (403, "forbidden".to_string()));
    let r = call(s.http, "GET", "/api/v1/me/roster", a, None).await;
    assert_eq!(r.status, 403);
    let r = call(s.http, "GET", "/api/v1/admin/users", None, None).await;
    assert_eq!(r.status, 401);
    let r = call(
        s.http,
        "GET",
        "/api/v1/admin/users",
        Some("hy_not-a-token"),
        None,
    )
    .await;
    assert_eq!(r.status, 401);

    // An admin token issued by `halyard admin token` (over the admin socket, as the CLI does).
    let issued = s
        .admin(halyard::admin::Request::AdminToken { ttl: "1h".into() })
        .await;
    assert!(issued.error.is_none(), "{:?}", issued.error);
    let cli_token = issued.lines[0].clone();
    let r = call(s.http, "GET", "/api/v1/admin/stats", Some(&cli_token), None).await;
    assert_eq!(r.status, 200);
    let r = call(
        s.http,
        "GET",
        "/api/v1/tokens/current",
        Some(&cli_token),
        None,
    )
    .await;
    assert_eq!(r.json()["kind"], "admin");
    assert_eq!(
        call(
            s.http,
            "DELETE",
            "/api/v1/tokens/current",
            Some(&cli_token),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(s.http, "GET", "/api/v1/admin/stats", Some(&cli_token), None)
            .await
            .status,
        401
    );

    // The same through the binary: `halyard admin token --ttl 2h` reaches the running server.
    let cwd = tempfile::tempdir().unwrap();
    // Off the runtime's thread: the server answering the CLI runs on it.
    let run = |ttl: &'static str| {
        let (dir, data) = (cwd.path().to_path_buf(), s.data_dir().to_path_buf());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_halyard"))
                .current_dir(dir)
                .arg("--data-dir")
                .arg(data)
                .args(["admin", "token", "--ttl", ttl])
                .output()
                .expect("run halyard")
        })
    };
    let out = run("2h").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let bin_token = stdout.lines().next().unwrap().trim().to_string();
    assert!(bin_token.starts_with("hy_"), "{stdout}");
    let r = call(s.http, "GET", "/api/v1/admin/users", Some(&bin_token), None).await;
    assert_eq!(r.status, 200);
    assert!(!run("soon").await.unwrap().status.success());

    let r = call(
        s.http,
        "DELETE",
        "/api/v1/admin/users/carol@localhost",
        a,
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = call(
        s.http,
        "DELETE",
        "/api/v1/admin/users/carol@localhost",
        a,
        None,
    )
    .await;
    assert_eq!((r.status, r.error()), (404, "no_such_user".to_string()));
    assert_eq!(login(&s, "carol", "pw2").await.status, 401);
}

#[tokio::test]
async fn push_devices_go_through_the_app_server() {
    let s = TestServer::start_with(|c| {
        c.appserver.enabled = true;
        c.appserver.webhook.url = "http://127.0.0.1:9/hook".into();
        c.appserver.webhook.secret = "s".into();
    })
    .await;
    s.add_user("alice", PW).await;
    let t = token(&s, "alice").await;
    let reg = |provider: &str, token: &str| json!({ "provider": provider, "device_id": "phone-1", "token": token });
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/push-devices",
        Some(&t),
        Some(reg("webhook", "tok1")),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let first = r.json();
    assert_eq!(first["service"], "push.localhost");
    assert!(!first["node"].as_str().unwrap().is_empty());
    // Registering again keeps node and secret (the app server's rule, not ours).
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/push-devices",
        Some(&t),
        Some(reg("webhook", "tok2")),
    )
    .await;
    assert_eq!(
        (r.json()["node"].clone(), r.json()["secret"].clone()),
        (first["node"].clone(), first["secret"].clone())
    );
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/push-devices",
        Some(&t),
        Some(reg("apns", "abcd")),
    )
    .await;
    assert_eq!(
        (r.status, r.error()),
        (409, "provider_unavailable".to_string())
    );
    let r = call(
        s.http,
        "POST",
        "/api/v1/me/push-devices",
        Some(&t),
        Some(reg("webhook", "has space")),
    )
    .await;
    assert_eq!(r.status, 422);
    let r = call(
        s.http,
        "DELETE",
        "/api/v1/me/push-devices/phone-1",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = call(
        s.http,
        "DELETE",
        "/api/v1/me/push-devices/phone-1",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn health_and_metrics_access() {
    let s = TestServer::start().await;
    let r = call(s.http, "GET", "/health", None, None).await;
    assert_eq!((r.status, r.json()), (200, json!({ "status": "ok" })));
    let r = call(s.http, "GET", "/metrics", None, None).await;
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8_lossy(&r.body).to_string();
    for name in [
        "halyard_uptime_seconds",
        "halyard_push_queue_depth",
        "halyard_storage_bytes",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let s2 = TestServer::start_with(|c| c.metrics.allow = vec!["192.0.2.1".parse().unwrap()]).await;
    assert_eq!(
        call(s2.http, "GET", "/metrics", None, None).await.status,
        403
    );
    assert_eq!(
        call(s2.http, "GET", "/health", None, None).await.status,
        200
    );
    let s3 = TestServer::start_with(|c| c.api.enabled = false).await;
    let r = call(
        s3.http,
        "POST",
        "/api/v1/tokens",
        None,
        Some(json!({ "username": "a", "password": "b" })),
    )
    .await;
    assert_eq!(r.status, 404);
}
