//! What an admin token allows. Account changes go through the same handlers as the `halyard
//! user` CLI ([`crate::admin::user`]), so both behave alike (validation, ending sessions).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jid::{BareJid, FullJid};
use serde::Deserialize;

use super::auth::AdminAuth;
use super::user::{check_message, route_message, SendMessage};
use super::{json, ApiError, Body};
use crate::admin::{self, Context};
use crate::http::HttpState;
use crate::server::Server;
use crate::store::AccountError;
use crate::stream::{StreamError, StreamErrorKind};

fn ctx(server: &Server) -> Context<'_> {
    Context {
        stores: &server.stores,
        server: Some(server),
        domains: &server.config.domains,
        scram_iterations: server.config.auth.scram_iterations,
    }
}

/// Maps an admin command's error: the store's typed errors to 404/409/500, everything else
/// (the commands' validation, which says the fix) to 422.
fn command_error(e: anyhow::Error) -> ApiError {
    if let Some(a) = e.downcast_ref::<AccountError>() {
        return match a {
            AccountError::Exists(_) => ApiError::conflict("exists", a.to_string()),
            AccountError::NotFound(_) => ApiError::not_found("no_such_user", a.to_string()),
            AccountError::Store(s) => ApiError::internal("an admin API command failed", s),
        };
    }
    if let Some(s) = e.downcast_ref::<halyard_xep::host::StoreError>() {
        return ApiError::internal("an admin API command failed", s);
    }
    ApiError::invalid(format!("{e:#}"))
}

/// A served account's JID from a path, normalised.
fn account(server: &Server, raw: &str) -> Result<BareJid, ApiError> {
    let jid = halyard_xep::stanza::parse_bare_jid(raw).map_err(ApiError::invalid)?;
    if jid.node().is_none()
        || !server
            .config
            .domains
            .iter()
            .any(|d| d == jid.domain().as_str())
    {
        return Err(ApiError::invalid(format!(
            "{raw:?} is not an account on this server (user@domain)"
        )));
    }
    Ok(jid)
}

/// `GET /api/v1/admin/users`.
pub async fn list_users(State(st): State<HttpState>, _: AdminAuth) -> Result<Response, ApiError> {
    let users = admin::user::list(&ctx(&st.server))
        .await
        .map_err(command_error)?;
    Ok(json(StatusCode::OK, serde_json::json!({ "users": users })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    jid: String,
    password: String,
}

/// `POST /api/v1/admin/users`.
pub async fn create_user(
    State(st): State<HttpState>,
    _: AdminAuth,
    Body(u): Body<NewUser>,
) -> Result<Response, ApiError> {
    let jid = account(&st.server, &u.jid)?;
    admin::user::add(&ctx(&st.server), jid.as_str(), &u.password)
        .await
        .map_err(command_error)?;
    Ok(json(
        StatusCode::CREATED,
        serde_json::json!({ "jid": jid.to_string() }),
    ))
}

/// `DELETE /api/v1/admin/users/{jid}`: the account, everything it owns, its live sessions.
pub async fn remove_user(
    State(st): State<HttpState>,
    _: AdminAuth,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let jid = account(&st.server, &raw)?;
    admin::user::remove(&ctx(&st.server), jid.as_str())
        .await
        .map_err(command_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPassword {
    password: String,
}

/// `PUT /api/v1/admin/users/{jid}/password`: also ends the account's live sessions.
pub async fn set_password(
    State(st): State<HttpState>,
    _: AdminAuth,
    Path(raw): Path<String>,
    Body(p): Body<NewPassword>,
) -> Result<Response, ApiError> {
    let jid = account(&st.server, &raw)?;
    admin::user::passwd(&ctx(&st.server), jid.as_str(), &p.password)
        .await
        .map_err(command_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn existing(server: &Server, raw: &str) -> Result<BareJid, ApiError> {
    let jid = account(server, raw)?;
    let found = server
        .stores
        .accounts
        .get(&jid)
        .await
        .map_err(|e| ApiError::internal("account lookup for the admin API failed", e))?;
    match found {
        Some(_) => Ok(jid),
        None => Err(ApiError::not_found(
            "no_such_user",
            format!("account {jid} does not exist"),
        )),
    }
}

/// `GET /api/v1/admin/users/{jid}/sessions`: the account's bound resources on this node.
pub async fn sessions(
    State(st): State<HttpState>,
    _: AdminAuth,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let jid = existing(&st.server, &raw).await?;
    let list: Vec<_> = st
        .server
        .sessions
        .resources(&jid)
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "jid": r.jid.to_string(),
                "resource": r.jid.resource().as_str(),
                "available": r.is_available(),
                "priority": r.priority,
                "inactive": r.inactive,
                "hibernating": r.hibernating,
            })
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        serde_json::json!({ "sessions": list }),
    ))
}

/// `DELETE /api/v1/admin/users/{jid}/sessions/{resource}`: ends that session with the stream
/// error `policy-violation`.
pub async fn kick(
    State(st): State<HttpState>,
    _: AdminAuth,
    Path((raw, resource)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let jid = existing(&st.server, &raw).await?;
    let res = halyard_xep::stanza::parse_resource(&resource).map_err(ApiError::invalid)?;
    let full = FullJid::from_parts(jid.node(), jid.domain(), &res);
    let closed = st.server.sessions.close(
        &full,
        StreamError::new(
            StreamErrorKind::PolicyViolation,
            "the session was ended by an administrator",
        ),
    );
    if !closed {
        return Err(ApiError::not_found(
            "no_such_session",
            format!("{full} has no session"),
        ));
    }
    tracing::info!(%full, "session ended through the admin API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/admin/messages`: a message (a headline unless `type` says otherwise) from the
/// server's domain.
pub async fn send_message(
    State(st): State<HttpState>,
    _: AdminAuth,
    Body(m): Body<SendMessage>,
) -> Result<Response, ApiError> {
    let (to, kind) = check_message(&st.server, &m, "headline").await?;
    tracing::info!(%to, kind, "server message through the admin API");
    let from = st.server.domain().to_string();
    Ok(route_message(&st.server, &from, &to, &kind, &m).await)
}

/// `GET /api/v1/admin/stats`.
pub async fn stats(State(st): State<HttpState>, _: AdminAuth) -> Result<Response, ApiError> {
    let server = &st.server;
    let accounts = server
        .stores
        .accounts
        .list()
        .await
        .map_err(|e| ApiError::internal("listing accounts for stats failed", e))?;
    // Kept as counters per account, so this is one read per account.
    let (mut messages, mut bytes) = (0u64, 0u64);
    for a in &accounts {
        let (n, b) = server
            .stores
            .archive
            .size(a)
            .await
            .map_err(|e| ApiError::internal("reading archive sizes for stats failed", e))?;
        messages += n;
        bytes += b;
    }
    let storage = server
        .stores
        .stats
        .size_on_disk()
        .map_err(|e| ApiError::internal("reading the store's size failed", e))?;
    let push = server
        .stores
        .stats
        .push_queue_depth()
        .map_err(|e| ApiError::internal("reading the push queue depth failed", e))?;
    let uptime = server.started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    Ok(json(
        StatusCode::OK,
        serde_json::json!({
            "uptime_secs": uptime,
            "sessions": server.sessions.len(),
            "connections": server.connections.load(std::sync::atomic::Ordering::Relaxed),
            "accounts": accounts.len(),
            "archive_messages": messages,
            "archive_bytes": bytes,
            "storage_bytes": storage,
            "push_queue_depth": push,
        }),
    ))
}
