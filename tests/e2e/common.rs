//! The harness: a server started in-process on loopback port 0, and clients that talk to it over
//! real sockets (raw XML, and tokio-xmpp where a real client library fits).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use halyard::admin::{self, Request};
use halyard::config::Config;
use halyard::stream::reader::Limits;
use halyard::stream::{StreamEvent, XmlReader};
use minidom::Element;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio_rustls::rustls;

pub const DOMAIN: &str = "localhost";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const NS_CLIENT: &str = "jabber:client";
pub const NS_STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";

/// One certificate for the whole test process, so every client can trust it.
struct TestCert {
    dir: tempfile::TempDir,
    der: Vec<u8>,
}

fn test_cert() -> &'static TestCert {
    static CERT: OnceLock<TestCert> = OnceLock::new();
    CERT.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let ck = rcgen::generate_simple_self_signed(vec![
            DOMAIN.to_string(),
            format!("*.{DOMAIN}"),
            "127.0.0.1".into(),
        ])
        .expect("cert");
        std::fs::write(dir.path().join("localhost.crt"), ck.cert.pem()).expect("write crt");
        std::fs::write(
            dir.path().join("localhost.key"),
            ck.signing_key.serialize_pem(),
        )
        .expect("write key");
        TestCert {
            dir,
            der: ck.cert.der().to_vec(),
        }
    })
}

/// A client TLS configuration that trusts the test certificate only.
pub fn client_tls() -> Arc<rustls::ClientConfig> {
    static CFG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        halyard::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                test_cert().der.clone(),
            ))
            .expect("root");
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    })
    .clone()
}

pub struct TestServer {
    pub c2s: SocketAddr,
    pub c2s_tls: SocketAddr,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub data_dir: PathBuf,
    stop: watch::Sender<bool>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let (mut cfg, dir) = Self::config();
        tweak(&mut cfg);
        Self::start_config(cfg, dir, |s| s).await
    }

    /// A configuration in a fresh folder holding the test certificate, every listener on a free
    /// loopback port.
    fn config() -> (Config, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        for f in ["localhost.crt", "localhost.key"] {
            std::fs::copy(test_cert().dir.path().join(f), certs.join(f)).expect("copy cert");
        }
        let mut cfg = Config {
            data_dir: dir.path().join("data"),
            certs_dir: certs,
            ..Config::default()
        };
        let lo: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        cfg.listeners.c2s = vec![lo];
        cfg.listeners.c2s_tls = vec![lo];
        cfg.listeners.http = vec![lo];
        cfg.listeners.https = vec![lo];
        (cfg, dir)
    }

    /// Starts a server with `cfg`, its stores passed through `wrap` (fault injection).
    async fn start_config(
        cfg: Config,
        dir: tempfile::TempDir,
        wrap: impl FnOnce(halyard::store::Stores) -> halyard::store::Stores + Send + 'static,
    ) -> TestServer {
        let data_dir = cfg.data_dir.clone();
        let (stop, rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let handle = tokio::spawn(halyard::serve_with_stores(cfg, wrap, rx, Some(ready_tx)));
        let bound = match tokio::time::timeout(TIMEOUT, ready_rx).await {
            Ok(Ok(b)) => b,
            _ => {
                let r = handle.await;
                panic!("server did not start: {r:?}");
            }
        };
        let first = |v: &[SocketAddr]| {
            v.first()
                .copied()
                .unwrap_or_else(|| "0.0.0.0:0".parse().expect("addr"))
        };
        TestServer {
            c2s: first(&bound.c2s),
            c2s_tls: first(&bound.c2s_tls),
            http: first(&bound.http),
            https: first(&bound.https),
            data_dir,
            stop,
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Runs an admin command through the running server's socket, as the CLI does.
    pub async fn admin(&self, req: Request) -> admin::Response {
        admin::socket::request(&self.data_dir, &req)
            .await
            .expect("admin socket")
            .expect("server is listening")
    }

    pub async fn add_user(&self, user: &str, password: &str) {
        let r = self
            .admin(Request::UserAdd {
                jid: format!("{user}@{DOMAIN}"),
                password: password.into(),
            })
            .await;
        assert!(r.error.is_none(), "user add failed: {:?}", r.error);
    }

    /// Stops the server (SIGTERM's path) and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.handle.take() {
            let r = tokio::time::timeout(Duration::from_secs(5), h)
                .await
                .expect("server stops within 5 s");
            r.expect("server task").expect("server result");
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a client saw of its TLS connection.
pub struct TlsSeen {
    /// The end-entity certificate (DER) the server presented.
    pub served: Vec<u8>,
    /// RFC 9266 tls-exporter, from the client's side.
    pub exporter: Vec<u8>,
}

/// A raw XML client: writes what a test says, parses what the server sends.
pub struct RawClient {
    io: Box<dyn Io>,
    reader: XmlReader,
    buf: Vec<u8>,
    pending: Vec<u8>,
    pub header: Option<Element>,
    pub features: Option<Element>,
    pub closed: bool,
}

/// A stream reader for clients: limits far above the server's, so a test sees whatever the
/// server sends.
pub fn reader() -> XmlReader {
    XmlReader::new(Limits {
        max_stanza_bytes: 10 * 1024 * 1024,
        max_depth: 100,
        max_attributes: 1000,
        max_attribute_bytes: 1 << 20,
    })
}

pub fn stream_open(to: &str) -> String {
    format!("<?xml version='1.0'?><stream:stream to='{to}' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        RawClient::over(Box::new(tcp))
    }

    pub async fn connect_direct_tls(addr: SocketAddr) -> RawClient {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(
                rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
                tcp,
            )
            .await
            .expect("tls handshake");
        RawClient::over(Box::new(tls))
    }

    /// Connects from the loopback address `src` (e.g. 127.0.0.2), for per-address limits.
    pub async fn connect_from(addr: SocketAddr, src: std::net::IpAddr) -> RawClient {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(src, 0)).expect("bind source");
        let tcp = sock.connect(addr).await.expect("connect");
        RawClient::over(Box::new(tcp))
    }

    /// Direct TLS from the loopback address `src`.
    pub async fn connect_direct_tls_from(addr: SocketAddr, src: std::net::IpAddr) -> RawClient {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(src, 0)).expect("bind source");
        let tcp = sock.connect(addr).await.expect("connect");
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(
                rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
                tcp,
            )
            .await
            .expect("tls handshake");
        RawClient::over(Box::new(tls))
    }

    fn over(io: Box<dyn Io>) -> RawClient {
        RawClient {
            io,
            reader: reader(),
            buf: vec![0; 8192],
            pending: Vec::new(),
            header: None,
            features: None,
            closed: false,
        }
    }

    pub async fn send(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// Sends, ignoring failure (the server may have closed already).
    pub async fn try_send(&mut self, s: &[u8]) -> bool {
        self.io.write_all(s).await.is_ok() && self.io.flush().await.is_ok()
    }

    /// The next stream event, or `None` when the connection ends.
    pub async fn next_event(&mut self) -> Option<StreamEvent> {
        loop {
            if !self.pending.is_empty() {
                let mut input = &self.pending[..];
                let r = self
                    .reader
                    .next(&mut input)
                    .expect("server sent well-formed XML");
                let rest = input.len();
                let consumed = self.pending.len() - rest;
                self.pending.drain(..consumed);
                if let Some(ev) = r {
                    return Some(ev);
                }
            }
            let n = match tokio::time::timeout(TIMEOUT, self.io.read(&mut self.buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("timed out waiting for the server"),
            };
            if n == 0 {
                self.closed = true;
                return None;
            }
            self.pending.extend_from_slice(&self.buf[..n]);
        }
    }

    /// The next first-level element; panics on end of stream.
    pub async fn recv(&mut self) -> Element {
        loop {
            match self.next_event().await {
                Some(StreamEvent::Element(el)) => return el,
                Some(StreamEvent::Open(h)) => self.header = Some(h),
                Some(StreamEvent::Close) | None => {
                    panic!("stream ended while waiting for an element")
                }
            }
        }
    }

    /// Waits for an element matching `pred`, skipping others (e.g. presence noise).
    pub async fn recv_until(&mut self, pred: impl Fn(&Element) -> bool) -> Element {
        loop {
            let el = self.recv().await;
            if pred(&el) {
                return el;
            }
        }
    }

    /// Opens a stream and reads the header and features.
    pub async fn open(&mut self) -> Element {
        self.reader = reader();
        self.send(&stream_open(DOMAIN)).await;
        match self.next_event().await {
            Some(StreamEvent::Open(h)) => self.header = Some(h),
            other => panic!("expected a stream header, got {other:?}"),
        }
        let f = self.recv().await;
        assert!(
            f.is("features", NS_STREAM),
            "expected features, got {}",
            String::from(&f)
        );
        self.features = Some(f.clone());
        f
    }

    /// Sends a stream header and waits for a stream error instead of features; returns the
    /// condition and the text.
    pub async fn open_refused(&mut self) -> (String, String) {
        self.reader = reader();
        self.send(&stream_open(DOMAIN)).await;
        loop {
            match self.next_event().await {
                Some(StreamEvent::Open(h)) => self.header = Some(h),
                Some(StreamEvent::Element(el)) if el.is("error", NS_STREAM) => {
                    let cond = el
                        .children()
                        .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
                        .map(|c| c.name().to_string())
                        .expect("a defined condition");
                    let text = el
                        .get_child("text", NS_STREAMS)
                        .map(|t| t.text())
                        .unwrap_or_default();
                    assert!(self.header.is_some(), "a stream header before the error");
                    return (cond, text);
                }
                other => panic!("expected a stream error, got {other:?}"),
            }
        }
    }

    /// Waits for a stream error and the end of the stream; returns the condition.
    pub async fn expect_stream_error(&mut self) -> String {
        loop {
            match self.next_event().await {
                Some(StreamEvent::Element(el)) if el.is("error", NS_STREAM) => {
                    let cond = el
                        .children()
                        .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
                        .map(|c| c.name().to_string())
                        .expect("a defined condition");
                    return cond;
                }
                Some(StreamEvent::Open(h)) => self.header = Some(h),
                Some(StreamEvent::Element(_)) => continue,
                Some(StreamEvent::Close) | None => panic!("stream ended without a stream error"),
            }
        }
    }

    /// STARTTLS on a plain connection that has just received features.
    pub async fn starttls(self) -> RawClient {
        self.starttls_trusting(client_tls()).await.0
    }

    /// STARTTLS trusting `tls`'s roots; also returns what the client saw of the connection.
    pub async fn starttls_trusting(
        mut self,
        tls: Arc<rustls::ClientConfig>,
    ) -> (RawClient, TlsSeen) {
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        let p = self.recv().await;
        assert!(
            p.is("proceed", NS_TLS),
            "expected proceed, got {}",
            String::from(&p)
        );
        // Box<dyn Io> cannot be unwrapped back to TcpStream; keep a generic TLS layer over it.
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(tls).connect(
                rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
                self.io,
            ),
        )
        .await
        .expect("handshake in time")
        .expect("tls handshake");
        let conn = tls.get_ref().1;
        let seen = TlsSeen {
            served: conn.peer_certificates().expect("server certificate")[0].to_vec(),
            exporter: conn
                .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
                .expect("exporter")
                .to_vec(),
        };
        (RawClient::over(Box::new(tls)), seen)
    }

    /// PLAIN authentication; returns the server's answer element.
    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Element {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b}</auth>"
        ))
        .await;
        self.recv().await
    }

    pub async fn bind(&mut self, resource: &str) -> String {
        self.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>"
        ))
        .await;
        let r = self.recv().await;
        assert_eq!(
            r.attr("type"),
            Some("result"),
            "bind failed: {}",
            String::from(&r)
        );
        r.get_child("bind", NS_BIND)
            .and_then(|b| b.get_child("jid", NS_BIND))
            .map(|j| j.text())
            .expect("bound jid")
    }

    /// STARTTLS, PLAIN, bind: a logged-in session (no presence sent).
    pub async fn login(
        server: &TestServer,
        user: &str,
        password: &str,
        resource: &str,
    ) -> RawClient {
        let mut c = RawClient::connect(server.c2s).await;
        c.open().await;
        let mut c = c.starttls().await;
        c.open().await;
        let r = c.auth_plain(user, password).await;
        assert!(
            r.is("success", NS_SASL),
            "auth failed: {}",
            String::from(&r)
        );
        c.open().await;
        c.bind(resource).await;
        c
    }

    /// Sends initial presence and consumes the echo of it.
    pub async fn online(&mut self) {
        self.send("<presence/>").await;
    }

    /// Reads with a short timeout; `None` if nothing arrives (or the stream ends).
    pub async fn recv_quiet(&mut self, wait: Duration) -> Option<Element> {
        tokio::time::timeout(wait, async {
            loop {
                match self.next_event().await {
                    Some(StreamEvent::Element(el)) => return Some(el),
                    Some(StreamEvent::Open(h)) => self.header = Some(h),
                    Some(StreamEvent::Close) | None => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}

pub fn xml(el: &Element) -> String {
    String::from(el)
}

/// The stanza error condition in an error stanza.
pub fn stanza_error(el: &Element) -> Option<String> {
    el.get_child("error", NS_CLIENT)?
        .children()
        .find(|c| c.ns() == NS_STANZAS && c.name() != "text")
        .map(|c| c.name().to_string())
}

/// How long a test listens to conclude that nothing more arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// The text of a message's `<body/>`.
pub fn body(e: &Element) -> Option<String> {
    e.get_child("body", NS_CLIENT).map(|b| b.text())
}

/// Every non-presence element that arrives within `wait` (presence is skipped: other resources
/// coming online broadcast it).
pub async fn non_presence_within(c: &mut RawClient, wait: Duration) -> Vec<Element> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return got;
        }
        match c.recv_quiet(left).await {
            Some(e) if e.name() != "presence" => got.push(e),
            Some(_) => {}
            None => return got,
        }
    }
}

/// Asserts that nothing but presence arrives within [`QUIET`].
pub async fn assert_nothing(c: &mut RawClient, what: &str) {
    let got = non_presence_within(c, QUIET).await;
    assert!(
        got.is_empty(),
        "{what}: expected nothing, got {:?}",
        got.iter().map(xml).collect::<Vec<_>>()
    );
}

impl TestServer {
    /// [`TestServer::start`] with stores whose writes and flushes fail while `switch` is on
    /// (`halyard::store::faults`).
    pub async fn start_faulty(switch: halyard::store::faults::FaultSwitch) -> TestServer {
        let (mut cfg, dir) = Self::config();
        cfg.listeners.c2s_tls.clear();
        cfg.listeners.http.clear();
        cfg.listeners.https.clear();
        let window = cfg.group_commit();
        Self::start_config(cfg, dir, move |s| s.with_faults(switch, window)).await
    }
}
