//! The HTTP API under `/api/v1`: bearer tokens, a user's own data, and administration.
//!
//! - [`auth`]: tokens (a password exchanged for a token; admin tokens), the extractors that
//!   check them, and the rate limit on password attempts.
//! - [`user`]: what a user does with their own token (roster, history, messages, push devices).
//! - [`admin`]: what an admin token allows (accounts, sessions, server messages, stats), through
//!   the same handlers as the `halyard` CLI.
//!
//! The OpenAPI document (`openapi.json` beside this file, served at `/api/v1/openapi.json`) is
//! written by hand: it is the contract clients read, reviewed like code, and costs no macro
//! crate. It cannot drift: a unit test checks its paths and methods against [`route_table`],
//! and the end-to-end tests validate every response they get against its schemas.

pub mod admin;
pub mod auth;
pub mod user;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde::de::DeserializeOwned;

use super::HttpState;

/// The OpenAPI 3.1 description of everything below.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest JSON request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// An error answer: `{ "error": "<code>", "message": "<what to do>" }`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub message: String,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(error: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, error, message)
    }
    pub fn conflict(error: &'static str, message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::CONFLICT, error, message)
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
    /// A failure of ours: logged with its context, answered without details.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle the request; it has been logged",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.error, "message": self.message });
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"halyard\""),
            );
        }
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        r
    }
}

/// A JSON answer with a status.
pub fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A JSON request body. Unlike axum's `Json`, its rejections are API errors: 400 for what is
/// not JSON, 422 for JSON of the wrong shape.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<HttpState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &HttpState) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| ApiError::bad_request(format!("reading the body: {e}")))?;
        if bytes.len() > MAX_BODY {
            return Err(ApiError::bad_request(format!(
                "the body is larger than {MAX_BODY} bytes"
            )));
        }
        serde_json::from_slice(&bytes).map(Body).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                ApiError::invalid(format!("the JSON body does not fit: {e}"))
            } else {
                ApiError::bad_request(format!("the body is not JSON: {e}"))
            }
        })
    }
}

/// Builds the router and the list of what it serves from one table, so they cannot disagree.
struct Table {
    router: Router<HttpState>,
    served: Vec<(&'static str, &'static str)>,
}

impl Table {
    fn add<H, T>(mut self, method: &'static str, path: &'static str, h: H) -> Self
    where
        H: axum::handler::Handler<T, HttpState>,
        T: 'static,
    {
        let filter = match method {
            "get" => MethodFilter::GET,
            "post" => MethodFilter::POST,
            "put" => MethodFilter::PUT,
            _ => MethodFilter::DELETE,
        };
        self.router = self.router.route(path, on(filter, h));
        self.served.push((method, path));
        self
    }
}

fn table() -> Table {
    Table {
        router: Router::new(),
        served: Vec::new(),
    }
    .add("get", "/api/v1/openapi.json", openapi)
    .add("post", "/api/v1/tokens", auth::login)
    .add("get", "/api/v1/tokens/current", auth::current)
    .add("delete", "/api/v1/tokens/current", auth::revoke)
    .add("get", "/api/v1/me/roster", user::roster)
    .add("get", "/api/v1/me/history", user::history)
    .add("post", "/api/v1/me/messages", user::send_message)
    .add("post", "/api/v1/me/push-devices", user::register_device)
    .add(
        "delete",
        "/api/v1/me/push-devices/{device_id}",
        user::unregister_device,
    )
    .add("get", "/api/v1/admin/users", admin::list_users)
    .add("post", "/api/v1/admin/users", admin::create_user)
    .add("delete", "/api/v1/admin/users/{jid}", admin::remove_user)
    .add(
        "put",
        "/api/v1/admin/users/{jid}/password",
        admin::set_password,
    )
    .add("get", "/api/v1/admin/users/{jid}/sessions", admin::sessions)
    .add(
        "delete",
        "/api/v1/admin/users/{jid}/sessions/{resource}",
        admin::kick,
    )
    .add("post", "/api/v1/admin/messages", admin::send_message)
    .add("get", "/api/v1/admin/stats", admin::stats)
}

/// The API's routes.
pub fn routes() -> Router<HttpState> {
    // A catch-all under the prefix (not a fallback: merged routers may have only one) answers
    // unknown endpoints in the API's error format.
    table()
        .router
        .route("/api/v1/{*rest}", axum::routing::any(not_found))
}

/// Every `(method, path)` the router serves, paths in OpenAPI/axum template form.
pub fn route_table() -> Vec<(&'static str, &'static str)> {
    table().served
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint: see /api/v1/openapi.json")
}

async fn openapi(_on: auth::Enabled) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn openapi_document_lists_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let served: BTreeSet<_> = route_table()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(served.len(), route_table().len(), "a route is added twice");
        assert_eq!(documented, served);
    }

    #[test]
    fn every_ref_resolves_and_every_operation_documents_errors() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(r) = m.get("$ref").and_then(|r| r.as_str()) {
                        out.push(r.to_string());
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&doc, &mut all);
        for r in all {
            let ptr = r.strip_prefix('#').expect("local refs only");
            assert!(doc.pointer(ptr).is_some(), "{r} does not resolve");
        }
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(
                    op["operationId"].is_string() && op["responses"].is_object(),
                    "{method} {path}"
                );
            }
        }
    }

    #[test]
    fn errors_are_json_with_code_and_message() {
        let r = ApiError::invalid("bad jid").into_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "wait");
        e.retry_after = Some(7);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r = ApiError::unauthorized("no").into_response();
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
    }
}
