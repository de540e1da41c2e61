//! XEP-0363 HTTP File Upload: the component at `upload.<domain>` (configurable) that hands out
//! upload slots; the HTTP side (PUT and GET on `/upload/<id>/<filename>`) is
//! `crate::http::upload`, and the metadata lives in `crate::store::upload`.
//!
//! - **Discovery**: identity `store/file`, feature `urn:xmpp:http:upload:0` and a
//!   `jabber:x:data` form with `max-file-size` (XEP-0128). The router lists the component in the
//!   server's disco#items.
//! - **Slots**: only accounts of a domain this server serves may ask. The request's size, file
//!   name and content type are checked (too large: `not-acceptable` with `<file-too-large/>`);
//!   then the per-account rate (`resource-constraint`, with `<retry stamp/>`) and byte quota
//!   (`resource-constraint`, saying which). A slot reserves its size in the quota until it
//!   expires or the upload completes. Its PUT URL carries an expiry and an HMAC-SHA256 over the
//!   path, size, content type and expiry; the GET URL is the same path.
//!
//! Logs name the owner, id, size and content type; never a file's contents, the signing key or a
//! signature.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use halyard_xep::host::Host;
use halyard_xep::registry::Component;
use halyard_xep::stanza::{n, Kind, Stanza, StanzaError};
use hmac::{Hmac, Mac};
use minidom::Element;
use sha2::Sha256;

use crate::store::upload::{ReserveError, Upload, UploadState, UploadStore};

pub const NS_UPLOAD: &str = "urn:xmpp:http:upload:0";
const NS_DATA: &str = "jabber:x:data";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_PING: &str = "urn:xmpp:ping";

/// The path prefix of the HTTP routes.
pub const PATH_PREFIX: &str = "/upload";
/// Longest file name kept, in bytes (the extension is kept when a name is cut).
pub const MAX_FILENAME: usize = 128;
/// Longest extension kept intact when a name is cut.
const MAX_EXTENSION: usize = 16;
/// Longest content type accepted.
const MAX_CONTENT_TYPE: usize = 128;

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Makes a client's file name safe to store and serve: the last path segment, without control
/// characters, quotes, or leading dots and spaces, at most [`MAX_FILENAME`] bytes with its
/// extension kept. `None` when nothing usable is left.
pub fn sanitize_filename(raw: &str) -> Option<String> {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '"' | '\u{2028}' | '\u{2029}' | '\u{feff}') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    if trimmed.is_empty() || trimmed.chars().all(|c| c == '_') {
        return None;
    }
    if trimmed.len() <= MAX_FILENAME {
        return Some(trimmed.to_string());
    }
    let (stem, ext) = match trimmed.rfind('.') {
        Some(dot) if trimmed.len() - dot <= MAX_EXTENSION + 1 && dot > 0 => trimmed.split_at(dot),
        _ => (trimmed, ""),
    };
    let mut end = MAX_FILENAME - ext.len();
    while !stem.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}{ext}", stem[..end].trim_end()))
}

/// Checks a requested content type (`type/subtype`, optional parameters) and returns it with
/// the media type lower-cased; none given means `application/octet-stream`.
pub fn check_content_type(raw: Option<&str>) -> Result<String, &'static str> {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok("application/octet-stream".into());
    };
    if raw.len() > MAX_CONTENT_TYPE || !raw.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("the content type must be printable ASCII of at most 128 characters");
    }
    let (essence, params) = match raw.split_once(';') {
        Some((e, p)) => (e.trim(), Some(p.trim())),
        None => (raw, None),
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    match essence.split_once('/') {
        Some((t, s)) if token(t) && token(s) => {}
        _ => return Err("the content type must look like type/subtype, e.g. image/jpeg"),
    }
    let essence = essence.to_ascii_lowercase();
    Ok(match params {
        Some(p) if !p.is_empty() => format!("{essence}; {p}"),
        _ => essence,
    })
}

/// The media type of a content type, lower-cased, without parameters.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Content types a browser may show inline from our origin without running anything: images,
/// audio and video in common formats, PDF and plain text. Everything else (HTML, SVG, XML,
/// JavaScript, unknown types) is served as an attachment.
pub fn inline_safe(content_type: &str) -> bool {
    matches!(
        essence(content_type).as_str(),
        "image/png"
            | "image/jpeg"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "image/heic"
            | "image/heif"
            | "image/bmp"
            | "audio/mpeg"
            | "audio/mp4"
            | "audio/aac"
            | "audio/ogg"
            | "audio/opus"
            | "audio/webm"
            | "audio/wav"
            | "audio/x-wav"
            | "audio/flac"
            | "video/mp4"
            | "video/webm"
            | "video/ogg"
            | "video/quicktime"
            | "application/pdf"
            | "text/plain"
    )
}

/// Characters left as they are in a path segment (RFC 3986 unreserved); everything else,
/// non-ASCII included, is percent-encoded.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// The URL path of an upload: `/upload/<id>/<percent-encoded filename>`.
pub fn url_path(id: &str, filename: &str) -> String {
    format!("{PATH_PREFIX}/{id}/{}", encode_segment(filename))
}

fn random_id() -> String {
    let mut b = [0u8; 18];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The key PUT URLs are signed with: `secret` when set, else the one kept in
/// `<data_dir>/upload.key`, generated (32 random bytes, base64, mode 0600) on first use.
pub fn load_key(secret: &str, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if !secret.is_empty() {
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data_dir.join("upload.key");
    let b64 = base64::engine::general_purpose::STANDARD;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = b64.decode(text.trim()).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not base64 ({e}): delete it to have a new key generated (open upload slots then stop working)",
                    path.display()
                )
            })?;
            anyhow::ensure!(
                key.len() >= 16,
                "{} holds a key shorter than 16 bytes: delete it to have a new one generated",
                path.display()
            );
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read the upload key {}: {e}", path.display()),
    }
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    std::fs::create_dir_all(data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create data_dir {}: {e}", data_dir.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&path).and_then(|mut f| {
        use std::io::Write;
        f.write_all(b64.encode(&key).as_bytes())?;
        f.sync_all()
    });
    match written {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated the upload signing key");
            Ok(key)
        }
        // Another process created it meanwhile: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_key("", data_dir),
        Err(e) => anyhow::bail!("cannot write the upload key {}: {e}", path.display()),
    }
}

/// The limits a slot request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_file_size: u64,
    pub quota_per_user: u64,
    pub slots_per_minute: u32,
    pub expire_after: u64,
    pub slot_validity_secs: u64,
}

pub struct UploadService {
    domain: String,
    limits: Limits,
    /// HMAC-SHA256 keyed with the signing key, cloned for each signature.
    mac: Hmac<Sha256>,
    pub store: Arc<dyn UploadStore>,
    /// The HTTP service's base URL, known once the listeners are bound.
    base_url: OnceLock<String>,
    /// Slot requests per account in the last minute.
    recent: Mutex<HashMap<String, VecDeque<u64>>>,
}

/// Why a slot request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotError {
    BadRequest(&'static str),
    TooLarge(u64),
    Forbidden,
    /// Too many slots; retry at this time (seconds since the epoch).
    Rate {
        per_minute: u32,
        retry_at: u64,
    },
    Quota {
        used: u64,
        quota: u64,
    },
    Unavailable(&'static str),
    Internal,
}

/// A granted slot.
#[derive(Debug)]
pub struct Slot {
    pub put: String,
    pub get: String,
}

impl UploadService {
    pub fn new(
        cfg: &crate::config::Upload,
        domain: String,
        store: Arc<dyn UploadStore>,
        data_dir: &Path,
    ) -> anyhow::Result<UploadService> {
        let key = load_key(&cfg.secret, data_dir)?;
        let mac = Hmac::<Sha256>::new_from_slice(&key)
            .map_err(|e| anyhow::anyhow!("the upload signing key is unusable: {e}"))?;
        tracing::info!(
            %domain,
            max_file_size = cfg.max_file_size,
            quota_per_user = cfg.quota_per_user,
            "upload service ready"
        );
        Ok(UploadService {
            domain,
            limits: Limits {
                max_file_size: cfg.max_file_size,
                quota_per_user: cfg.quota_per_user,
                slots_per_minute: cfg.slots_per_minute,
                expire_after: cfg.expire_after,
                slot_validity_secs: cfg.slot_validity_secs,
            },
            mac,
            store,
            base_url: OnceLock::new(),
            recent: Mutex::new(HashMap::new()),
        })
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Sets the base URL slots are built from (`Server::public_url`), once it is known.
    pub fn set_base_url(&self, url: &str) {
        if url.is_empty() {
            tracing::warn!("no HTTP listener and no http.public_url: upload slots are refused");
        } else if !url.starts_with("https://") {
            tracing::warn!(%url, "uploads are served over plain HTTP; XEP-0363 requires HTTPS (set http.public_url)");
        }
        let _ = self.base_url.set(url.trim_end_matches('/').to_string());
    }

    fn mac(&self, path: &str, size: u64, content_type: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(format!("PUT\n{path}\n{size}\n{content_type}\n{expires}").as_bytes());
        mac
    }

    /// The signature of a PUT URL (base64url).
    pub fn sign(&self, path: &str, size: u64, content_type: &str, expires: u64) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            self.mac(path, size, content_type, expires)
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks a signature in constant time.
    pub fn verify(
        &self,
        path: &str,
        size: u64,
        content_type: &str,
        expires: u64,
        sig: &str,
    ) -> bool {
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
            return false;
        };
        self.mac(path, size, content_type, expires)
            .verify_slice(&raw)
            .is_ok()
    }

    /// Counts a slot request against `owner`'s rate; `Err` is when the next one may come.
    fn rate(&self, owner: &str, now: u64) -> Result<(), u64> {
        let limit = self.limits.slots_per_minute as usize;
        if limit == 0 {
            return Ok(());
        }
        let mut map = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, q| q.back().is_some_and(|t| now < t + 60));
        }
        let q = map.entry(owner.to_string()).or_default();
        while q.front().is_some_and(|t| now >= t + 60) {
            q.pop_front();
        }
        if q.len() >= limit {
            return Err(q.front().map(|t| t + 60).unwrap_or(now + 60));
        }
        q.push_back(now);
        Ok(())
    }

    /// Grants a slot for `owner` (a local bare JID) or says why not.
    pub async fn request_slot(
        &self,
        owner: &str,
        filename: Option<&str>,
        size: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<Slot, SlotError> {
        let filename = filename.ok_or(SlotError::BadRequest("the request has no filename"))?;
        let filename = sanitize_filename(filename).ok_or(SlotError::BadRequest(
            "the file name is empty once made safe",
        ))?;
        let size: u64 = size
            .and_then(|s| s.trim().parse().ok())
            .ok_or(SlotError::BadRequest(
                "size must be the file's size in bytes",
            ))?;
        if size > self.limits.max_file_size {
            return Err(SlotError::TooLarge(self.limits.max_file_size));
        }
        let content_type = check_content_type(content_type).map_err(SlotError::BadRequest)?;
        let base = self
            .base_url
            .get()
            .filter(|b| !b.is_empty())
            .ok_or(SlotError::Unavailable(
                "the server has no HTTP listener to upload to",
            ))?;
        let now = now_secs();
        if let Err(retry_at) = self.rate(owner, now) {
            return Err(SlotError::Rate {
                per_minute: self.limits.slots_per_minute,
                retry_at,
            });
        }
        let id = random_id();
        let expires = now.saturating_add(self.limits.slot_validity_secs);
        let slot = Upload {
            id: id.clone(),
            owner: owner.to_string(),
            filename: filename.clone(),
            size,
            content_type: content_type.clone(),
            created: now,
            expires,
            state: UploadState::Pending,
        };
        match self.store.reserve(&slot, self.limits.quota_per_user).await {
            Ok(()) => {}
            Err(ReserveError::Quota { used, quota }) => {
                return Err(SlotError::Quota { used, quota })
            }
            Err(ReserveError::Store(e)) => {
                tracing::error!(error = %e, "reserving an upload slot failed");
                return Err(SlotError::Internal);
            }
        }
        let path = url_path(&id, &filename);
        let sig = self.sign(&path, size, &content_type, expires);
        tracing::info!(%owner, %id, size, %content_type, "upload slot granted");
        Ok(Slot {
            put: format!("{base}{path}?e={expires}&s={sig}"),
            get: format!("{base}{path}"),
        })
    }

    fn disco_info(&self, st: &Stanza, q: &Element) -> Element {
        if q.attr("node").is_some() {
            return error(st, StanzaError::ItemNotFound(None));
        }
        let feature = |var: &str| {
            Element::builder("feature", NS_DISCO_INFO)
                .attr(n("var"), var)
                .build()
        };
        let field = |var: &str, typ: Option<&str>, value: String| {
            let mut f = Element::builder("field", NS_DATA).attr(n("var"), var);
            if let Some(t) = typ {
                f = f.attr(n("type"), t);
            }
            f.append(Element::builder("value", NS_DATA).append(value).build())
                .build()
        };
        let form = Element::builder("x", NS_DATA)
            .attr(n("type"), "result")
            .append(field("FORM_TYPE", Some("hidden"), NS_UPLOAD.to_string()))
            .append(field(
                "max-file-size",
                None,
                self.limits.max_file_size.to_string(),
            ))
            .build();
        let q = Element::builder("query", NS_DISCO_INFO)
            .append(
                Element::builder("identity", NS_DISCO_INFO)
                    .attr(n("category"), "store")
                    .attr(n("type"), "file")
                    .attr(n("name"), "HTTP File Upload")
                    .build(),
            )
            .append(feature(NS_DISCO_INFO))
            .append(feature(NS_DISCO_ITEMS))
            .append(feature(NS_PING))
            .append(feature(NS_UPLOAD))
            .append(form)
            .build();
        st.iq_result(Some(q))
    }

    async fn slot(&self, host: &dyn Host, st: &Stanza, req: &Element) -> Element {
        let local = may_upload(&st.from, |d| host.is_local_domain(d));
        let owner = st.from.to_bare().to_string();
        let r = if local {
            self.request_slot(
                &owner,
                req.attr("filename"),
                req.attr("size"),
                req.attr("content-type"),
            )
            .await
        } else {
            Err(SlotError::Forbidden)
        };
        match r {
            Ok(slot) => st.iq_result(Some(
                Element::builder("slot", NS_UPLOAD)
                    .append(
                        Element::builder("put", NS_UPLOAD)
                            .attr(n("url"), slot.put)
                            .build(),
                    )
                    .append(
                        Element::builder("get", NS_UPLOAD)
                            .attr(n("url"), slot.get)
                            .build(),
                    )
                    .build(),
            )),
            Err(e) => {
                tracing::info!(%owner, reason = ?e, "upload slot refused");
                slot_error(st, e)
            }
        }
    }
}

/// Whether `from` (stamped by the router) is an account of a domain this server serves: only
/// those get slots.
pub fn may_upload(from: &jid::Jid, is_local_domain: impl Fn(&str) -> bool) -> bool {
    from.node().is_some() && is_local_domain(from.domain().as_str())
}

fn error(st: &Stanza, e: StanzaError) -> Element {
    st.error_reply(e).unwrap_or_else(|| st.iq_result(None))
}

/// The error reply for a refused slot, with XEP-0363's application elements.
fn slot_error(st: &Stanza, e: SlotError) -> Element {
    let (err, app, wait) = match e {
        SlotError::BadRequest(t) => (StanzaError::BadRequest(Some(t.into())), None, false),
        SlotError::TooLarge(max) => (
            StanzaError::NotAcceptable(Some(format!(
                "File too large. The maximum file size is {max} bytes"
            ))),
            Some(
                Element::builder("file-too-large", NS_UPLOAD)
                    .append(
                        Element::builder("max-file-size", NS_UPLOAD)
                            .append(max.to_string())
                            .build(),
                    )
                    .build(),
            ),
            false,
        ),
        SlotError::Forbidden => (
            StanzaError::Forbidden(Some("only accounts of this server may upload files".into())),
            None,
            false,
        ),
        SlotError::Rate {
            per_minute,
            retry_at,
        } => (
            StanzaError::PolicyViolation(Some(format!(
                "Upload rate limit reached: at most {per_minute} upload slots per minute"
            ))),
            Some(
                Element::builder("retry", NS_UPLOAD)
                    .attr(
                        n("stamp"),
                        halyard_xep::datetime::format_datetime(retry_at.saturating_mul(1_000_000)),
                    )
                    .build(),
            ),
            true,
        ),
        SlotError::Quota { used, quota } => (
            StanzaError::ResourceConstraint(Some(format!(
                "Upload quota exceeded: {used} of {quota} bytes are in use by your files"
            ))),
            None,
            false,
        ),
        SlotError::Unavailable(t) => (StanzaError::ServiceUnavailable(Some(t.into())), None, false),
        SlotError::Internal => (StanzaError::InternalServerError(None), None, true),
    };
    let mut reply = error(st, err);
    if let Some(e) = reply
        .children_mut()
        .find(|c| c.is("error", halyard_xep::ns::CLIENT))
    {
        if wait {
            e.set_attr(minidom::rxml::Namespace::NONE, n("type"), "wait");
        }
        if let Some(a) = app {
            e.append_child(a);
        }
    }
    reply
}

#[async_trait]
impl Component for UploadService {
    fn name(&self) -> &str {
        "HTTP File Upload"
    }

    async fn handle(&self, host: &dyn Host, st: Stanza) {
        if st.kind != Kind::Iq {
            if st.kind == Kind::Message && !st.is_error() {
                host.route(error(&st, StanzaError::ServiceUnavailable(None)))
                    .await;
            }
            return;
        }
        let typ = st.type_().to_string();
        if typ != "get" && typ != "set" {
            return;
        }
        let to_service = st
            .to
            .as_ref()
            .is_some_and(|t| t.node().is_none() && t.resource().is_none());
        let reply = match st.payload().cloned() {
            _ if !to_service => error(&st, StanzaError::ServiceUnavailable(None)),
            None => error(&st, StanzaError::BadRequest(None)),
            Some(p) => match (typ.as_str(), p.name(), p.ns().as_str()) {
                ("get", "query", NS_DISCO_INFO) => self.disco_info(&st, &p),
                ("get", "query", NS_DISCO_ITEMS) if p.attr("node").is_none() => {
                    st.iq_result(Some(Element::bare("query", NS_DISCO_ITEMS)))
                }
                ("get", "ping", NS_PING) => st.iq_result(None),
                ("get", "request", NS_UPLOAD) => self.slot(host, &st, &p).await,
                _ => error(&st, StanzaError::ServiceUnavailable(None)),
            },
        };
        host.route(reply).await;
    }
}

/// How often expiry runs: a tenth of the shortest lifetime, between a second and a minute.
fn interval(limits: &Limits) -> Duration {
    let shortest = match limits.expire_after {
        0 => limits.slot_validity_secs,
        e => e.min(limits.slot_validity_secs),
    };
    Duration::from_secs((shortest / 10).clamp(1, 60))
}

/// Deletes expired files and unused slots (with any partial upload), now and then periodically,
/// until `shutdown`.
pub async fn expiry(service: Arc<UploadService>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let every = interval(&service.limits);
    loop {
        let mut removed = 0u64;
        loop {
            let due = match service.store.due(now_secs(), 256).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "upload expiry failed; will retry");
                    break;
                }
            };
            let batch = due.len();
            for u in due {
                match service.store.remove(&u.id).await {
                    Ok(true) => {
                        removed += 1;
                        tracing::debug!(id = %u.id, owner = %u.owner, state = ?u.state, "upload expired");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(id = %u.id, error = %e, "removing an expired upload failed")
                    }
                }
            }
            if batch < 256 {
                break;
            }
            tokio::task::yield_now().await;
        }
        if removed > 0 {
            tracing::info!(removed, "expired uploads and slots removed");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::server::until_shutdown(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_filenames_are_sanitised() {
        assert_eq!(
            sanitize_filename("très cool.jpg").as_deref(),
            Some("très cool.jpg")
        );
        assert_eq!(
            sanitize_filename("../../etc/passwd").as_deref(),
            Some("passwd")
        );
        assert_eq!(
            sanitize_filename("C:\\Users\\x\\a.png").as_deref(),
            Some("a.png")
        );
        assert_eq!(
            sanitize_filename("..hidden.txt").as_deref(),
            Some("hidden.txt")
        );
        assert_eq!(
            sanitize_filename("a\nb\u{0}c\".txt").as_deref(),
            Some("a_b_c_.txt")
        );
        assert_eq!(sanitize_filename("name. . ").as_deref(), Some("name"));
        for bad in ["", "...", "dir/", " . ", "\n"] {
            assert_eq!(sanitize_filename(bad), None, "{bad:?}");
        }
        let long = format!("{}.jpeg", "é".repeat(200));
        let s = sanitize_filename(&long).unwrap();
        assert!(s.len() <= MAX_FILENAME, "{}", s.len());
        assert!(s.ends_with("é.jpeg"), "the extension is kept: {s}");
        let no_ext = "x".repeat(300);
        assert_eq!(sanitize_filename(&no_ext).unwrap().len(), MAX_FILENAME);
    }

    #[test]
    fn upload_content_types() {
        assert_eq!(
            check_content_type(None).unwrap(),
            "application/octet-stream"
        );
        assert_eq!(
            check_content_type(Some("Image/JPEG")).unwrap(),
            "image/jpeg"
        );
        assert_eq!(
            check_content_type(Some("text/plain;charset=utf-8")).unwrap(),
            "text/plain; charset=utf-8"
        );
        for bad in ["image", "a/b/c", "image/jpeg\r\nX-Evil: 1", "té/x", "/x"] {
            assert!(check_content_type(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(inline_safe("image/png") && inline_safe("text/plain; charset=utf-8"));
        for active in [
            "text/html",
            "image/svg+xml",
            "application/xml",
            "text/javascript",
            "application/octet-stream",
        ] {
            assert!(!inline_safe(active), "{active}");
        }
    }

    #[test]
    fn upload_paths_are_percent_encoded() {
        assert_eq!(
            url_path("abc", "très cool.jpg"),
            "/upload/abc/tr%C3%A8s%20cool.jpg"
        );
        assert_eq!(encode_segment("a?b#c%d/e"), "a%3Fb%23c%25d%2Fe");
    }

    fn service(dir: &Path, slots_per_minute: u32, quota: u64) -> UploadService {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let store =
            Arc::new(crate::store::upload::SledUploads::open(&db, &dir.join("uploads")).unwrap());
        let cfg = crate::config::Upload {
            max_file_size: 1000,
            quota_per_user: quota,
            slots_per_minute,
            ..Default::default()
        };
        let s = UploadService::new(&cfg, "upload.x".into(), store, dir).unwrap();
        s.set_base_url("https://x:5281/");
        s
    }

    #[tokio::test]
    async fn upload_slots_are_signed_and_limited() {
        let d = tempfile::tempdir().unwrap();
        let s = service(d.path(), 3, 1500);
        let slot = s
            .request_slot("me@x", Some("a b.png"), Some("600"), Some("image/png"))
            .await
            .unwrap();
        assert!(
            slot.get.starts_with("https://x:5281/upload/"),
            "{}",
            slot.get
        );
        assert!(slot.get.ends_with("/a%20b.png"), "{}", slot.get);
        assert!(slot.put.starts_with(&format!("{}?e=", slot.get)));
        let path = slot.get.trim_start_matches("https://x:5281");
        let (e, sig) = slot
            .put
            .split_once("?e=")
            .unwrap()
            .1
            .split_once("&s=")
            .unwrap();
        let e: u64 = e.parse().unwrap();
        assert!(s.verify(path, 600, "image/png", e, sig));
        assert!(!s.verify(path, 601, "image/png", e, sig), "size is signed");
        assert!(
            !s.verify(path, 600, "image/gif", e, sig),
            "content type is signed"
        );
        assert!(
            !s.verify(path, 600, "image/png", e + 1, sig),
            "expiry is signed"
        );
        assert!(
            !s.verify("/upload/x/y", 600, "image/png", e, sig),
            "path is signed"
        );
        assert!(!s.verify(path, 600, "image/png", e, "AAAA"));

        assert_eq!(
            s.request_slot("me@x", Some("b.png"), Some("1001"), None)
                .await
                .unwrap_err(),
            SlotError::TooLarge(1000)
        );
        assert!(matches!(
            s.request_slot("me@x", Some("b.png"), Some("901"), None)
                .await
                .unwrap_err(),
            SlotError::Quota {
                used: 600,
                quota: 1500
            }
        ));
        assert!(matches!(
            s.request_slot("me@x", Some("b.png"), Some("-1"), None)
                .await
                .unwrap_err(),
            SlotError::BadRequest(_)
        ));
        s.request_slot("me@x", Some("c.png"), Some("1"), None)
            .await
            .unwrap();
        assert!(matches!(
            s.request_slot("me@x", Some("d.png"), Some("1"), None)
                .await
                .unwrap_err(),
            SlotError::Rate { per_minute: 3, .. }
        ));
        s.request_slot("other@x", Some("d.png"), Some("1"), None)
            .await
            .expect("the rate is per account");
    }

    #[test]
    fn upload_only_accounts_of_served_domains() {
        let local = |d: &str| d == "x.org";
        let j = |s: &str| jid::Jid::new(s).unwrap();
        assert!(may_upload(&j("alice@x.org/phone"), local));
        assert!(may_upload(&j("alice@x.org"), local));
        assert!(!may_upload(&j("mallory@elsewhere.org/r"), local));
        assert!(
            !may_upload(&j("x.org"), local),
            "the server itself is no account"
        );
        assert!(!may_upload(&j("upload.x.org"), local));
    }

    #[test]
    fn upload_key_is_generated_once() {
        let d = tempfile::tempdir().unwrap();
        let k1 = load_key("", d.path()).unwrap();
        assert_eq!(k1.len(), 32);
        assert_eq!(load_key("", d.path()).unwrap(), k1);
        assert_eq!(
            load_key("a configured secret", d.path()).unwrap(),
            b"a configured secret"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.path().join("upload.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
