//! XEP-0363 HTTP File Upload: the component `upload.localhost` hands out slots over XMPP; the
//! HTTPS listener takes the PUT and serves the GET (hyper's client over rustls, connecting to
//! 127.0.0.1 with SNI and Host `localhost`, as the slot URLs say).

use std::time::Duration;

use bytes::Bytes;
use halyard::config::Config;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper_util::rt::TokioIo;
use minidom::Element;
use tokio_rustls::rustls;

use crate::common::*;

const UPLOAD: &str = "upload.localhost";
const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_DATA: &str = "jabber:x:data";
const PW: &str = "secret-pw";

async fn server(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let s = TestServer::start_with(tweak).await;
    s.add_user("alice", PW).await;
    s
}

async fn iq_get(c: &mut RawClient, id: &str, to: &str, payload: &str) -> Element {
    c.send(&format!(
        "<iq type='get' id='{id}' to='{to}'>{payload}</iq>"
    ))
    .await;
    c.recv_until(|e| e.name() == "iq" && e.attr("id") == Some(id))
        .await
}

/// Asks for a slot; returns the answer.
async fn request(
    c: &mut RawClient,
    id: &str,
    filename: &str,
    size: usize,
    content_type: Option<&str>,
) -> Element {
    let ct = content_type
        .map(|t| format!(" content-type='{t}'"))
        .unwrap_or_default();
    iq_get(
        c,
        id,
        UPLOAD,
        &format!("<request xmlns='{NS_UPLOAD}' filename='{filename}' size='{size}'{ct}/>"),
    )
    .await
}

/// The PUT and GET URLs of a slot answer.
fn urls(r: &Element) -> (String, String) {
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(r));
    let slot = r.get_child("slot", NS_UPLOAD).expect("slot");
    let put = slot.get_child("put", NS_UPLOAD).and_then(|p| p.attr("url"));
    let get = slot.get_child("get", NS_UPLOAD).and_then(|p| p.attr("url"));
    (put.expect("put url").into(), get.expect("get url").into())
}

async fn slot(
    c: &mut RawClient,
    id: &str,
    filename: &str,
    size: usize,
    content_type: Option<&str>,
) -> (String, String) {
    urls(&request(c, id, filename, size, content_type).await)
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A TLS connection to the HTTPS listener, as to `localhost`.
async fn connect(s: &TestServer) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(s.https)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(client_tls())
        .connect(
            rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
            tcp,
        )
        .await
        .expect("tls handshake")
}

/// One HTTPS request to the test server for `url` (which must be on its public URL).
async fn http(
    s: &TestServer,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let base = format!("https://localhost:{}", s.https.port());
    let path = url
        .strip_prefix(&base)
        .unwrap_or_else(|| panic!("{url} is not under {base}"));
    let tls = connect(s).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("localhost:{}", s.https.port()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = tokio::time::timeout(TIMEOUT, send.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

async fn put(s: &TestServer, url: &str, content_type: Option<&str>, body: Vec<u8>) -> Answer {
    let mut h = Vec::new();
    if let Some(t) = content_type {
        h.push(("content-type", t));
    }
    http(s, "PUT", url, &h, body).await
}

/// Bytes that are not text: every byte value, in a pattern that does not repeat quickly.
fn binary(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8) ^ (i >> 16)) as u8)
        .collect()
}

fn id_of(get_url: &str) -> String {
    let rest = get_url.split("/upload/").nth(1).expect("upload path");
    rest.split('/').next().expect("id").to_string()
}

/// The condition, error type, text and error element of an iq error.
fn error_of(r: &Element) -> (String, String, String, Element) {
    assert_eq!(r.attr("type"), Some("error"), "{}", xml(r));
    let e = r.get_child("error", NS_CLIENT).expect("error").clone();
    let text = e
        .get_child("text", NS_STANZAS)
        .map(|t| t.text())
        .unwrap_or_default();
    (
        stanza_error(r).expect("condition"),
        e.attr("type").unwrap_or_default().to_string(),
        text,
        e,
    )
}

#[tokio::test]
async fn upload_service_is_discovered_with_its_limit() {
    let s = server(|c| c.upload.max_file_size = 5_242_880).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = iq_get(
        &mut alice,
        "d1",
        DOMAIN,
        &format!("<query xmlns='{NS_DISCO_ITEMS}'/>"),
    )
    .await;
    let items = r.get_child("query", NS_DISCO_ITEMS).expect("items");
    assert!(
        items
            .children()
            .any(|i| i.attr("jid") == Some(UPLOAD) && i.attr("name") == Some("HTTP File Upload")),
        "{}",
        xml(&r)
    );
    let r = iq_get(
        &mut alice,
        "d2",
        UPLOAD,
        &format!("<query xmlns='{NS_DISCO_INFO}'/>"),
    )
    .await;
    assert_eq!(r.attr("from"), Some(UPLOAD), "{}", xml(&r));
    let q = r.get_child("query", NS_DISCO_INFO).expect("info");
    assert!(q.children().any(|i| i.name() == "identity"
        && i.attr("category") == Some("store")
        && i.attr("type") == Some("file")));
    assert!(q
        .children()
        .any(|f| f.name() == "feature" && f.attr("var") == Some(NS_UPLOAD)));
    let form = q.get_child("x", NS_DATA).expect("form");
    let value = |var: &str| {
        form.children()
            .find(|f| f.attr("var") == Some(var))
            .and_then(|f| f.get_child("value", NS_DATA))
            .map(|v| v.text())
    };
    assert_eq!(value("FORM_TYPE").as_deref(), Some(NS_UPLOAD));
    assert_eq!(value("max-file-size").as_deref(), Some("5242880"));
}

#[tokio::test]
async fn upload_round_trip_keeps_the_bytes_and_caches() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let data = binary(300 * 1024 + 7);
    let (put_url, get_url) = slot(&mut alice, "s1", "très cool.bin", data.len(), None).await;
    let base = format!("https://localhost:{}/upload/", s.https.port());
    assert!(get_url.starts_with(&base), "{get_url}");
    assert!(get_url.ends_with("/tr%C3%A8s%20cool.bin"), "{get_url}");
    assert!(
        put_url.starts_with(&get_url) && put_url.contains("s="),
        "{put_url}"
    );

    let r = put(&s, &put_url, Some("application/octet-stream"), data.clone()).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        s.data_dir().join("uploads").join(id_of(&get_url)).exists(),
        "the file is kept under data_dir/uploads"
    );

    let r = http(&s, "GET", &get_url, &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    assert!(r.body == data, "identical bytes");
    assert_eq!(
        r.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let etag = r.header("etag").expect("etag").to_string();
    assert!(r
        .header("last-modified")
        .is_some_and(|v| v.ends_with(" GMT")));
    let cc = r.header("cache-control").expect("cache-control");
    let max_age: u64 = cc
        .split("max-age=")
        .nth(1)
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{cc}"));
    assert!(max_age > 86_400, "{cc}");

    let r = http(&s, "HEAD", &get_url, &[], Vec::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(data.len().to_string().as_str())
    );
    assert!(r.body.is_empty());

    let r = http(&s, "GET", &get_url, &[("if-none-match", &etag)], Vec::new()).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());

    // Another name under the same id is not the file.
    let other = get_url.replace("tr%C3%A8s%20cool.bin", "other.bin");
    assert_eq!(http(&s, "GET", &other, &[], Vec::new()).await.status, 404);
}

#[tokio::test]
async fn upload_range_requests() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let data = binary(200_000);
    let (put_url, get_url) =
        slot(&mut alice, "s1", "song.ogg", data.len(), Some("audio/ogg")).await;
    assert_eq!(
        put(&s, &put_url, Some("audio/ogg"), data.clone())
            .await
            .status,
        201
    );

    let r = http(
        &s,
        "GET",
        &get_url,
        &[("range", "bytes=1000-70999")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 1000-70999/200000"));
    assert_eq!(r.header("content-length"), Some("70000"));
    assert!(r.body == data[1000..71000]);

    let r = http(&s, "GET", &get_url, &[("range", "bytes=-100")], Vec::new()).await;
    assert_eq!(r.status, 206);
    assert!(r.body == data[data.len() - 100..]);

    let r = http(
        &s,
        "GET",
        &get_url,
        &[("range", "bytes=200000-")],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */200000"));
    let r = http(&s, "HEAD", &get_url, &[], Vec::new()).await;
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
}

#[tokio::test]
async fn upload_too_large_is_refused_with_the_limit() {
    let s = server(|c| c.upload.max_file_size = 1000).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let r = request(&mut alice, "s1", "big.png", 1001, Some("image/png")).await;
    let (cond, typ, text, e) = error_of(&r);
    assert_eq!((cond.as_str(), typ.as_str()), ("not-acceptable", "modify"));
    assert!(text.contains("1000"), "{text}");
    let max = e
        .get_child("file-too-large", NS_UPLOAD)
        .and_then(|f| f.get_child("max-file-size", NS_UPLOAD))
        .map(|m| m.text());
    assert_eq!(max.as_deref(), Some("1000"), "{}", xml(&r));
    // At the limit it is fine.
    urls(&request(&mut alice, "s2", "big.png", 1000, Some("image/png")).await);
}

#[tokio::test]
async fn upload_quota_is_per_user_and_says_so() {
    let s = server(|c| {
        c.upload.max_file_size = 1000;
        c.upload.quota_per_user = 1500;
    })
    .await;
    s.add_user("bob", PW).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, _) = slot(&mut alice, "s1", "a.bin", 1000, None).await;
    assert_eq!(put(&s, &put_url, None, binary(1000)).await.status, 201);
    let r = request(&mut alice, "s2", "b.bin", 600, None).await;
    let (cond, _, text, _) = error_of(&r);
    assert_eq!(cond, "resource-constraint");
    assert!(text.contains("quota") && text.contains("1500"), "{text}");
    // Within what is left it is fine; and bob has a quota of his own.
    urls(&request(&mut alice, "s3", "c.bin", 500, None).await);
    let mut bob = RawClient::login(&s, "bob", PW, "phone").await;
    urls(&request(&mut bob, "s4", "d.bin", 1000, None).await);
}

#[tokio::test]
async fn upload_rate_limit_says_when_to_retry() {
    let s = server(|c| c.upload.slots_per_minute = 2).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    urls(&request(&mut alice, "s1", "a.bin", 10, None).await);
    urls(&request(&mut alice, "s2", "b.bin", 10, None).await);
    let r = request(&mut alice, "s3", "c.bin", 10, None).await;
    let (cond, typ, text, e) = error_of(&r);
    assert_eq!((cond.as_str(), typ.as_str()), ("policy-violation", "wait"));
    assert!(text.contains("2 upload slots per minute"), "{text}");
    let stamp = e
        .get_child("retry", NS_UPLOAD)
        .and_then(|r| r.attr("stamp"))
        .unwrap_or_else(|| panic!("retry stamp in {}", xml(&r)));
    assert!(stamp.ends_with('Z') && stamp.contains('T'), "{stamp}");
}

#[tokio::test]
async fn upload_expired_slot_is_refused() {
    let s = server(|c| c.upload.slot_validity_secs = 1).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (late, late_get) = slot(&mut alice, "s1", "a.bin", 100, None).await;
    let (fresh, _) = slot(&mut alice, "s2", "b.bin", 100, None).await;
    assert_eq!(
        put(&s, &fresh, None, binary(100)).await.status,
        201,
        "used in time"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = put(&s, &late, None, binary(100)).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        http(&s, "GET", &late_get, &[], Vec::new()).await.status,
        404
    );
}

#[tokio::test]
async fn upload_tampered_signature_is_refused() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, get_url) = slot(&mut alice, "s1", "a.png", 100, Some("image/png")).await;
    let (head, sig) = put_url.split_once("&s=").expect("signature");
    let flipped: String = sig
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 3 {
                if c == 'A' {
                    'B'
                } else {
                    'A'
                }
            } else {
                c
            }
        })
        .collect();
    let (url_e, e) = head.split_once("?e=").expect("expiry");
    let later: u64 = e.parse::<u64>().expect("expiry number") + 3600;
    for bad in [
        format!("{head}&s={flipped}"),
        format!("{url_e}?e={later}&s={sig}"),
        get_url.clone(),
    ] {
        let r = put(&s, &bad, Some("image/png"), binary(100)).await;
        assert_eq!(r.status, 403, "{bad}");
    }
    assert_eq!(http(&s, "GET", &get_url, &[], Vec::new()).await.status, 404);
    assert_eq!(
        put(&s, &put_url, Some("image/png"), binary(100))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn upload_size_or_type_mismatch_is_refused_and_nothing_kept() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, get_url) = slot(&mut alice, "s1", "a.png", 5000, Some("image/png")).await;
    let dir = s.data_dir().join("uploads");
    let id = id_of(&get_url);
    for (body, ct, status) in [
        (binary(4990), "image/png", 400),
        (binary(5010), "image/png", 413),
        (binary(5000), "text/html", 400),
    ] {
        let r = put(&s, &put_url, Some(ct), body).await;
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(http(&s, "GET", &get_url, &[], Vec::new()).await.status, 404);
        let kept: Vec<_> = std::fs::read_dir(&dir)
            .expect("uploads dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&id))
            .collect();
        assert!(kept.is_empty(), "nothing kept: {kept:?}");
    }
    // The slot is still good for the declared file.
    assert_eq!(
        put(&s, &put_url, Some("image/png"), binary(5000))
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn upload_slot_is_used_once() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, get_url) = slot(&mut alice, "s1", "a.txt", 5, Some("text/plain")).await;
    assert_eq!(
        put(&s, &put_url, Some("text/plain"), b"first".to_vec())
            .await
            .status,
        201
    );
    let r = put(&s, &put_url, Some("text/plain"), b"other".to_vec()).await;
    assert_eq!(r.status, 409);
    let r = http(&s, "GET", &get_url, &[], Vec::new()).await;
    assert_eq!(r.body, b"first");
}

#[tokio::test]
async fn upload_get_headers_keep_active_content_harmless() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let mut n = 0;
    for (name, ct, disposition) in [
        ("page.html", "text/html", "attachment"),
        ("drawing.svg", "image/svg+xml", "attachment"),
        ("photo.png", "image/png", "inline"),
    ] {
        n += 1;
        let body = format!("<html><script>alert({n})</script></html>").into_bytes();
        let (put_url, get_url) =
            slot(&mut alice, &format!("s{n}"), name, body.len(), Some(ct)).await;
        assert_eq!(put(&s, &put_url, Some(ct), body).await.status, 201);
        let r = http(
            &s,
            "GET",
            &get_url,
            &[("origin", "https://web.example")],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(ct));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        let csp = r.header("content-security-policy").expect("csp");
        assert!(
            csp.contains("sandbox") && csp.contains("default-src 'none'"),
            "{csp}"
        );
        let cd = r
            .header("content-disposition")
            .expect("content-disposition");
        assert!(cd.starts_with(disposition), "{name}: {cd}");
        assert!(cd.contains(name), "{cd}");
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    }
}

#[tokio::test]
async fn upload_cors_preflight() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, _) = slot(&mut alice, "s1", "a.png", 10, Some("image/png")).await;
    let r = http(
        &s,
        "OPTIONS",
        &put_url,
        &[
            ("origin", "https://web.example"),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "content-type"),
        ],
        Vec::new(),
    )
    .await;
    assert!(r.status == 200 || r.status == 204, "{}", r.status);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let methods = r.header("access-control-allow-methods").expect("methods");
    for m in ["GET", "HEAD", "PUT"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = r.header("access-control-allow-headers").expect("headers");
    assert!(
        headers.to_ascii_lowercase().contains("content-type"),
        "{headers}"
    );
    let r = put(&s, &put_url, Some("image/png"), binary(10)).await;
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("*"),
        "on the PUT too"
    );
}

#[tokio::test]
async fn upload_files_expire() {
    let s = server(|c| c.upload.expire_after = 2).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, get_url) = slot(&mut alice, "s1", "a.bin", 1000, None).await;
    assert_eq!(put(&s, &put_url, None, binary(1000)).await.status, 201);
    assert_eq!(http(&s, "GET", &get_url, &[], Vec::new()).await.status, 200);
    let file = s.data_dir().join("uploads").join(id_of(&get_url));
    assert!(file.exists());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while file.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expiry task removes the file"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http(&s, "GET", &get_url, &[], Vec::new()).await.status, 404);
}

#[tokio::test]
async fn upload_account_removal_deletes_the_files() {
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let (put_url, get_url) = slot(&mut alice, "s1", "a.bin", 100, None).await;
    assert_eq!(put(&s, &put_url, None, binary(100)).await.status, 201);
    let file = s.data_dir().join("uploads").join(id_of(&get_url));
    assert!(file.exists());
    let r = s
        .admin(halyard::admin::Request::UserRemove {
            jid: format!("alice@{DOMAIN}"),
        })
        .await;
    assert!(r.error.is_none(), "{:?}", r.error);
    assert!(!file.exists(), "the file is deleted with the account");
    assert_eq!(http(&s, "GET", &get_url, &[], Vec::new()).await.status, 404);
}

#[tokio::test]
async fn upload_abandoned_midway_keeps_nothing_and_the_slot_works_again() {
    use tokio::io::AsyncWriteExt;
    let s = server(|_| {}).await;
    let mut alice = RawClient::login(&s, "alice", PW, "phone").await;
    let data = binary(100_000);
    let (put_url, get_url) = slot(&mut alice, "s1", "a.bin", data.len(), None).await;
    let base = format!("https://localhost:{}", s.https.port());
    let path = put_url.strip_prefix(&base).expect("path");
    let mut tls = connect(&s).await;
    tls.write_all(
        format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: {}\r\n\r\n",
            s.https.port(),
            data.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write head");
    tls.write_all(&data[..30_000]).await.expect("write part");
    tls.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tls);

    let partial = s
        .data_dir()
        .join("uploads")
        .join(format!("{}.part", id_of(&get_url)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = put(&s, &put_url, None, data.clone()).await;
        if r.status == 201 {
            break;
        }
        assert_eq!(
            r.status, 409,
            "only busy until the abandoned attempt is cleaned up"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot is given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!partial.exists(), "no partial file is left");
    assert!(http(&s, "GET", &get_url, &[], Vec::new()).await.body == data);
}
