//! XEP-0156 connection discovery: `/.well-known/host-meta` (XRD, RFC 6415) and
//! `/.well-known/host-meta.json` (JRD), advertising the WebSocket and BOSH endpoints under the
//! public URL (`http.public_url`, or derived from the HTTPS listener).

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use halyard_xep::stanza::escape as esc;

use crate::http::HttpState;
use crate::server::Server;

pub const REL_WEBSOCKET: &str = "urn:xmpp:alt-connections:websocket";
pub const REL_XBOSH: &str = "urn:xmpp:alt-connections:xbosh";
const NS_XRD: &str = "http://docs.oasis-open.org/ns/xri/xrd-1.0";

/// `/.well-known/host-meta` and `/.well-known/host-meta.json`.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/.well-known/host-meta", get(xrd))
        .route("/.well-known/host-meta.json", get(jrd))
}

/// The advertised connection methods, as (rel, href).
pub fn links(server: &Server) -> Vec<(&'static str, String)> {
    let base = server.public_url().trim_end_matches('/');
    if base.is_empty() {
        return Vec::new();
    }
    // The WebSocket endpoint is on the same host: https -> wss (and http -> ws, which clients
    // are told by XEP-0156 to ignore; it only appears without an HTTPS listener or public URL).
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_string()
    };
    let mut out = vec![(REL_WEBSOCKET, format!("{ws_base}/xmpp-websocket"))];
    if server.config.bosh.enabled {
        out.push((REL_XBOSH, format!("{base}/http-bind")));
    }
    out
}

/// Any web page may read host-meta (XEP-0156 §3.3); these files carry no credentials.
fn headers(content_type: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h
}

async fn xrd(State(st): State<HttpState>) -> Response {
    let mut body = format!("<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='{NS_XRD}'>\n");
    for (rel, href) in links(&st.server) {
        body.push_str(&format!(
            "  <Link rel='{}' href='{}'/>\n",
            esc(rel),
            esc(&href)
        ));
    }
    body.push_str("</XRD>\n");
    (headers("application/xrd+xml; charset=utf-8"), body).into_response()
}

async fn jrd(State(st): State<HttpState>) -> Response {
    let links: Vec<serde_json::Value> = links(&st.server)
        .into_iter()
        .map(|(rel, href)| serde_json::json!({ "rel": rel, "href": href }))
        .collect();
    let body = serde_json::json!({ "links": links }).to_string();
    (headers("application/json"), body).into_response()
}
