//! The browser chat client at `/`: Converse.js, preconfigured for this server's WebSocket
//! endpoint. We serve its files (from `web.client_dir`, installed with npm) and the page that
//! starts it; writing our own client would be a project of its own.

use std::path::Path;

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::services::ServeDir;

use crate::http::HttpState;
use crate::server::Server;

/// `/` and `/converse/...`, when `web.enabled`.
pub fn routes(server: &Server) -> Router<HttpState> {
    let web = &server.config.web;
    if !web.enabled {
        return Router::new();
    }
    let dir = web.client_dir.clone();
    let page = if installed(&dir) {
        Ok(page(server.domain()))
    } else {
        tracing::warn!(dir = %dir.display(), "web client files not found: / explains how to install them");
        Err(missing(&dir))
    };
    Router::new()
        .route("/", get(move || index(page.clone())))
        .nest_service("/converse", ServeDir::new(dir))
}

fn installed(dir: &Path) -> bool {
    dir.join("converse.min.js").is_file() && dir.join("converse.min.css").is_file()
}

async fn index(page: Result<String, String>) -> Response {
    match page {
        Ok(html) => ([(header::CACHE_CONTROL, "no-cache")], Html(html)).into_response(),
        Err(html) => (StatusCode::SERVICE_UNAVAILABLE, Html(html)).into_response(),
    }
}

/// A JavaScript string literal for `s` (JSON is a subset of JavaScript).
fn js_string(s: &str) -> String {
    serde_json::to_string(s)
        .unwrap_or_else(|_| "\"\"".into())
        // Never let the value close the script element.
        .replace("</", "<\\/")
}

fn page(domain: &str) -> String {
    let domain = js_string(domain);
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Halyard</title>
<link rel="stylesheet" href="/converse/converse.min.css">
<script type="module" src="/converse/converse.min.js"></script>
</head>
<body class="converse-fullscreen">
<noscript>This chat client needs JavaScript.</noscript>
<script type="module">
converse.initialize({{
  assets_path: '/converse/',
  // The WebSocket endpoint of whichever listener (or proxy) served this page.
  websocket_url: (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/xmpp-websocket',
  discover_connection_methods: false,
  view_mode: 'fullscreen',
  authentication: 'login',
  locked_domain: {domain},
  default_domain: {domain},
  allow_registration: false,
  // Messages from people not (yet) in the roster open a chat too.
  allow_non_roster_messaging: true,
  auto_reconnect: true,
  message_archiving: 'always',
  show_client_info: false,
}});
</script>
</body>
</html>
"#
    )
}

fn missing(dir: &Path) -> String {
    let dir = dir.display().to_string();
    let dir = dir
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Halyard: web client not installed</title></head>
<body>
<h1>The web client is not installed</h1>
<p>Halyard serves Converse.js from <code>{dir}</code>, which has no <code>converse.min.js</code>.
Install it from the repository's top folder with</p>
<pre>npm ci --prefix web</pre>
<p>(or point <code>web.client_dir</code> in the configuration at a Converse.js <code>dist</code>
folder), then reload this page. XMPP clients can connect meanwhile: WebSocket at
<code>/xmpp-websocket</code>, or TCP on port 5222.</p>
</body></html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_cannot_break_out_of_the_script() {
        assert_eq!(js_string("a</script>b"), "\"a<\\/script>b\"");
        assert!(page("example.org").contains("locked_domain: \"example.org\""));
        assert!(missing(Path::new("<x>")).contains("&lt;x&gt;"));
    }
}
