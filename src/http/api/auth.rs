//! Tokens: `POST /api/v1/tokens` exchanges a user's password for a bearer token; admin tokens
//! come from the configuration (`api.admin_tokens`) or from `halyard admin token`. The
//! extractors here ([`UserAuth`], [`AdminAuth`], [`AnyAuth`]) check the `Authorization` header
//! of every other endpoint.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use jid::BareJid;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::{json, ApiError, Body};
use crate::http::{HttpState, Peer};
use crate::sasl::{plain, scram};
use crate::store::tokens::{self, TokenRecord};

/// Rejects every API request with 404 while `api.enabled` is off.
pub struct Enabled;

impl FromRequestParts<HttpState> for Enabled {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        enabled(st).map(|()| Enabled)
    }
}

fn enabled(st: &HttpState) -> Result<(), ApiError> {
    if st.server.config.api.enabled {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "api_disabled",
            "the HTTP API is turned off (api.enabled)",
        ))
    }
}

fn peer_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0 .0.ip())
}

/// Credentials cross plain HTTP only from loopback or a trusted proxy (which terminates TLS).
fn check_transport(st: &HttpState, ip: Option<IpAddr>) -> Result<(), ApiError> {
    if st.secure {
        return Ok(());
    }
    match ip {
        Some(ip) if crate::http::is_trusted(&st.server, ip) => Ok(()),
        _ => Err(ApiError::forbidden(
            "credentials are accepted over HTTPS only (or from http.trusted_proxies)",
        )),
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    User {
        jid: BareJid,
        hash: [u8; 32],
    },
    /// `hash` is `None` for a token from the configuration.
    Admin {
        hash: Option<[u8; 32]>,
    },
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let v = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("send Authorization: Bearer <token>"))?;
    let v = v
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not text"))?;
    match v.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            Ok(t.trim())
        }
        _ => Err(ApiError::unauthorized(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

/// Whether `token` is one of the configured admin tokens. Every entry is compared, in constant
/// time over SHA-256 digests (equal lengths), so timing tells nothing about any of them.
fn is_config_admin(configured: &[String], token: &str) -> bool {
    let presented = tokens::hash(token);
    let mut found = subtle::Choice::from(0);
    for c in configured {
        found |= tokens::hash(c).ct_eq(&presented);
    }
    found.into()
}

async fn authenticate(parts: &Parts, st: &HttpState) -> Result<Principal, ApiError> {
    enabled(st)?;
    check_transport(st, peer_ip(parts))?;
    let token = bearer(parts)?;
    if is_config_admin(&st.server.config.api.admin_tokens, token) {
        return Ok(Principal::Admin { hash: None });
    }
    let hash = tokens::hash(token);
    let rec = st
        .server
        .stores
        .tokens
        .get(&hash)
        .await
        .map_err(|e| ApiError::internal("reading an API token failed", e))?;
    let invalid = || ApiError::unauthorized("the token is unknown, expired or revoked");
    let Some(rec) = rec else {
        return Err(invalid());
    };
    if rec.expires < tokens::now_secs() {
        if let Err(e) = st.server.stores.tokens.remove(&hash).await {
            tracing::warn!(error = %e, "removing an expired API token failed");
        }
        return Err(invalid());
    }
    match rec.owner {
        None => Ok(Principal::Admin { hash: Some(hash) }),
        Some(o) => {
            // Stored by us at login, from an account JID that was checked then.
            let jid = BareJid::new(&o)
                .map_err(|e| ApiError::internal("a stored token names a bad JID", e))?;
            Ok(Principal::User { jid, hash })
        }
    }
}

/// Any valid token.
pub struct AnyAuth(pub Principal);

impl FromRequestParts<HttpState> for AnyAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        authenticate(parts, st).await.map(AnyAuth)
    }
}

/// A user token; an admin token gets 403.
pub struct UserAuth {
    pub jid: BareJid,
}

impl FromRequestParts<HttpState> for UserAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        match authenticate(parts, st).await? {
            Principal::User { jid, .. } => Ok(UserAuth { jid }),
            Principal::Admin { .. } => Err(ApiError::forbidden(
                "this endpoint acts as a user: use a token issued for a user's password",
            )),
        }
    }
}

/// An admin token; a user token gets 403.
pub struct AdminAuth;

impl FromRequestParts<HttpState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &HttpState) -> Result<Self, ApiError> {
        match authenticate(parts, st).await? {
            Principal::Admin { .. } => Ok(AdminAuth),
            Principal::User { .. } => {
                Err(ApiError::forbidden("this endpoint needs an admin token"))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// `user` (on the primary domain) or `user@domain`.
    username: String,
    password: String,
    /// Asks for a shorter lifetime than `api.token_ttl_secs`.
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// The account `username` names: `user` on the primary domain, or `user@domain` on a served one.
fn account_for(st: &HttpState, username: &str) -> Option<BareJid> {
    let jid = if username.contains('@') {
        halyard_xep::stanza::parse_bare_jid(username).ok()?
    } else {
        halyard_xep::stanza::parse_bare_jid(&format!("{username}@{}", st.server.domain())).ok()?
    };
    let served = st
        .server
        .config
        .domains
        .iter()
        .any(|d| d == jid.domain().as_str());
    (jid.node().is_some() && served).then_some(jid)
}

/// Expired tokens are purged at most this often, when a token is issued.
const PURGE_EVERY_SECS: u64 = 600;
static LAST_PURGE: AtomicU64 = AtomicU64::new(0);

/// `POST /api/v1/tokens`: password → token. A wrong password and an unknown user take the same
/// path (an unknown user is checked against SCRAM fake credentials, as in c2s) and get the same
/// answer. Failures count against the client's IP like XMPP logins (`auth.*`); over the limit
/// the answer is 429 with Retry-After, before any password is checked.
pub async fn login(
    _on: Enabled,
    State(st): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Body(req): Body<LoginRequest>,
) -> Result<Response, ApiError> {
    check_transport(&st, Some(peer.0.ip()))?;
    let server = st.server.clone();
    let ip = peer.0.ip();
    if let Some(wait) = server.auth_throttle.retry_after(ip) {
        tracing::info!(%ip, "API login refused: too many failures");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many failed logins from your address: wait and retry",
        );
        e.retry_after = Some(wait.as_secs_f64().ceil() as u64);
        return Err(e);
    }
    let jid = account_for(&st, &req.username);
    let account = match &jid {
        Some(j) => server
            .stores
            .accounts
            .get(j)
            .await
            .map_err(|e| ApiError::internal("account lookup for an API login failed", e))?,
        None => None,
    };
    let hash = scram::Hash::Sha256;
    let stored = match account.as_ref().and_then(|a| a.credentials(hash)) {
        Some(c) => c.clone(),
        None => scram::fake_credentials(
            hash,
            &server.fake_salt_secret,
            &req.username,
            server.config.auth.scram_iterations,
        ),
    };
    // PBKDF2 is CPU work: off the async workers.
    let password = req.password;
    let verified = tokio::task::spawn_blocking(move || plain::verify(hash, &stored, &password))
        .await
        .map_err(|e| ApiError::internal("password check task failed", e))?;
    let jid = match jid {
        Some(j) if verified && account.is_some() => j,
        _ => {
            server
                .metrics
                .auth_failures
                .with_label_values(&["api"])
                .inc();
            // The delay is for XMPP; here the next attempts over the limit get 429.
            let named = jid.as_ref().map(|j| j.to_string());
            let _ = server.auth_throttle.failure(ip, named.as_deref());
            tracing::info!(%ip, "API login failed");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong username or password",
            ));
        }
    };
    let max = server.config.api.token_ttl_secs;
    let ttl = req.ttl_secs.unwrap_or(max).clamp(1, max);
    let (token, rec) = tokens::issue(server.stores.tokens.as_ref(), Some(&jid), ttl)
        .await
        .map_err(|e| ApiError::internal("storing a new API token failed", e))?;
    server.metrics.logins.with_label_values(&["api"]).inc();
    tracing::info!(%jid, %ip, ttl_secs = ttl, "API token issued");
    let now = tokens::now_secs();
    if now.saturating_sub(LAST_PURGE.swap(now, Ordering::Relaxed)) >= PURGE_EVERY_SECS {
        match server.stores.tokens.purge_expired(now).await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "purged expired API tokens"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging expired API tokens failed"),
        }
    }
    Ok(json(
        StatusCode::CREATED,
        serde_json::json!({
            "token": token,
            "token_type": "Bearer",
            "jid": jid.to_string(),
            "expires_at": rec.expires,
            "expires_in": ttl,
        }),
    ))
}

fn describe(p: &Principal, rec: Option<&TokenRecord>) -> serde_json::Value {
    match p {
        Principal::User { jid, .. } => serde_json::json!({
            "kind": "user",
            "jid": jid.to_string(),
            "expires_at": rec.map(|r| r.expires),
        }),
        Principal::Admin { .. } => serde_json::json!({
            "kind": "admin",
            "jid": null,
            "expires_at": rec.map(|r| r.expires),
        }),
    }
}

/// `GET /api/v1/tokens/current`: who the token acts as and until when.
pub async fn current(
    State(st): State<HttpState>,
    AnyAuth(p): AnyAuth,
) -> Result<Response, ApiError> {
    let rec = match &p {
        Principal::User { hash, .. } | Principal::Admin { hash: Some(hash) } => st
            .server
            .stores
            .tokens
            .get(hash)
            .await
            .map_err(|e| ApiError::internal("reading an API token failed", e))?,
        Principal::Admin { hash: None } => None,
    };
    Ok(json(StatusCode::OK, describe(&p, rec.as_ref())))
}

/// `DELETE /api/v1/tokens/current`: revokes the token used for the call.
pub async fn revoke(
    State(st): State<HttpState>,
    AnyAuth(p): AnyAuth,
) -> Result<Response, ApiError> {
    let hash = match p {
        Principal::User { hash, .. } | Principal::Admin { hash: Some(hash) } => hash,
        Principal::Admin { hash: None } => {
            return Err(ApiError::conflict(
                "configured_token",
                "this token comes from api.admin_tokens: remove it from the configuration",
            ))
        }
    };
    st.server
        .stores
        .tokens
        .remove(&hash)
        .await
        .map_err(|e| ApiError::internal("revoking an API token failed", e))?;
    tracing::info!("API token revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_admin_tokens_match_exactly() {
        let configured = vec!["a".repeat(40), "b".repeat(40)];
        assert!(is_config_admin(&configured, &"b".repeat(40)));
        assert!(!is_config_admin(&configured, &"b".repeat(39)));
        assert!(!is_config_admin(&configured, ""));
        assert!(!is_config_admin(&[], &"a".repeat(40)));
    }
}
