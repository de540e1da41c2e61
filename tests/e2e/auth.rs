//! Authentication (RFC 6120 §6): SCRAM (RFC 5802/7677, SHA-512 too) with and without channel
//! binding (RFC 9266 tls-exporter, RFC 5929 tls-server-end-point, XEP-0440), PLAIN over TLS,
//! failure conditions, the per-connection failure limit, per-IP throttling, and what is stored.
//!
//! The SCRAM client side is written here from RFC 5802 on the RustCrypto primitives, so the
//! server is checked against an implementation that shares no code with it; the `sasl` crate is
//! a second independent client.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use halyard::stream::{StreamEvent, XmlReader};
use hmac::{Hmac, Mac};
use minidom::Element;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::common::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---------------------------------------------------------------------------------------------
// SCRAM client (RFC 5802 §3, §5), independent of the server's code.

#[derive(Debug, Clone, Copy)]
enum H {
    Sha1,
    Sha256,
    Sha512,
}

macro_rules! digest {
    ($h:expr, $d:ident => $body:expr) => {
        match $h {
            H::Sha1 => {
                type $d = sha1::Sha1;
                $body
            }
            H::Sha256 => {
                type $d = sha2::Sha256;
                $body
            }
            H::Sha512 => {
                type $d = sha2::Sha512;
                $body
            }
        }
    };
}

impl H {
    fn mechanism(self, plus: bool) -> String {
        let base = match self {
            H::Sha1 => "SCRAM-SHA-1",
            H::Sha256 => "SCRAM-SHA-256",
            H::Sha512 => "SCRAM-SHA-512",
        };
        if plus {
            format!("{base}-PLUS")
        } else {
            base.to_string()
        }
    }
    fn h(self, data: &[u8]) -> Vec<u8> {
        digest!(self, D => D::digest(data).to_vec())
    }
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        digest!(self, D => {
            let mut m = <Hmac<D> as Mac>::new_from_slice(key).expect("any key length");
            m.update(data);
            m.finalize().into_bytes().to_vec()
        })
    }
    fn hi(self, password: &[u8], salt: &[u8], i: u32) -> Vec<u8> {
        digest!(self, D => {
            let mut out = vec![0u8; <D as Digest>::output_size()];
            pbkdf2::pbkdf2_hmac::<D>(password, salt, i, &mut out);
            out
        })
    }
}

/// The channel-binding choice of the GS2 header.
#[derive(Debug, Clone)]
enum Cb {
    /// `n,,`: the client does not support channel binding.
    N,
    /// `y,,`: the client supports it but thinks the server does not.
    Y,
    /// `p=<type>,,` with the binding data.
    P(&'static str, Vec<u8>),
}

struct Scram {
    hash: H,
    user: String,
    password: String,
    cb: Cb,
    nonce: String,
    server_signature: Option<Vec<u8>>,
}

/// What the server said in server-first-message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServerFirst {
    nonce: String,
    salt: Vec<u8>,
    iterations: u32,
}

fn parse_server_first(msg: &str) -> ServerFirst {
    let mut nonce = None;
    let mut salt = None;
    let mut iterations = None;
    for a in msg.split(',') {
        match a.split_once('=') {
            Some(("r", v)) => nonce = Some(v.to_owned()),
            Some(("s", v)) => salt = Some(B64.decode(v).expect("salt is base64")),
            Some(("i", v)) => iterations = Some(v.parse().expect("iteration count")),
            _ => {}
        }
    }
    ServerFirst {
        nonce: nonce.unwrap_or_else(|| panic!("r= in {msg}")),
        salt: salt.unwrap_or_else(|| panic!("s= in {msg}")),
        iterations: iterations.unwrap_or_else(|| panic!("i= in {msg}")),
    }
}

impl Scram {
    fn new(hash: H, user: &str, password: &str, cb: Cb) -> Scram {
        let mut raw = [0u8; 18];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
        Scram {
            hash,
            user: user.to_owned(),
            password: password.to_owned(),
            cb,
            nonce: B64.encode(raw),
            server_signature: None,
        }
    }

    fn gs2_header(&self) -> String {
        match &self.cb {
            Cb::N => "n,,".into(),
            Cb::Y => "y,,".into(),
            Cb::P(t, _) => format!("p={t},,"),
        }
    }

    fn client_first_bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    fn client_first(&self) -> String {
        format!("{}{}", self.gs2_header(), self.client_first_bare())
    }

    /// client-final-message for `server_first` (RFC 5802 §3).
    fn client_final(&mut self, server_first: &str) -> String {
        let sf = parse_server_first(server_first);
        assert!(
            sf.nonce.starts_with(&self.nonce) && sf.nonce.len() > self.nonce.len(),
            "the server nonce extends ours: {server_first}"
        );
        let h = self.hash;
        let salted = h.hi(self.password.as_bytes(), &sf.salt, sf.iterations);
        let client_key = h.hmac(&salted, b"Client Key");
        let stored_key = h.h(&client_key);
        let server_key = h.hmac(&salted, b"Server Key");
        let mut cbind = self.gs2_header().into_bytes();
        if let Cb::P(_, data) = &self.cb {
            cbind.extend_from_slice(data);
        }
        let without_proof = format!("c={},r={}", B64.encode(&cbind), sf.nonce);
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare(),
            server_first,
            without_proof
        );
        let client_signature = h.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&client_signature)
            .map(|(a, b)| a ^ b)
            .collect();
        self.server_signature = Some(h.hmac(&server_key, auth_message.as_bytes()));
        format!("{without_proof},p={}", B64.encode(proof))
    }

    /// Checks server-final-message `v=...` against the ServerSignature we computed.
    fn verify_server_final(&self, server_final: &str) {
        let v = server_final
            .strip_prefix("v=")
            .unwrap_or_else(|| panic!("server-final has v=: {server_final}"));
        let got = B64.decode(v).expect("v= is base64");
        assert_eq!(
            Some(&got),
            self.server_signature.as_ref(),
            "the server proves it knows the credentials (ServerSignature)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client of our own that keeps what channel binding needs from its TLS connection.

struct Conn {
    io: Box<dyn Io>,
    reader: XmlReader,
    pending: Vec<u8>,
    /// RFC 9266 tls-exporter, computed on our side of the TLS connection.
    exporter: Option<Vec<u8>>,
    /// RFC 5929 tls-server-end-point: SHA-256 of the server certificate we received (the test
    /// certificate is ECDSA with SHA-256).
    end_point: Option<Vec<u8>>,
}

async fn tls(io: Box<dyn Io>) -> Conn {
    let tls = tokio_rustls::TlsConnector::from(client_tls())
        .connect(
            rustls::pki_types::ServerName::try_from(DOMAIN).expect("name"),
            io,
        )
        .await
        .expect("tls handshake");
    let conn = tls.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3),
        "TLS 1.3"
    );
    let exporter = conn
        .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", None)
        .expect("exporter")
        .to_vec();
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate");
    let end_point = sha2::Sha256::digest(cert.as_ref()).to_vec();
    Conn {
        io: Box::new(tls),
        reader: reader(),
        pending: Vec::new(),
        exporter: Some(exporter),
        end_point: Some(end_point),
    }
}

impl Conn {
    async fn plain(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Conn {
            io: Box::new(tcp),
            reader: reader(),
            pending: Vec::new(),
            exporter: None,
            end_point: None,
        }
    }

    /// STARTTLS on the c2s port; returns the TLS connection with its features read.
    async fn starttls(addr: SocketAddr) -> (Conn, Element) {
        let mut c = Conn::plain(addr).await;
        c.open().await;
        c.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            .await;
        let p = c.recv().await;
        assert!(p.is("proceed", NS_TLS), "{}", xml(&p));
        let mut c = tls(c.io).await;
        let f = c.open().await;
        (c, f)
    }

    /// Direct TLS (XEP-0368); returns the connection with its features read.
    async fn direct_tls(addr: SocketAddr) -> (Conn, Element) {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut c = tls(Box::new(tcp)).await;
        let f = c.open().await;
        (c, f)
    }

    async fn send(&mut self, s: &str) {
        self.io.write_all(s.as_bytes()).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    async fn next_event(&mut self) -> Option<StreamEvent> {
        let mut buf = [0u8; 8192];
        loop {
            if !self.pending.is_empty() {
                let mut input = &self.pending[..];
                let r = self
                    .reader
                    .next(&mut input)
                    .expect("well-formed server XML");
                let consumed = self.pending.len() - input.len();
                self.pending.drain(..consumed);
                if let Some(ev) = r {
                    return Some(ev);
                }
            }
            let n = match tokio::time::timeout(TIMEOUT, self.io.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!("timed out waiting for the server"),
            };
            if n == 0 {
                return None;
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    async fn recv(&mut self) -> Element {
        loop {
            match self.next_event().await {
                Some(StreamEvent::Element(el)) => return el,
                Some(StreamEvent::Open(_)) => continue,
                other => panic!("stream ended while waiting for an element: {other:?}"),
            }
        }
    }

    /// Opens (or restarts) the stream; returns the features.
    async fn open(&mut self) -> Element {
        self.reader = reader();
        self.pending.clear();
        self.send(&stream_open(DOMAIN)).await;
        match self.next_event().await {
            Some(StreamEvent::Open(_)) => {}
            other => panic!("expected a stream header, got {other:?}"),
        }
        let f = self.recv().await;
        assert!(f.is("features", NS_STREAM), "{}", xml(&f));
        f
    }

    async fn expect_stream_error(&mut self) -> String {
        loop {
            match self.next_event().await {
                Some(StreamEvent::Element(el)) if el.is("error", NS_STREAM) => {
                    return el
                        .children()
                        .find(|c| c.ns() == NS_STREAMS && c.name() != "text")
                        .map(|c| c.name().to_string())
                        .expect("a defined condition")
                }
                Some(_) => continue,
                None => panic!("stream ended without a stream error"),
            }
        }
    }

    /// Binds a resource after a successful authentication and checks the session answers.
    async fn bind_and_ping(&mut self, user: &str, resource: &str) {
        let f = self.open().await;
        assert!(f.get_child("bind", NS_BIND).is_some(), "{}", xml(&f));
        self.send(&format!("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
        let r = self.recv().await;
        let jid = r
            .get_child("bind", NS_BIND)
            .and_then(|b| b.get_child("jid", NS_BIND))
            .map(|j| j.text());
        assert_eq!(
            jid.as_deref(),
            Some(format!("{user}@localhost/{resource}").as_str()),
            "{}",
            xml(&r)
        );
        self.send("<iq type='get' to='localhost' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>")
            .await;
        let r = self.recv().await;
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    }

    /// Runs one SCRAM exchange. `Ok(())` on `<success/>` (whose ServerSignature is checked),
    /// `Err(condition)` on `<failure/>`; also returns server-first if one came.
    async fn scram(&mut self, s: &mut Scram) -> (Option<ServerFirst>, Result<(), String>) {
        let mech = s.hash.mechanism(matches!(s.cb, Cb::P(..)));
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mech}'>{}</auth>",
            B64.encode(s.client_first())
        ))
        .await;
        let ch = self.recv().await;
        if ch.is("failure", NS_SASL) {
            return (None, Err(failure_condition(&ch)));
        }
        assert!(ch.is("challenge", NS_SASL), "{}", xml(&ch));
        let server_first =
            String::from_utf8(B64.decode(ch.text().trim()).expect("challenge is base64"))
                .expect("UTF-8");
        let sf = parse_server_first(&server_first);
        let fin = s.client_final(&server_first);
        self.send(&format!(
            "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
            B64.encode(fin)
        ))
        .await;
        let r = self.recv().await;
        if r.is("failure", NS_SASL) {
            return (Some(sf), Err(failure_condition(&r)));
        }
        assert!(r.is("success", NS_SASL), "{}", xml(&r));
        let server_final =
            String::from_utf8(B64.decode(r.text().trim()).expect("success is base64"))
                .expect("UTF-8");
        s.verify_server_final(&server_final);
        (Some(sf), Ok(()))
    }

    /// PLAIN; returns the server's answer.
    async fn plain_auth(&mut self, authzid: &str, user: &str, password: &str) -> Element {
        let b = B64.encode(format!("{authzid}\0{user}\0{password}"));
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b}</auth>"
        ))
        .await;
        self.recv().await
    }
}

fn failure_condition(el: &Element) -> String {
    assert!(el.is("failure", NS_SASL), "{}", xml(el));
    el.children()
        .find(|c| c.ns() == NS_SASL && c.name() != "text")
        .map(|c| c.name().to_string())
        .unwrap_or_else(|| panic!("a defined condition in {}", xml(el)))
}

fn offered(features: &Element) -> Vec<String> {
    features
        .get_child("mechanisms", NS_SASL)
        .map(|m| m.children().map(|c| c.text()).collect())
        .unwrap_or_default()
}

async fn server_with_alice() -> TestServer {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-alice").await;
    s
}

// ---------------------------------------------------------------------------------------------
// SCRAM

#[tokio::test]
async fn scram_sha512_without_channel_binding() {
    let s = server_with_alice().await;
    let (mut c, f) = Conn::starttls(s.c2s).await;
    assert!(offered(&f).iter().any(|m| m == "SCRAM-SHA-512"));
    let mut sc = Scram::new(H::Sha512, "alice", "pw-alice", Cb::N);
    let (sf, r) = c.scram(&mut sc).await;
    assert_eq!(r, Ok(()));
    assert!(sf.expect("server-first").iterations >= 4096);
    c.bind_and_ping("alice", "s512").await;
}

#[tokio::test]
async fn scram_sha512_plus_with_tls_exporter_over_direct_tls() {
    let s = server_with_alice().await;
    let (mut c, f) = Conn::direct_tls(s.c2s_tls).await;
    assert!(offered(&f).iter().any(|m| m == "SCRAM-SHA-512-PLUS"));
    let exporter = c.exporter.clone().expect("exporter");
    let mut sc = Scram::new(
        H::Sha512,
        "alice",
        "pw-alice",
        Cb::P("tls-exporter", exporter),
    );
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
    c.bind_and_ping("alice", "s512plus").await;
}

#[tokio::test]
async fn scram_sha256_plus_with_tls_server_end_point_over_starttls() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let ep = c.end_point.clone().expect("end point");
    let mut sc = Scram::new(
        H::Sha256,
        "alice",
        "pw-alice",
        Cb::P("tls-server-end-point", ep),
    );
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
    c.bind_and_ping("alice", "s256ep").await;
}

#[tokio::test]
async fn scram_sha1_plus_with_tls_exporter() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let exporter = c.exporter.clone().expect("exporter");
    let mut sc = Scram::new(
        H::Sha1,
        "alice",
        "pw-alice",
        Cb::P("tls-exporter", exporter),
    );
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
    c.bind_and_ping("alice", "s1plus").await;
}

#[tokio::test]
async fn scram_plus_with_channel_binding_data_of_another_connection_fails() {
    let s = server_with_alice().await;
    // A man in the middle relays the exchange: the binding data is of *its* TLS connection.
    let (other, _) = Conn::starttls(s.c2s).await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let foreign = other.exporter.clone().expect("exporter");
    assert_ne!(Some(&foreign), c.exporter.as_ref());
    let mut sc = Scram::new(
        H::Sha256,
        "alice",
        "pw-alice",
        Cb::P("tls-exporter", foreign),
    );
    assert_eq!(c.scram(&mut sc).await.1, Err("not-authorized".to_string()));
    // The right data still works on the same connection.
    let own = c.exporter.clone().expect("exporter");
    let mut sc = Scram::new(H::Sha256, "alice", "pw-alice", Cb::P("tls-exporter", own));
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
}

#[tokio::test]
async fn scram_sha256_plus_wrong_password_is_not_online() {
    // tokio-xmpp's own path (SCRAM-SHA-256-PLUS, tls-exporter) with a wrong password, raw:
    // tokio-xmpp itself would reconnect forever.
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let exporter = c.exporter.clone().expect("exporter");
    let mut sc = Scram::new(
        H::Sha256,
        "alice",
        "not-the-password",
        Cb::P("tls-exporter", exporter),
    );
    let (sf, r) = c.scram(&mut sc).await;
    assert!(sf.is_some(), "the exchange runs to the proof");
    assert_eq!(r, Err("not-authorized".to_string()));
    // Not online: binding is refused as a stanza from an unauthenticated stream.
    c.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>x</resource></bind></iq>").await;
    assert_eq!(c.expect_stream_error().await, "not-authorized");
}

#[tokio::test]
async fn scram_y_flag_is_refused_when_the_server_offers_plus() {
    let s = server_with_alice().await;
    let (mut c, f) = Conn::starttls(s.c2s).await;
    assert!(offered(&f).iter().any(|m| m == "SCRAM-SHA-1-PLUS"));
    // `y,,` says "I could bind but you can't": with -PLUS on offer that is a downgrade.
    let mut sc = Scram::new(H::Sha1, "alice", "pw-alice", Cb::Y);
    assert_eq!(c.scram(&mut sc).await.1, Err("not-authorized".to_string()));
    // Same password with n,, works.
    let mut sc = Scram::new(H::Sha1, "alice", "pw-alice", Cb::N);
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
}

async fn plaintext_server_with_alice() -> TestServer {
    let s = TestServer::start_with(|cfg| cfg.c2s.require_tls = false).await;
    s.add_user("alice", "pw-alice").await;
    s
}

#[tokio::test]
async fn scram_y_flag_is_accepted_on_plaintext_without_plus() {
    let s = plaintext_server_with_alice().await;
    let mut c = Conn::plain(s.c2s).await;
    let f = c.open().await;
    assert!(
        !offered(&f).iter().any(|m| m.ends_with("-PLUS")),
        "{}",
        xml(&f)
    );
    let mut sc = Scram::new(H::Sha1, "alice", "pw-alice", Cb::Y);
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
    c.bind_and_ping("alice", "plain-y").await;
}

/// Runs a `sasl` crate mechanism over `c`; `Ok(())` when the server's success verified.
async fn sasl_crate_exchange(
    c: &mut Conn,
    mut m: impl sasl::client::Mechanism,
) -> Result<(), String> {
    let name = m.name().to_owned();
    let initial = m.initial();
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{name}'>{}</auth>",
        B64.encode(initial)
    ))
    .await;
    loop {
        let el = c.recv().await;
        let data = B64.decode(el.text().trim()).expect("base64");
        if el.is("challenge", NS_SASL) {
            let resp = m
                .response(&data)
                .expect("the sasl crate accepts the challenge");
            c.send(&format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(resp)
            ))
            .await;
        } else if el.is("success", NS_SASL) {
            m.success(&data)
                .map_err(|e| format!("server signature rejected: {e:?}"))?;
            return Ok(());
        } else {
            return Err(failure_condition(&el));
        }
    }
}

#[tokio::test]
async fn sasl_crate_scram_sha1_with_y_flag_on_plaintext() {
    use sasl::client::mechanisms::Scram as SaslScram;
    use sasl::client::Mechanism;
    use sasl::common::scram::Sha1;
    use sasl::common::{ChannelBinding, Credentials};
    let s = plaintext_server_with_alice().await;
    let mut c = Conn::plain(s.c2s).await;
    c.open().await;
    let creds = Credentials::default()
        .with_username("alice")
        .with_password("pw-alice")
        .with_channel_binding(ChannelBinding::Unsupported);
    let m = SaslScram::<Sha1>::from_credentials(creds).expect("mechanism");
    assert_eq!(m.name(), "SCRAM-SHA-1");
    assert_eq!(sasl_crate_exchange(&mut c, m).await, Ok(()));
    c.bind_and_ping("alice", "sasl-crate").await;
}

#[tokio::test]
async fn sasl_crate_scram_sha256_plus_with_tls_exporter() {
    use sasl::client::mechanisms::Scram as SaslScram;
    use sasl::client::Mechanism;
    use sasl::common::scram::Sha256;
    use sasl::common::{ChannelBinding, Credentials};
    let s = server_with_alice().await;
    let (mut c, _) = Conn::direct_tls(s.c2s_tls).await;
    let creds = Credentials::default()
        .with_username("alice")
        .with_password("pw-alice")
        .with_channel_binding(ChannelBinding::TlsExporter(
            c.exporter.clone().expect("exporter"),
        ));
    let m = SaslScram::<Sha256>::from_credentials(creds).expect("mechanism");
    assert_eq!(m.name(), "SCRAM-SHA-256-PLUS");
    assert_eq!(sasl_crate_exchange(&mut c, m).await, Ok(()));
    c.bind_and_ping("alice", "sasl-plus").await;
}

#[tokio::test]
async fn unknown_user_looks_like_wrong_password_and_retry_succeeds() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let mut wrong = Scram::new(H::Sha256, "alice", "wrong", Cb::N);
    let (known, r1) = c.scram(&mut wrong).await;
    let known = known.expect("a challenge for a known user");
    assert_eq!(r1, Err("not-authorized".to_string()));

    let mut ghost1 = Scram::new(H::Sha256, "nobody", "whatever", Cb::N);
    let (u1, r2) = c.scram(&mut ghost1).await;
    let u1 = u1.expect("a challenge for an unknown user too");
    assert_eq!(r2, Err("not-authorized".to_string()));

    let mut ghost2 = Scram::new(H::Sha256, "nobody", "whatever", Cb::N);
    let (u2, r3) = c.scram(&mut ghost2).await;
    let u2 = u2.expect("challenge");
    assert_eq!(r3, Err("not-authorized".to_string()));

    assert_eq!(known.iterations, u1.iterations, "same iteration count");
    assert_eq!(known.salt.len(), u1.salt.len(), "salts of the same length");
    assert_eq!(u1.salt, u2.salt, "an unknown user's salt is stable");
    assert_ne!(u1.nonce, u2.nonce, "fresh server nonces");

    // A known user's salt is stable too, and differs from the fake one.
    let mut wrong2 = Scram::new(H::Sha256, "alice", "wrong", Cb::N);
    let (known2, r4) = c.scram(&mut wrong2).await;
    assert_eq!(r4, Err("not-authorized".to_string()));
    assert_eq!(known2.expect("challenge").salt, known.salt);

    // Four failures: the same connection may still succeed.
    let mut right = Scram::new(H::Sha256, "alice", "pw-alice", Cb::N);
    assert_eq!(c.scram(&mut right).await.1, Ok(()));
    c.bind_and_ping("alice", "retry").await;
}

// ---------------------------------------------------------------------------------------------
// PLAIN

#[tokio::test]
async fn plain_over_tls_succeeds_and_wrong_password_is_not_authorized() {
    let s = server_with_alice().await;
    let (mut c, f) = Conn::starttls(s.c2s).await;
    assert!(offered(&f).iter().any(|m| m == "PLAIN"), "{}", xml(&f));
    let r = c.plain_auth("", "alice", "wrong").await;
    assert_eq!(failure_condition(&r), "not-authorized");
    let r = c.plain_auth("", "nobody", "wrong").await;
    assert_eq!(failure_condition(&r), "not-authorized");
    let r = c.plain_auth("", "alice", "pw-alice").await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
    c.bind_and_ping("alice", "plain").await;
}

#[tokio::test]
async fn plain_is_neither_offered_nor_accepted_in_the_clear() {
    let s = plaintext_server_with_alice().await;
    let mut c = Conn::plain(s.c2s).await;
    let f = c.open().await;
    let mechs = offered(&f);
    assert!(!mechs.is_empty(), "SCRAM is offered: {}", xml(&f));
    assert!(!mechs.iter().any(|m| m == "PLAIN"), "{mechs:?}");
    let r = c.plain_auth("", "alice", "pw-alice").await;
    let cond = failure_condition(&r);
    assert!(
        [
            "invalid-mechanism",
            "encryption-required",
            "mechanism-too-weak"
        ]
        .contains(&cond.as_str()),
        "PLAIN in the clear is refused: {}",
        xml(&r)
    );
}

#[tokio::test]
async fn plain_authzid_for_another_user_is_invalid_authzid() {
    let s = server_with_alice().await;
    s.add_user("bob", "pw-bob").await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let r = c.plain_auth("bob@localhost", "alice", "pw-alice").await;
    assert_eq!(failure_condition(&r), "invalid-authzid");
    // Her own JID as authzid is fine.
    let r = c.plain_auth("alice@localhost", "alice", "pw-alice").await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
    c.bind_and_ping("alice", "authz").await;
}

// ---------------------------------------------------------------------------------------------
// Failures, limits, throttling

#[tokio::test]
async fn five_failures_close_the_connection_with_policy_violation() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    for i in 1..=4 {
        let r = c.plain_auth("", "alice", &format!("wrong{i}")).await;
        assert_eq!(failure_condition(&r), "not-authorized", "attempt {i}");
    }
    let b = B64.encode("\0alice\0wrong5");
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b}</auth>"
    ))
    .await;
    assert_eq!(c.expect_stream_error().await, "policy-violation");
    let mut saw_end = false;
    for _ in 0..4 {
        match c.next_event().await {
            Some(StreamEvent::Close) => continue,
            None => {
                saw_end = true;
                break;
            }
            Some(other) => panic!("nothing after the stream error: {other:?}"),
        }
    }
    assert!(saw_end, "the connection is closed");
}

/// One failed PLAIN attempt on a fresh TLS connection; returns how long the answer took.
async fn timed_failure(c: &mut Conn) -> Duration {
    let b = B64.encode("\0alice\0wrong");
    let start = Instant::now();
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b}</auth>"
    ))
    .await;
    let r = c.recv().await;
    let took = start.elapsed();
    assert_eq!(failure_condition(&r), "not-authorized");
    took
}

#[tokio::test]
async fn failures_per_ip_are_throttled_with_a_cap_and_no_lockout() {
    let s = TestServer::start_with(|cfg| {
        cfg.auth.failures_per_minute_per_ip = 2;
        cfg.auth.max_delay_ms = 400;
    })
    .await;
    s.add_user("alice", "pw-alice").await;
    // Three connections from the same address, two failures each (under the per-connection
    // limit): the throttle counts per IP.
    let mut times = Vec::new();
    for _ in 0..3 {
        let (mut c, _) = Conn::starttls(s.c2s).await;
        times.push(timed_failure(&mut c).await);
        times.push(timed_failure(&mut c).await);
    }
    let (t1, t5, t6) = (times[0], times[4], times[5]);
    assert!(
        t5 >= Duration::from_millis(300) && t6 >= Duration::from_millis(300),
        "failures 5 and 6 are delayed: {times:?}"
    );
    assert!(
        t1 + Duration::from_millis(200) < t5,
        "failure 1 is not delayed: {times:?}"
    );
    for (i, t) in times.iter().enumerate() {
        assert!(
            *t < Duration::from_secs(1),
            "failure {} capped: {times:?}",
            i + 1
        );
    }
    // No lockout: the right password still works.
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let r = c.plain_auth("", "alice", "pw-alice").await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
    c.bind_and_ping("alice", "after-throttle").await;
}

#[tokio::test]
async fn unknown_mechanism_is_invalid_mechanism() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'/>")
        .await;
    let r = c.recv().await;
    assert_eq!(failure_condition(&r), "invalid-mechanism");
    let r = c.plain_auth("", "alice", "pw-alice").await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
}

#[tokio::test]
async fn abort_in_the_middle_of_scram_is_aborted() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let sc = Scram::new(H::Sha256, "alice", "pw-alice", Cb::N);
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        B64.encode(sc.client_first())
    ))
    .await;
    let ch = c.recv().await;
    assert!(ch.is("challenge", NS_SASL), "{}", xml(&ch));
    c.send("<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
        .await;
    let r = c.recv().await;
    assert_eq!(failure_condition(&r), "aborted");
    let mut sc = Scram::new(H::Sha256, "alice", "pw-alice", Cb::N);
    assert_eq!(c.scram(&mut sc).await.1, Ok(()));
}

#[tokio::test]
async fn malformed_base64_is_incorrect_encoding() {
    let s = server_with_alice().await;
    let (mut c, _) = Conn::starttls(s.c2s).await;
    c.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>!!not*base64!!</auth>").await;
    let r = c.recv().await;
    assert_eq!(failure_condition(&r), "incorrect-encoding");
    // In the response too.
    let sc = Scram::new(H::Sha256, "alice", "pw-alice", Cb::N);
    c.send(&format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'>{}</auth>",
        B64.encode(sc.client_first())
    ))
    .await;
    let ch = c.recv().await;
    assert!(ch.is("challenge", NS_SASL), "{}", xml(&ch));
    c.send("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>%%%</response>")
        .await;
    let r = c.recv().await;
    assert_eq!(failure_condition(&r), "incorrect-encoding");
}

// ---------------------------------------------------------------------------------------------
// Storage

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn stored_credentials_never_contain_the_password() {
    const PASSWORD: &str = "Sup3rSecret!";
    // Our own folder, so the data outlives the server (TestServer removes its own on drop).
    let keep = tempfile::tempdir().expect("tempdir");
    let data = keep.path().join("data");
    let d = data.clone();
    let s = TestServer::start_with(move |cfg| cfg.data_dir = d).await;
    s.add_user("dora", PASSWORD).await;
    // The account is really stored: dora can log in.
    let (mut c, _) = Conn::starttls(s.c2s).await;
    let r = c.plain_auth("", "dora", PASSWORD).await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
    drop(c);
    s.stop().await;

    let mut files = Vec::new();
    files_under(&data, &mut files);
    assert!(!files.is_empty(), "the store wrote files under {data:?}");
    let total: usize = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len() as usize).unwrap_or(0))
        .sum();
    assert!(total > 0, "the store is not empty");
    let needles: [Vec<u8>; 2] = [
        PASSWORD.as_bytes().to_vec(),
        B64.encode(PASSWORD).into_bytes(),
    ];
    for f in &files {
        let bytes = std::fs::read(f).expect("read store file");
        for n in &needles {
            assert!(
                !bytes.windows(n.len()).any(|w| w == n.as_slice()),
                "{f:?} contains the password ({})",
                String::from_utf8_lossy(n)
            );
        }
    }
}
