//! RFC 7395 XMPP over WebSocket at `/xmpp-websocket`, on the HTTP and HTTPS listeners (axum).
//!
//! Framing: subprotocol `xmpp`, one complete element per text message, `<open/>`/`<close/>`
//! instead of the stream tags. The session itself is the same as for TCP (`c2s::run`).

use std::io;
use std::net::SocketAddr;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::SinkExt;

use crate::c2s::{self, Transport, TransportError};
use crate::http::{HttpState, Peer};
use crate::sasl::scram::ChannelBindings;
use crate::stream::reader::{parse_element, Limits};
use crate::stream::{writer, StreamError, StreamErrorKind, StreamEvent};
use halyard_xep::ns;

/// `/xmpp-websocket`.
pub fn routes() -> Router<HttpState> {
    Router::new().route("/xmpp-websocket", get(upgrade))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    State(st): State<HttpState>,
    headers: HeaderMap,
) -> Response {
    let allowed = &st.server.config.http.websocket_origins;
    if !allowed.is_empty() {
        let origin = headers
            .get("origin")
            .and_then(|o| o.to_str().ok())
            .unwrap_or("");
        if !allowed.iter().any(|a| a == origin) {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
    }
    let ws = ws.protocols(["xmpp"]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol 'xmpp' is required (RFC 7395)",
        )
            .into_response();
    }
    let server = st.server.clone();
    let trusted = st.secure || crate::http::is_trusted(&server, peer.ip());
    let limits = crate::listener::limits(&server);
    ws.max_message_size(server.config.c2s.max_stanza_bytes + 1024)
        .on_upgrade(move |socket| async move {
            let t = WsTransport {
                ws: socket,
                peer,
                secure: st.secure,
                auth_allowed: trusted,
                limits,
                bytes_in: 0,
                read_limit: None,
            };
            c2s::run(server, t, None).await
        })
        .into_response()
}

/// Reads one WebSocket text message: `<open/>`, `<close/>` or a stanza; None for a
/// whitespace keepalive.
pub(crate) fn frame(text: &str, limits: Limits) -> Result<Option<StreamEvent>, StreamError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let el = parse_element(text.as_bytes(), limits)?;
    if el.is("open", ns::FRAMING) {
        return Ok(Some(StreamEvent::Open(el)));
    }
    if el.is("close", ns::FRAMING) {
        return Ok(Some(StreamEvent::Close));
    }
    if el.is("stream", ns::STREAM) {
        return Err(StreamError::new(
            StreamErrorKind::InvalidNamespace,
            "WebSocket framing uses <open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
        ));
    }
    Ok(Some(StreamEvent::Element(el)))
}

pub struct WsTransport {
    ws: WebSocket,
    peer: SocketAddr,
    secure: bool,
    auth_allowed: bool,
    limits: Limits,
    bytes_in: u64,
    read_limit: Option<u64>,
}

impl Transport for WsTransport {
    async fn next_event(&mut self) -> Result<Option<StreamEvent>, TransportError> {
        loop {
            let msg = match self.ws.recv().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(TransportError::Io(io::Error::other(e))),
                Some(Ok(m)) => m,
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    return Err(TransportError::Stream(StreamError::new(
                        StreamErrorKind::BadFormat,
                        "RFC 7395 carries XML in text messages only",
                    )))
                }
                Message::Close(_) => return Ok(None),
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            self.bytes_in += text.len() as u64;
            crate::c2s::transport::check_read_limit(self.bytes_in, self.read_limit)?;
            match frame(text.as_str(), self.limits).map_err(TransportError::Stream)? {
                Some(ev) => return Ok(Some(ev)),
                // Whitespace keepalive.
                None => continue,
            }
        }
    }

    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(data).into_owned();
        self.ws
            .feed(Message::Text(text.into()))
            .await
            .map_err(io::Error::other)
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.ws.flush().await.map_err(io::Error::other)
    }

    async fn open(&mut self, id: &str, from: &str, to: Option<&str>) -> io::Result<()> {
        self.ws
            .send(Message::Text(writer::ws_open(id, from, to).into()))
            .await
            .map_err(io::Error::other)
    }

    async fn close(&mut self, err: Option<&StreamError>) {
        if let Some(e) = err {
            let _ = self
                .ws
                .feed(Message::Text(writer::ws_stream_error(e).into()))
                .await;
        }
        let _ = self.ws.feed(Message::Text(writer::ws_close().into())).await;
        let _ = self.ws.close().await;
    }

    fn restart(&mut self) {}

    fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    fn set_read_limit(&mut self, limit: Option<u64>) {
        self.read_limit = limit;
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn is_secure(&self) -> bool {
        self.secure || self.auth_allowed
    }

    fn auth_allowed(&self) -> bool {
        self.auth_allowed
    }

    fn can_starttls(&self) -> bool {
        false
    }

    async fn starttls(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Stream(StreamError::new(
            StreamErrorKind::PolicyViolation,
            "no STARTTLS over WebSocket",
        )))
    }

    fn bindings(&self) -> ChannelBindings {
        // The TLS session (ours or a proxy's) is not visible at this layer: no -PLUS here.
        ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: None,
            tls: self.is_secure(),
        }
    }

    fn idle(&mut self) {}

    fn transport_name(&self) -> &'static str {
        "websocket"
    }
}
