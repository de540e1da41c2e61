//! XEP-0363's HTTP side: `PUT /upload/<id>/<filename>?e=<expiry>&s=<signature>` stores a file
//! for a slot the component (`crate::upload`) granted; `GET`/`HEAD` serve it.
//!
//! - **PUT**: the signature (HMAC over path, size, content type, expiry) must verify and the
//!   slot must not have expired (else 403); a used slot gets 409. `Content-Length` must be the
//!   slot's size (missing: 411; larger: 413; smaller: 400) and `Content-Type` its type (400).
//!   The body is streamed to `<id>.part` and renamed once exactly the declared bytes arrived and
//!   are on disk; on any failure (a body that stalls for a minute: 408; a dropped connection)
//!   the partial file is deleted and the slot may be retried until it expires. 201 on success.
//! - **GET/HEAD**: `Content-Length`, single `Range` requests (206, 416), `ETag` (the id: files
//!   never change), `Last-Modified`, `Cache-Control` with a long `max-age` (capped at the file's
//!   remaining life), `If-None-Match` (304). Served so that no upload runs in our origin:
//!   `X-Content-Type-Options: nosniff`, `Content-Security-Policy: default-src 'none'; sandbox`,
//!   and `Content-Disposition: attachment` for every type not on an inline-safe list (images,
//!   audio, video, PDF, plain text).
//! - **CORS**: every answer allows any origin; `OPTIONS` answers preflights for web clients.

use std::io::SeekFrom;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::HttpState;
use crate::store::upload::{valid_id, Upload, UploadState};
use crate::upload::{essence, inline_safe, now_secs, url_path, UploadService};

/// The longest `Cache-Control` max-age given (a year).
const MAX_AGE: u64 = 365 * 86_400;
/// Bytes read from a file per body chunk.
const CHUNK: usize = 64 * 1024;
/// How long an upload may send nothing before it is given up (its slot stays usable).
const BODY_IDLE: Duration = Duration::from_secs(60);

pub fn routes() -> Router<HttpState> {
    Router::new().route(
        "/upload/{id}/{filename}",
        get(serve).head(serve).put(put).options(preflight),
    )
}

fn cors(h: &mut HeaderMap) {
    crate::http::cors(h, "GET, HEAD, PUT, OPTIONS");
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Length, Content-Range, ETag"),
    );
}

/// A short plain-text answer, with the CORS headers.
fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut r = (status, text).into_response();
    cors(r.headers_mut());
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn service(st: &HttpState) -> Option<&UploadService> {
    st.server.upload.as_deref()
}

async fn preflight(State(st): State<HttpState>) -> Response {
    if service(&st).is_none() {
        return plain(StatusCode::NOT_FOUND, "no upload service here\n");
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(r.headers_mut());
    r.headers_mut().insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

/// The value of `name` in a query string (no decoding: ours are base64url and digits).
fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn put(
    State(st): State<HttpState>,
    Path((id, filename)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(svc) = service(&st) else {
        return plain(StatusCode::NOT_FOUND, "no upload service here\n");
    };
    const DENIED: &str = "this upload URL is not valid (wrong or expired signature)\n";
    if !valid_id(&id) {
        return plain(StatusCode::FORBIDDEN, DENIED);
    }
    let row = match svc.store.get(&id).await {
        Ok(Some(r)) if r.filename == filename => r,
        Ok(_) => return plain(StatusCode::FORBIDDEN, DENIED),
        Err(e) => {
            tracing::error!(%id, error = %e, "reading an upload slot failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "storage error\n");
        }
    };
    let query = uri.query().unwrap_or_default();
    let expires = query_param(query, "e").and_then(|e| e.parse::<u64>().ok());
    let sig = query_param(query, "s");
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return plain(StatusCode::FORBIDDEN, DENIED);
    };
    let path = url_path(&row.id, &row.filename);
    if !svc.verify(&path, row.size, &row.content_type, expires, sig) {
        tracing::info!(%id, "upload with a bad signature refused");
        return plain(StatusCode::FORBIDDEN, DENIED);
    }
    if row.state != UploadState::Pending {
        return plain(StatusCode::CONFLICT, "this upload slot was already used\n");
    }
    if now_secs() > expires {
        tracing::info!(%id, "upload on an expired slot refused");
        return plain(StatusCode::FORBIDDEN, DENIED);
    }
    let length = match header_str(&headers, header::CONTENT_LENGTH) {
        None => {
            return plain(
                StatusCode::LENGTH_REQUIRED,
                "Content-Length is required and must be the slot's size\n",
            )
        }
        Some(l) => match l.trim().parse::<u64>() {
            Ok(l) => l,
            Err(_) => return plain(StatusCode::BAD_REQUEST, "Content-Length is not a number\n"),
        },
    };
    if length > row.size {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Content-Length is larger than the slot's size\n",
        );
    }
    if length < row.size {
        return plain(
            StatusCode::BAD_REQUEST,
            "Content-Length is smaller than the slot's size\n",
        );
    }
    let sent_type = header_str(&headers, header::CONTENT_TYPE)
        .map(essence)
        .unwrap_or_else(|| "application/octet-stream".into());
    if sent_type != essence(&row.content_type) {
        return plain(
            StatusCode::BAD_REQUEST,
            "Content-Type differs from the slot's content type\n",
        );
    }
    let slot = match svc.store.claim(&id).await {
        Ok(Some(s)) => s,
        Ok(None) => return plain(StatusCode::CONFLICT, "this upload slot was already used\n"),
        Err(e) => {
            tracing::error!(%id, error = %e, "claiming an upload slot failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "storage error\n");
        }
    };
    // If the connection drops mid-upload, hyper drops this future: the guard then gives the
    // slot back and deletes the partial file.
    let mut guard = Claimed {
        store: svc.store.clone(),
        id: id.clone(),
        armed: true,
    };
    match receive(svc, &slot, body).await {
        Ok(()) => {}
        Err((status, text)) => {
            guard.armed = false;
            let _ = tokio::fs::remove_file(svc.store.partial_path(&id)).await;
            if let Err(e) = svc.store.release(&id).await {
                tracing::error!(%id, error = %e, "releasing an upload slot failed");
            }
            return plain(status, text);
        }
    }
    guard.armed = false;
    let now = now_secs();
    let file_expires = match svc.limits().expire_after {
        0 => 0,
        e => now.saturating_add(e),
    };
    match svc.store.complete(&id, now, file_expires).await {
        Ok(true) => {
            tracing::info!(%id, owner = %slot.owner, size = slot.size, content_type = %slot.content_type, "file uploaded");
            let mut r = plain(StatusCode::CREATED, "");
            r.headers_mut().insert(
                header::ETAG,
                HeaderValue::from_str(&etag(&id)).unwrap_or(HeaderValue::from_static("\"\"")),
            );
            r
        }
        Ok(false) => {
            let _ = tokio::fs::remove_file(svc.store.file_path(&id)).await;
            plain(
                StatusCode::GONE,
                "the upload slot expired during the upload\n",
            )
        }
        Err(e) => {
            tracing::error!(%id, error = %e, "recording an upload failed");
            let _ = tokio::fs::remove_file(svc.store.file_path(&id)).await;
            let _ = svc.store.release(&id).await;
            plain(StatusCode::INTERNAL_SERVER_ERROR, "storage error\n")
        }
    }
}

/// A claimed slot whose upload has not finished.
struct Claimed {
    store: std::sync::Arc<dyn crate::store::upload::UploadStore>,
    id: String,
    armed: bool,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, id) = (self.store.clone(), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::fs::remove_file(store.partial_path(&id)).await;
                if let Err(e) = store.release(&id).await {
                    tracing::error!(%id, error = %e, "releasing an abandoned upload slot failed");
                }
                tracing::info!(%id, "upload abandoned; the slot may be used again");
            });
        }
    }
}

/// Streams the body to the slot's partial file and, once exactly its size arrived and is on
/// disk, moves it in place.
async fn receive(
    svc: &UploadService,
    slot: &Upload,
    mut body: Body,
) -> Result<(), (StatusCode, &'static str)> {
    let partial = svc.store.partial_path(&slot.id);
    let io_failed = |e: std::io::Error| {
        tracing::error!(id = %slot.id, error = %e, "writing an upload failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file\n")
    };
    let mut file = tokio::fs::File::create(&partial).await.map_err(io_failed)?;
    let mut got = 0u64;
    loop {
        let Ok(next) = tokio::time::timeout(BODY_IDLE, body.frame()).await else {
            tracing::info!(id = %slot.id, "upload stalled; given up");
            return Err((StatusCode::REQUEST_TIMEOUT, "the upload stalled\n"));
        };
        let Some(frame) = next else { break };
        let frame = frame.map_err(|e| {
            tracing::info!(id = %slot.id, error = %e, "upload body failed");
            (StatusCode::BAD_REQUEST, "the upload was interrupted\n")
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        got = got.saturating_add(data.len() as u64);
        if got > slot.size {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is larger than the slot's size\n",
            ));
        }
        file.write_all(&data).await.map_err(io_failed)?;
    }
    if got != slot.size {
        return Err((
            StatusCode::BAD_REQUEST,
            "the body is shorter than the slot's size\n",
        ));
    }
    file.sync_all().await.map_err(io_failed)?;
    drop(file);
    let done = svc.store.file_path(&slot.id);
    tokio::fs::rename(&partial, &done)
        .await
        .map_err(io_failed)?;
    // The rename is a change to the folder: sync it too, or a power loss could forget it.
    if let Some(dir) = done.parent() {
        let dir = tokio::fs::File::open(dir).await.map_err(io_failed)?;
        dir.sync_all().await.map_err(io_failed)?;
    }
    Ok(())
}

fn etag(id: &str) -> String {
    format!("\"{id}\"")
}

/// Whether an `If-None-Match` value matches `tag` (weak comparison, RFC 9110 §13.1.2).
fn none_match(value: &str, tag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

/// A single byte range of a `len`-byte file: `Some(Ok((first, last)))`, `Some(Err(()))` when
/// unsatisfiable, `None` when the header is not one range we serve (then the whole file is).
fn parse_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len.saturating_sub(n), len - 1)));
    }
    let first: u64 = a.parse().ok()?;
    let last: u64 = if b.is_empty() {
        u64::MAX
    } else {
        b.parse().ok()?
    };
    if last < first {
        return None;
    }
    if first >= len {
        return Some(Err(()));
    }
    Some(Ok((first, last.min(len - 1))))
}

/// `filename="ascii"; filename*=UTF-8''percent-encoded` (RFC 6266).
fn disposition(kind: &str, filename: &str) -> HeaderValue {
    let ascii: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let v = format!(
        "{kind}; filename=\"{ascii}\"; filename*=UTF-8''{}",
        crate::upload::encode_segment(filename)
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

async fn serve(
    State(st): State<HttpState>,
    Path((id, filename)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let Some(svc) = service(&st) else {
        return plain(StatusCode::NOT_FOUND, "no upload service here\n");
    };
    const MISSING: &str = "no such file\n";
    if !valid_id(&id) {
        return plain(StatusCode::NOT_FOUND, MISSING);
    }
    let row = match svc.store.get(&id).await {
        Ok(Some(r)) if r.filename == filename && r.state == UploadState::Stored => r,
        Ok(_) => return plain(StatusCode::NOT_FOUND, MISSING),
        Err(e) => {
            tracing::error!(%id, error = %e, "reading an upload failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "storage error\n");
        }
    };
    let now = now_secs();
    if row.expires != 0 && now >= row.expires {
        return plain(StatusCode::NOT_FOUND, MISSING);
    }
    let path = svc.store.file_path(&id);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(%id, "an upload's file is missing");
            return plain(StatusCode::NOT_FOUND, MISSING);
        }
        Err(e) => {
            tracing::error!(%id, error = %e, "opening an upload failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            tracing::error!(%id, error = %e, "reading an upload's size failed");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
        }
    };

    let tag = etag(&id);
    let max_age = match row.expires {
        0 => MAX_AGE,
        e => e.saturating_sub(now).min(MAX_AGE),
    };
    let mut h = HeaderMap::new();
    cors(&mut h);
    let mut set = |name: header::HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    set(header::ETAG, &tag);
    set(
        header::LAST_MODIFIED,
        &httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(row.created)),
    );
    set(
        header::CACHE_CONTROL,
        &format!("public, max-age={max_age}, immutable"),
    );
    if header_str(&headers, header::IF_NONE_MATCH).is_some_and(|v| none_match(v, &tag)) {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut().extend(h);
        return r;
    }
    set(header::CONTENT_TYPE, &row.content_type);
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; sandbox",
    );
    set(header::REFERRER_POLICY, "no-referrer");
    set(header::ACCEPT_RANGES, "bytes");
    let kind = if inline_safe(&row.content_type) {
        "inline"
    } else {
        "attachment"
    };
    h.insert(
        header::CONTENT_DISPOSITION,
        disposition(kind, &row.filename),
    );

    // A Range applies unless If-Range names another version.
    let range = header_str(&headers, header::RANGE)
        .filter(|_| header_str(&headers, header::IF_RANGE).is_none_or(|v| v.trim() == tag))
        .and_then(|v| parse_range(v, len));
    let (status, first, count) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Err(())) => {
            let mut r = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            h.remove(header::CONTENT_TYPE);
            h.remove(header::CONTENT_DISPOSITION);
            r.headers_mut().extend(h);
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        Some(Ok((a, b))) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    let body = if method == Method::HEAD || count == 0 {
        Body::empty()
    } else {
        if first > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(first)).await {
                tracing::error!(%id, error = %e, "seeking in an upload failed");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
            }
        }
        Body::from_stream(file_stream(file, count))
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().extend(h);
    r
}

/// `count` bytes of `file` from its position, in chunks.
fn file_stream(
    file: tokio::fs::File,
    count: u64,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    futures_util::stream::unfold((file, count), |(mut file, left)| async move {
        if left == 0 {
            return None;
        }
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK))];
        match file.read(&mut buf).await {
            Ok(0) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file is shorter than its recorded size",
                )),
                (file, 0),
            )),
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), (file, left - n as u64)))
            }
            Err(e) => Some((Err(e), (file, 0))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(Ok((0, 99))));
        assert_eq!(parse_range("bytes=900-", 1000), Some(Ok((900, 999))));
        assert_eq!(parse_range("bytes=-100", 1000), Some(Ok((900, 999))));
        assert_eq!(parse_range("bytes=-5000", 1000), Some(Ok((0, 999))));
        assert_eq!(parse_range("bytes=990-2000", 1000), Some(Ok((990, 999))));
        assert_eq!(parse_range("bytes=1000-", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=-0", 1000), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(parse_range("items=0-1", 1000), None);
        assert_eq!(parse_range("bytes=5-1", 1000), None);
    }

    #[test]
    fn upload_conditional_and_disposition() {
        assert!(none_match("\"abc\"", "\"abc\""));
        assert!(none_match("\"x\", W/\"abc\"", "\"abc\""));
        assert!(none_match("*", "\"abc\""));
        assert!(!none_match("\"abcd\"", "\"abc\""));
        assert_eq!(
            disposition("attachment", "très \"x\".html"),
            "attachment; filename=\"tr_s _x_.html\"; filename*=UTF-8''tr%C3%A8s%20%22x%22.html"
        );
    }
}
