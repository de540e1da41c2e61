//! What a user does with their own token: roster, history, sending messages, push devices.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use halyard_xep::datetime::{format_datetime, parse_datetime};
use halyard_xep::host::{ArchiveKey, ArchivedMessage, KeyRange};
use halyard_xep::Host;
use jid::{BareJid, Jid};
use minidom::Element;
use serde::Deserialize;

use super::auth::UserAuth;
use super::{json, ApiError, Body};
use crate::appserver::{CMD_APNS, CMD_FCM, CMD_UNREGISTER, CMD_WEBHOOK, NS_COMMANDS, NS_DATA};
use crate::http::HttpState;
use crate::server::Server;

const NS_CLIENT: &str = "jabber:client";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// `GET /api/v1/me/roster`.
pub async fn roster(State(st): State<HttpState>, me: UserAuth) -> Result<Response, ApiError> {
    let items = st
        .server
        .stores
        .roster
        .items(&me.jid)
        .await
        .map_err(|e| ApiError::internal("reading a roster for the API failed", e))?;
    let items: Vec<_> = items
        .into_iter()
        .map(|i| {
            serde_json::json!({
                "jid": i.jid,
                "name": i.name,
                "subscription": i.subscription.as_str(),
                "ask": i.ask,
                "groups": i.groups,
            })
        })
        .collect();
    Ok(json(StatusCode::OK, serde_json::json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    with: Option<String>,
    start: Option<String>,
    end: Option<String>,
    #[serde(rename = "after-id")]
    after_id: Option<String>,
}

fn datetime(name: &str, v: &str) -> Result<i64, ApiError> {
    parse_datetime(v.trim()).ok_or_else(|| {
        ApiError::invalid(format!(
            "{name} is not an XEP-0082 date-time such as 2024-05-01T12:00:00Z"
        ))
    })
}

/// The exclusive key range a history query covers (as XEP-0313 `start`/`end`/`after-id`).
async fn range(server: &Server, me: &BareJid, q: &HistoryQuery) -> Result<KeyRange, ApiError> {
    let mut r = KeyRange::default();
    if let Some(s) = q.start.as_deref() {
        let s = datetime("start", s)?;
        if s > 0 {
            r.after = Some(ArchiveKey {
                ts_micros: s as u64 - 1,
                seq: u64::MAX,
            });
        }
    }
    if let Some(e) = q.end.as_deref() {
        let e = datetime("end", e)?;
        r.before = Some(match u64::try_from(e) {
            Ok(e) => ArchiveKey {
                ts_micros: e.saturating_add(1),
                seq: 0,
            },
            Err(_) => ArchiveKey {
                ts_micros: 0,
                seq: 0,
            },
        });
    }
    if let Some(id) = q.after_id.as_deref() {
        let k = server
            .stores
            .archive
            .locate(me, id)
            .await
            .map_err(|e| ApiError::internal("locating an archive id failed", e))?
            .ok_or_else(|| {
                ApiError::not_found(
                    "item_not_found",
                    "after-id names no message in your archive",
                )
            })?;
        if r.after.is_none_or(|a| k > a) {
            r.after = Some(k);
        }
    }
    Ok(r)
}

/// One NDJSON line.
fn record(m: &ArchivedMessage) -> serde_json::Value {
    let el = m.stanza.parse::<Element>().ok();
    let attr = |a: &str| el.as_ref().and_then(|e| e.attr(a)).map(str::to_string);
    let body = el
        .as_ref()
        .and_then(|e| e.get_child("body", NS_CLIENT))
        .map(|b| b.text());
    serde_json::json!({
        "id": m.id,
        "timestamp": format_datetime(m.ts_micros),
        "with": m.with,
        "from": attr("from"),
        "to": attr("to"),
        "type": attr("type"),
        "body": body,
        "stanza": m.stanza,
    })
}

/// Where a history stream is.
struct Cursor {
    server: Arc<Server>,
    owner: BareJid,
    with: Option<BareJid>,
    range: KeyRange,
    page: usize,
    done: bool,
}

impl Cursor {
    /// The next page as NDJSON, `None` at the end. Reads one page per call: the stream is
    /// pulled by the connection as it drains, so a slow reader stops the reading here and the
    /// memory a stream holds is one page, however large the archive.
    async fn next_page(mut self) -> Option<(Result<Vec<u8>, std::io::Error>, Cursor)> {
        if self.done {
            return None;
        }
        let m = &self.server.metrics;
        let timer = m
            .archive_query_seconds
            .with_label_values(&["api"])
            .start_timer();
        let rows = self
            .server
            .stores
            .archive
            .scan(
                &self.owner,
                self.with.as_ref(),
                self.range,
                false,
                self.page,
            )
            .await;
        timer.observe_duration();
        m.api_history_pages.inc();
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                // The status line is sent: the only way left to say so is to cut the body short.
                tracing::error!(error = %e, "reading the archive for a history stream failed");
                self.done = true;
                return Some((Err(std::io::Error::other("archive read failed")), self));
            }
        };
        if rows.len() < self.page {
            self.done = true;
        }
        let (last, _) = rows.last()?;
        self.range.after = Some(*last);
        let mut out = Vec::with_capacity(rows.len() * 256);
        for (_, msg) in &rows {
            if serde_json::to_writer(&mut out, &record(msg)).is_err() {
                continue;
            }
            out.push(b'\n');
        }
        Some((Ok(out), self))
    }
}

/// `GET /api/v1/me/history`: the archive (XEP-0313) as NDJSON, oldest first.
pub async fn history(
    State(st): State<HttpState>,
    me: UserAuth,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(format!("bad query parameters: {e}")))?;
    let with = q
        .with
        .as_deref()
        .map(|w| halyard_xep::stanza::parse_bare_jid(w.trim()))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("with is not a JID: {e}")))?;
    let range = range(&st.server, &me.jid, &q).await?;
    tracing::debug!(jid = %me.jid, "history stream started");
    let cursor = Cursor {
        server: st.server.clone(),
        owner: me.jid,
        with,
        range,
        page: st.server.config.api.history_page,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, Cursor::next_page);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    pub to: String,
    pub body: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

/// Checks a message request and returns the recipient: a local account (or one of its
/// resources) or a component of this server; anything else gets 422 or 404.
pub(super) async fn check_message(
    server: &Server,
    m: &SendMessage,
    default_kind: &str,
) -> Result<(Jid, String), ApiError> {
    let to = halyard_xep::stanza::parse_jid(m.to.trim())
        .map_err(|e| ApiError::invalid(format!("to is not a JID: {e}")))?;
    let kind = m.kind.clone().unwrap_or_else(|| default_kind.to_string());
    if !matches!(kind.as_str(), "chat" | "normal" | "headline") {
        return Err(ApiError::invalid("type must be chat, normal or headline"));
    }
    if m.body.is_empty() {
        return Err(ApiError::invalid("body is empty"));
    }
    if m.body.len() + m.subject.as_ref().map_or(0, String::len)
        > server.config.c2s.max_stanza_bytes / 2
    {
        return Err(ApiError::invalid("body is larger than this server accepts"));
    }
    let domain = to.domain().as_str();
    if server.registry.component_for(domain).is_some() {
        return Ok((to, kind));
    }
    if !server.is_local_domain(domain) {
        return Err(ApiError::invalid(
            "to is not on this server: it does not federate",
        ));
    }
    if to.node().is_none() {
        return Err(ApiError::invalid("to must be a user (user@domain)"));
    }
    let exists = server
        .stores
        .accounts
        .get(&to.to_bare())
        .await
        .map_err(|e| ApiError::internal("account lookup for an API message failed", e))?
        .is_some();
    if !exists {
        return Err(ApiError::not_found("no_such_user", "to names no account"));
    }
    Ok((to, kind))
}

/// Builds the stanza, routes it like any other (delivery, archive, carbons, offline storage,
/// push) and answers 202 with its id.
pub(super) async fn route_message(
    server: &Server,
    from: &str,
    to: &Jid,
    kind: &str,
    m: &SendMessage,
) -> Response {
    let id = format!("api-{:016x}", rand::random::<u64>());
    let mut b = Element::builder("message", NS_CLIENT)
        .attr(halyard_xep::stanza::n("from"), from)
        .attr(halyard_xep::stanza::n("to"), to.to_string())
        .attr(halyard_xep::stanza::n("type"), kind)
        .attr(halyard_xep::stanza::n("id"), id.as_str());
    if let Some(s) = m.subject.as_deref().filter(|s| !s.is_empty()) {
        b = b.append(Element::builder("subject", NS_CLIENT).append(s).build());
    }
    b = b.append(
        Element::builder("body", NS_CLIENT)
            .append(m.body.as_str())
            .build(),
    );
    crate::router::route_trusted(server, b.build()).await;
    json(StatusCode::ACCEPTED, serde_json::json!({ "id": id }))
}

/// The resource messages sent through the API come from.
pub const API_RESOURCE: &str = "api";

/// `POST /api/v1/me/messages`: sends a message from the user's resource [`API_RESOURCE`].
pub async fn send_message(
    State(st): State<HttpState>,
    me: UserAuth,
    Body(m): Body<SendMessage>,
) -> Result<Response, ApiError> {
    let (to, kind) = check_message(&st.server, &m, "chat").await?;
    tracing::info!(from = %me.jid, %to, kind, "API message");
    // From a resource, as a client's would be: the archive and carbons treat it like any
    // message the user sends (replies to it go to the user's bare JID's rules).
    let from = format!("{}/{API_RESOURCE}", me.jid);
    Ok(route_message(&st.server, &from, &to, &kind, &m).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRequest {
    provider: String,
    device_id: String,
    token: String,
}

/// Runs one of the app server's ad-hoc commands as `me`, exactly as a client would over XMPP,
/// so validation and storage stay the app server's. Returns the result's form fields, or the
/// error condition and text.
async fn command(
    server: &Server,
    me: &BareJid,
    service: &str,
    node: &str,
    fields: &[(&str, &str)],
) -> Result<Vec<(String, String)>, (String, String)> {
    let mut x = Element::builder("x", NS_DATA).attr(halyard_xep::stanza::n("type"), "submit");
    for (var, value) in fields {
        x = x.append(
            Element::builder("field", NS_DATA)
                .attr(halyard_xep::stanza::n("var"), *var)
                .append(Element::builder("value", NS_DATA).append(*value).build())
                .build(),
        );
    }
    let iq = Element::builder("iq", NS_CLIENT)
        .attr(halyard_xep::stanza::n("type"), "set")
        .attr(halyard_xep::stanza::n("from"), me.as_str())
        .attr(halyard_xep::stanza::n("to"), service)
        .append(
            Element::builder("command", NS_COMMANDS)
                .attr(halyard_xep::stanza::n("node"), node)
                .attr(halyard_xep::stanza::n("action"), "execute")
                .append(x.build())
                .build(),
        )
        .build();
    let Some(reply) = server.request(iq, Duration::from_secs(10)).await else {
        return Err(("remote-server-timeout".into(), String::new()));
    };
    if reply.attr("type") == Some("result") {
        let fields = reply
            .get_child("command", NS_COMMANDS)
            .and_then(|c| c.get_child("x", NS_DATA))
            .map(|x| {
                x.children()
                    .filter(|f| f.is("field", NS_DATA))
                    .filter_map(|f| {
                        let v = f.get_child("value", NS_DATA)?.text();
                        Some((f.attr("var")?.to_string(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Ok(fields);
    }
    let err = reply.get_child("error", NS_CLIENT);
    let cond = err
        .and_then(|e| {
            e.children()
                .find(|c| c.ns() == NS_STANZAS && c.name() != "text")
        })
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| "undefined-condition".into());
    let text = err
        .and_then(|e| e.get_child("text", NS_STANZAS))
        .map(|t| t.text())
        .unwrap_or_default();
    Err((cond, text))
}

fn appserver_domain(server: &Server) -> Result<String, ApiError> {
    server
        .appserver
        .as_ref()
        .map(|a| a.domain().to_string())
        .ok_or_else(|| {
            ApiError::not_found(
                "appserver_disabled",
                "this server runs no push app server (appserver.enabled is off)",
            )
        })
}

/// `POST /api/v1/me/push-devices`: registers a device with the built-in app server.
pub async fn register_device(
    State(st): State<HttpState>,
    me: UserAuth,
    Body(req): Body<DeviceRequest>,
) -> Result<Response, ApiError> {
    let service = appserver_domain(&st.server)?;
    let node = match req.provider.as_str() {
        "fcm" => CMD_FCM,
        "apns" => CMD_APNS,
        "webhook" => CMD_WEBHOOK,
        _ => return Err(ApiError::invalid("provider must be fcm, apns or webhook")),
    };
    let fields = [
        ("device-id", req.device_id.as_str()),
        ("token", req.token.as_str()),
    ];
    match command(&st.server, &me.jid, &service, node, &fields).await {
        Ok(form) => {
            let get = |k: &str| {
                form.iter()
                    .find(|(var, _)| var == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            Ok(json(
                StatusCode::CREATED,
                serde_json::json!({
                    "service": service,
                    "device_id": req.device_id.trim(),
                    "provider": req.provider,
                    "node": get("node"),
                    "secret": get("secret"),
                }),
            ))
        }
        Err((cond, text)) => Err(match cond.as_str() {
            "item-not-found" => ApiError::conflict(
                "provider_unavailable",
                format!("the app server has no {} provider configured", req.provider),
            ),
            "bad-request" => ApiError::invalid(text),
            "resource-constraint" => ApiError::conflict("too_many_devices", text),
            _ => ApiError::internal("registering a push device through the API failed", cond),
        }),
    }
}

/// `DELETE /api/v1/me/push-devices/{device_id}`.
pub async fn unregister_device(
    State(st): State<HttpState>,
    me: UserAuth,
    Path(device_id): Path<String>,
) -> Result<Response, ApiError> {
    let service = appserver_domain(&st.server)?;
    let fields = [("device-id", device_id.as_str())];
    match command(&st.server, &me.jid, &service, CMD_UNREGISTER, &fields).await {
        Ok(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err((cond, text)) => Err(match cond.as_str() {
            "item-not-found" => ApiError::not_found("no_such_device", text),
            "bad-request" => ApiError::invalid(text),
            _ => ApiError::internal("unregistering a push device through the API failed", cond),
        }),
    }
}
