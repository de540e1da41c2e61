//! RFC 7395 XMPP over WebSocket: framing, negotiation on the plain HTTP listener from loopback,
//! and chat with a TCP client through the same session code.

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use minidom::Element;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::common::*;

pub(super) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";

pub(super) async fn ws_connect(s: &TestServer) -> Ws {
    let mut req = format!("ws://{}/xmpp-websocket", s.http)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket connects");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("xmpp")
    );
    ws
}

pub(super) async fn recv(ws: &mut Ws) -> Element {
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("message in time")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = msg {
            return t
                .as_str()
                .parse()
                .unwrap_or_else(|e| panic!("each message is one element ({e}): {t}"));
        }
    }
}

pub(super) async fn send(ws: &mut Ws, s: &str) {
    ws.send(Message::Text(s.into())).await.expect("send");
}

pub(super) async fn open(ws: &mut Ws) -> Element {
    send(
        ws,
        &format!("<open xmlns='{FRAMING}' to='localhost' version='1.0'/>"),
    )
    .await;
    let o = recv(ws).await;
    assert!(o.is("open", FRAMING), "server answers <open/>: {}", xml(&o));
    assert_eq!(o.attr("from"), Some("localhost"));
    assert!(o.attr("id").is_some());
    let f = recv(ws).await;
    assert!(f.is("features", NS_STREAM), "{}", xml(&f));
    f
}

/// PLAIN, restart and bind over WebSocket, then initial presence.
pub(super) async fn login(ws: &mut Ws, user: &str, password: &str, resource: &str) {
    open(ws).await;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    send(
        ws,
        &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{b}</auth>"),
    )
    .await;
    assert!(recv(ws).await.is("success", NS_SASL));
    open(ws).await;
    send(ws, &format!("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>")).await;
    assert_eq!(recv(ws).await.attr("type"), Some("result"));
    send(ws, "<presence xmlns='jabber:client'/>").await;
}

#[tokio::test]
async fn websocket_client_logs_in_and_chats_with_tcp_client() {
    let s = TestServer::start().await;
    s.add_user("web", "pw").await;
    s.add_user("tcp", "pw").await;
    let mut tcp = RawClient::login(&s, "tcp", "pw", "desk").await;
    tcp.online().await;

    let mut ws = ws_connect(&s).await;
    let f = open(&mut ws).await;
    let mechs: Vec<String> = f
        .get_child("mechanisms", NS_SASL)
        .expect("SASL allowed from loopback")
        .children()
        .map(|m| m.text())
        .collect();
    assert!(mechs.iter().any(|m| m == "PLAIN"), "{mechs:?}");
    let b = base64::engine::general_purpose::STANDARD.encode("\0web\0pw");
    send(
        &mut ws,
        &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{b}</auth>"),
    )
    .await;
    assert!(recv(&mut ws).await.is("success", NS_SASL));
    let f = open(&mut ws).await;
    assert!(f.get_child("bind", NS_BIND).is_some());
    send(&mut ws, &format!("<iq xmlns='jabber:client' type='set' id='b'><bind xmlns='{NS_BIND}'><resource>browser</resource></bind></iq>")).await;
    let r = recv(&mut ws).await;
    assert_eq!(r.attr("type"), Some("result"));
    send(&mut ws, "<presence xmlns='jabber:client'/>").await;

    // WebSocket -> TCP
    send(&mut ws, "<message xmlns='jabber:client' to='tcp@localhost/desk' type='chat' id='w1'><body>from the browser</body></message>").await;
    let m = tcp.recv_until(|e| e.name() == "message").await;
    assert_eq!(m.attr("from"), Some("web@localhost/browser"));
    assert_eq!(
        m.get_child("body", NS_CLIENT).map(|b| b.text()).as_deref(),
        Some("from the browser")
    );

    // TCP -> WebSocket
    tcp.send("<message to='web@localhost/browser' type='chat' id='t1'><body>from the desk</body></message>").await;
    let m = loop {
        let e = recv(&mut ws).await;
        if e.name() == "message" {
            break e;
        }
    };
    assert_eq!(m.attr("from"), Some("tcp@localhost/desk"));
    assert_eq!(
        m.get_child("body", NS_CLIENT).map(|b| b.text()).as_deref(),
        Some("from the desk")
    );

    // Closing handshake: <close/> is answered with <close/>.
    send(&mut ws, &format!("<close xmlns='{FRAMING}'/>")).await;
    let c = loop {
        let e = recv(&mut ws).await;
        if e.name() == "close" {
            break e;
        }
    };
    assert!(c.is("close", FRAMING));
}

#[tokio::test]
async fn websocket_requires_the_xmpp_subprotocol() {
    let s = TestServer::start().await;
    let req = format!("ws://{}/xmpp-websocket", s.http)
        .into_client_request()
        .expect("request");
    let err = tokio_tungstenite::connect_async(req)
        .await
        .expect_err("refused without 'xmpp'");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn websocket_stream_header_instead_of_open_is_refused() {
    let s = TestServer::start().await;
    let mut ws = ws_connect(&s).await;
    send(&mut ws, &stream_open("localhost")).await;
    // Whatever the server says, it ends with a stream error and the close.
    let mut saw_error = false;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(TIMEOUT, ws.next()).await {
        if let Message::Text(t) = msg {
            if t.as_str().contains("stream:error") || t.as_str().contains("<error") {
                saw_error = true;
            }
        }
        if saw_error {
            break;
        }
    }
    assert!(
        saw_error,
        "a <stream:stream> over WebSocket gets a stream error"
    );
}

#[tokio::test]
async fn websocket_origin_allow_list() {
    let s =
        TestServer::start_with(|c| c.http.websocket_origins = vec!["https://chat.example".into()])
            .await;
    let mut req = format!("ws://{}/xmpp-websocket", s.http)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let mut req = format!("ws://{}/xmpp-websocket", s.http)
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
    req.headers_mut()
        .insert("Origin", "https://chat.example".parse().expect("header"));
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}
