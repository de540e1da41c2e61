//! Secrets, against the real binary: certificates reloaded on SIGHUP (and `halyard reload-certs`)
//! without dropping sessions and never replaced by broken files, private files kept private, and
//! no password, SASL payload, token or message body in the log at any level.

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use minidom::Element;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::cli::{login_at, parse_listening, Env, Serving};
use super::client::{self, Mode};
use super::common::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const NS_SASL_CB: &str = "urn:xmpp:sasl-cb:0";

// ---------------------------------------------------------------------------------------------
// A raw client that trusts the certificates it is given and keeps the one it was served.

/// A raw client that also keeps the certificate it was served and its tls-exporter value.
struct Conn {
    c: RawClient,
    /// The end-entity certificate (DER) the server presented.
    served: Vec<u8>,
    /// RFC 9266 tls-exporter, from our side of the connection.
    exporter: Vec<u8>,
}

impl std::ops::Deref for Conn {
    type Target = RawClient;
    fn deref(&self) -> &RawClient {
        &self.c
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut RawClient {
        &mut self.c
    }
}

fn trusting(ders: &[&[u8]]) -> std::sync::Arc<rustls::ClientConfig> {
    halyard::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for d in ders {
        roots
            .add(rustls::pki_types::CertificateDer::from(d.to_vec()))
            .expect("root");
    }
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Conn {
    /// STARTTLS to `addr` trusting `ders`; returns the connection and its post-TLS features.
    async fn starttls(addr: SocketAddr, ders: &[&[u8]]) -> (Conn, Element) {
        let mut c = RawClient::connect(addr).await;
        c.open().await;
        let (mut c, seen) = c.starttls_trusting(trusting(ders)).await;
        let f = c.open().await;
        let c = Conn {
            c,
            served: seen.served,
            exporter: seen.exporter,
        };
        (c, f)
    }

    /// PLAIN with `payload` already encoded; the server's answer.
    async fn plain(&mut self, payload: &str) -> Element {
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
        ))
        .await;
        self.recv().await
    }

    /// SCRAM-SHA-256-PLUS with tls-exporter, through the `sasl` crate; `Ok` on a verified
    /// success.
    async fn scram_plus(&mut self, user: &str, password: &str) -> Result<(), String> {
        use sasl::client::mechanisms::Scram;
        use sasl::client::Mechanism;
        use sasl::common::scram::Sha256;
        use sasl::common::{ChannelBinding, Credentials};
        let creds = Credentials::default()
            .with_username(user)
            .with_password(password)
            .with_channel_binding(ChannelBinding::TlsExporter(self.exporter.clone()));
        let mut m = Scram::<Sha256>::from_credentials(creds).expect("mechanism");
        let name = m.name().to_owned();
        assert_eq!(name, "SCRAM-SHA-256-PLUS");
        let initial = m.initial();
        self.send(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{name}'>{}</auth>",
            B64.encode(initial)
        ))
        .await;
        loop {
            let el = self.recv().await;
            let data = B64.decode(el.text().trim()).expect("base64");
            if el.is("challenge", NS_SASL) {
                let resp = m.response(&data).expect("challenge accepted");
                self.send(&format!(
                    "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                    B64.encode(resp)
                ))
                .await;
            } else if el.is("success", NS_SASL) {
                return m
                    .success(&data)
                    .map_err(|e| format!("server signature rejected: {e:?}"));
            } else {
                return Err(xml(&el));
            }
        }
    }

    /// After a successful authentication: restart, bind `resource`, and check a ping.
    async fn bind(&mut self, resource: &str) {
        self.open().await;
        self.send(&format!("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
        let r = self.recv().await;
        assert_eq!(r.attr("type"), Some("result"), "bind: {}", xml(&r));
        self.ping("bound").await;
    }

    async fn ping(&mut self, id: &str) {
        self.send(&format!(
            "<iq type='get' to='localhost' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ))
        .await;
        let r = self.recv_until(|e| e.attr("id") == Some(id)).await;
        assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
    }
}

fn binding_types(features: &Element) -> Vec<String> {
    features
        .get_child("sasl-channel-binding", NS_SASL_CB)
        .map(|b| {
            b.children()
                .filter_map(|c| c.attr("type").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Certificates on disk and signals.

fn der_of(crt: &Path) -> Vec<u8> {
    let pem = std::fs::read(crt).expect("read certificate");
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("a certificate")
        .expect("PEM");
    der.to_vec()
}

/// A new self-signed pair for localhost, as PEM (certificate, key), and the certificate's DER.
fn new_pair() -> (String, String, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![
        DOMAIN.to_string(),
        format!("*.{DOMAIN}"),
        "127.0.0.1".into(),
    ])
    .expect("cert");
    (
        ck.cert.pem(),
        ck.signing_key.serialize_pem(),
        ck.cert.der().to_vec(),
    )
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Waits for a log line containing `needle`; every line read goes to `seen`.
fn wait_for_line(serving: &Serving, needle: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for l in serving.drain_log() {
            let hit = l.contains(needle);
            seen.push(l.clone());
            if hit {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?}; log so far:\n{}",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Proves a logged-in raw session is alive: its ping is answered.
async fn assert_alive(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let r = c.recv_until(|e| e.attr("id") == Some(id)).await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

// ---------------------------------------------------------------------------------------------
// Certificate reload

#[tokio::test]
async fn sighup_serves_a_new_certificate_and_keeps_sessions() {
    let env = Env::with_test_cert().await;
    let certs = env.path().join("certs");
    let old = der_of(&certs.join("localhost.crt"));
    let serving = env.serve();
    env.run(&["user", "add", "alice@localhost", "--password", "pw-a"])
        .ok("user add alice");
    env.run(&["user", "add", "bob@localhost", "--password", "pw-b"])
        .ok("user add bob");
    // Sessions on the old certificate (the harness's client trusts that one only).
    let mut alice = login_at(serving.c2s, "alice", "pw-a", "old").await;
    let mut bob = login_at(serving.c2s, "bob", "pw-b", "old").await;
    assert_alive(&mut alice, "before").await;

    let (crt, key, new) = new_pair();
    assert_ne!(new, old);
    std::fs::write(certs.join("localhost.key"), key).expect("write key");
    std::fs::write(certs.join("localhost.crt"), crt).expect("write crt");
    let mut log = Vec::new();
    signal(serving.pid(), "HUP");
    let line = wait_for_line(&serving, "TLS certificates reloaded", &mut log);
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("localhost"), "says what changed: {line}");

    // The sessions from before are untouched: they ping and chat.
    assert_alive(&mut alice, "after").await;
    alice
        .send(
            "<message to='bob@localhost/old' type='chat' id='m1'><body>still here</body></message>",
        )
        .await;
    let m = bob.recv_until(|e| e.name() == "message").await;
    assert_eq!(body(&m).as_deref(), Some("still here"), "{}", xml(&m));
    assert_alive(&mut bob, "bob-after").await;

    // A new connection is served the new certificate, and logs in with SCRAM-PLUS on it.
    let (mut c, f) = Conn::starttls(serving.c2s, &[&old, &new]).await;
    assert_eq!(c.served, new, "the new certificate is served after SIGHUP");
    // Just after a replacement the server cannot tell which certificate a handshake in flight
    // was given, so it offers tls-exporter only.
    assert_eq!(binding_types(&f), ["tls-exporter"], "{}", xml(&f));
    assert_eq!(c.scram_plus("alice", "pw-a").await, Ok(()));
    c.bind("new").await;
    assert_alive(&mut alice, "end").await;
    drop(serving);
}

#[tokio::test]
async fn broken_certificate_files_on_reload_keep_the_old_certificate_and_the_process() {
    let env = Env::with_test_cert().await;
    let certs = env.path().join("certs");
    let (crt_path, key_path) = (certs.join("localhost.crt"), certs.join("localhost.key"));
    let old = der_of(&crt_path);
    let old_key = std::fs::read(&key_path).expect("key");
    let mut serving = env.serve();
    env.run(&["user", "add", "alice@localhost", "--password", "pw-a"])
        .ok("user add alice");
    let mut alice = login_at(serving.c2s, "alice", "pw-a", "old").await;
    let mut log = Vec::new();
    let (crt, key, new) = new_pair();

    // A key caught halfway through being written, with its new certificate.
    std::fs::write(&crt_path, &crt).expect("write crt");
    std::fs::write(&key_path, &key.as_bytes()[..key.len() / 2]).expect("write half a key");
    signal(serving.pid(), "HUP");
    let line = wait_for_line(&serving, "NOT reloaded", &mut log);
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains(&key_path.display().to_string()),
        "names the file: {line}"
    );
    assert!(
        serving.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    let (mut c, _) = Conn::starttls(serving.c2s, &[&old, &new]).await;
    assert_eq!(c.served, old, "the old certificate is still served");
    assert_eq!(c.scram_plus("alice", "pw-a").await, Ok(()));
    c.bind("during").await;
    assert_alive(&mut alice, "after-half-key").await;

    // Garbage in the key file, through the CLI this time: refused, saying which file.
    std::fs::write(&key_path, b"-----BEGIN PRIVATE KEY-----\n%%%\n").expect("write");
    let err = env
        .run(&["reload-certs"])
        .fails("reload-certs with a corrupt key")
        .to_string();
    assert!(err.contains(&key_path.display().to_string()), "{err}");
    // The new certificate with the old key: a pair that does not belong together.
    std::fs::write(&key_path, &old_key).expect("write");
    let err = env
        .run(&["reload-certs"])
        .fails("reload-certs with a mismatched pair")
        .to_string();
    assert!(err.contains("does not hold the private key"), "{err}");
    let (c, _) = Conn::starttls(serving.c2s, &[&old, &new]).await;
    assert_eq!(c.served, old, "the old certificate is still served");

    // Whole files: the reload goes through.
    std::fs::write(&key_path, &key).expect("write");
    let out = env.run(&["reload-certs"]);
    out.ok("reload-certs with a good pair");
    assert!(out.stdout.contains("changed: localhost"), "{}", out.stdout);
    let (c, _) = Conn::starttls(serving.c2s, &[&old, &new]).await;
    assert_eq!(c.served, new, "the new certificate is served");
    assert_alive(&mut alice, "end").await;
    assert!(serving.child.try_wait().expect("try_wait").is_none());
    drop(serving);
}

/// The certificate a TLS handshake on `addr` (Direct TLS or HTTPS) is served.
async fn served_on(addr: SocketAddr, ders: &[&[u8]]) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).expect("name");
    let tls = tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(trusting(ders)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake");
    let der = tls.get_ref().1.peer_certificates().expect("certificate")[0].to_vec();
    der
}

/// An in-process server reloads through its admin socket (what `halyard reload-certs` sends),
/// and every TLS listener shares the reloaded certificates: STARTTLS, Direct TLS and HTTPS.
#[tokio::test]
async fn a_reload_reaches_direct_tls_and_https_too() {
    let s = TestServer::start().await;
    s.add_user("alice", "pw-a").await;
    let certs = s.data_dir().parent().expect("server folder").join("certs");
    let old = der_of(&certs.join("localhost.crt"));
    let mut alice = RawClient::login(&s, "alice", "pw-a", "old").await;
    assert_eq!(served_on(s.c2s_tls, &[&old]).await, old);
    assert_eq!(served_on(s.https, &[&old]).await, old);

    let (crt, key, new) = new_pair();
    std::fs::write(certs.join("localhost.key"), key).expect("write key");
    std::fs::write(certs.join("localhost.crt"), crt).expect("write crt");
    let r = s.admin(halyard::admin::Request::ReloadCerts).await;
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.lines, ["certificates reloaded; changed: localhost"]);

    assert_eq!(served_on(s.c2s_tls, &[&old, &new]).await, new);
    assert_eq!(served_on(s.https, &[&old, &new]).await, new);
    let (c, _) = Conn::starttls(s.c2s, &[&old, &new]).await;
    assert_eq!(c.served, new);
    assert_alive(&mut alice, "after").await;

    // Nothing changed on disk: nothing changes.
    let r = s.admin(halyard::admin::Request::ReloadCerts).await;
    assert_eq!(r.lines, ["certificates reloaded (none changed)"]);
    s.stop().await;
}

// ---------------------------------------------------------------------------------------------
// File modes

/// What `serve` creates that others must not read: the admin socket, the generated TLS key, the
/// upload signing key, and the data directory around the store (password verifiers, token
/// hashes, archives). The export file's mode is checked in `portability`.
#[tokio::test]
async fn the_admin_socket_keys_and_data_dir_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::bare();
    let serving = env.serve();
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let sock = env.data().join("admin.sock");
    assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    let key = env.path().join("certs").join("localhost.key");
    assert_eq!(mode(&key), 0o600, "{}", key.display());
    let upload_key = env.data().join("upload.key");
    assert_eq!(mode(&upload_key), 0o600, "{}", upload_key.display());
    assert_eq!(mode(&env.data()), 0o700, "{}", env.data().display());
    drop(serving);
}

// ---------------------------------------------------------------------------------------------
// Logs

/// `halyard --log trace serve` with stdout and stderr going to `log`; killed when dropped.
struct Logged {
    child: Child,
    c2s: SocketAddr,
    http: SocketAddr,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first address after `key` in the `listening ...` line.
fn listening_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect::<String>()
        .parse()
        .ok()
}

fn serve_logged(env: &Env, log: &Path) -> Logged {
    let out = File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = env.cmd(&[
        "--log",
        "trace",
        "serve",
        "--c2s",
        "127.0.0.1:0",
        "--c2s-tls",
        "none",
        "--http",
        "127.0.0.1:0",
        "--https",
        "none",
    ]);
    cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err));
    let child = cmd.spawn().expect("spawn halyard serve");
    let mut logged = Logged {
        child,
        c2s: "0.0.0.0:0".parse().expect("addr"),
        http: "0.0.0.0:0".parse().expect("addr"),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("listening c2s=")) {
            logged.c2s = parse_listening(line).expect("c2s address");
            logged.http = listening_addr(line, " http=").expect("http address");
            return logged;
        }
        assert!(
            logged.child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline,
            "no `listening` line; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn no_password_token_or_message_body_in_a_trace_log() {
    use serde_json::json;
    const PW_ALICE: &str = "Alice-Secret-7f3a9c";
    const PW_BOB: &str = "Bob-Secret-2e8d41";
    const PW_CAROL: &str = "Carol-Secret-91b7e0";
    const PW_DAVE: &str = "Dave-Secret-c55e02";
    const WRONG: &str = "Wrong-Guess-5c0f77";
    const CHAT: &str = "chat-body-3d9e1b77";
    const OFFLINE: &str = "offline-body-a4c2f810";
    const BAD_PLAIN: &str = "Bad-Plain-Secret-0d4e66";
    const PREAUTH: &str = "preauth-body-77ab3e";
    const MALFORMED: &str = "malformed-body-e1f092";

    let env = Env::with_test_cert().await;
    let cert = der_of(&env.path().join("certs").join("localhost.crt"));
    let log = env.path().join("halyard.log");
    let mut serving = serve_logged(&env, &log);

    // Accounts through the CLI (over the admin socket): password as an argument and on stdin.
    env.run(&["user", "add", "alice@localhost", "--password", PW_ALICE])
        .ok("user add alice");
    env.run_stdin(&["user", "add", "bob@localhost"], &format!("{PW_BOB}\n"))
        .ok("user add bob");
    env.run(&["user", "add", "carol@localhost", "--password", PW_CAROL])
        .ok("user add carol");
    let admin_token = env.run(&["admin", "token", "--ttl", "1h"]);
    admin_token.ok("admin token");
    let admin_token = admin_token.stdout.lines().next().unwrap_or("").to_string();
    assert!(!admin_token.is_empty());

    // alice: PLAIN over STARTTLS.
    let plain_alice = B64.encode(format!("\0alice\0{PW_ALICE}"));
    let (mut alice, _) = Conn::starttls(serving.c2s, &[&cert]).await;
    let r = alice.plain(&plain_alice).await;
    assert!(r.is("success", NS_SASL), "{}", xml(&r));
    alice.bind("a").await;
    alice.send("<presence/>").await;
    // bob: SCRAM-SHA-256-PLUS.
    let (mut bob, _) = Conn::starttls(serving.c2s, &[&cert]).await;
    assert_eq!(bob.scram_plus("bob", PW_BOB).await, Ok(()));
    bob.bind("b").await;
    bob.send("<presence/>").await;

    // A roster item, a chat message, a message for offline carol.
    alice
        .send("<iq type='set' id='r1'><query xmlns='jabber:iq:roster'><item jid='bob@localhost' name='Bob'/></query></iq>")
        .await;
    alice.recv_until(|e| e.attr("id") == Some("r1")).await;
    alice
        .send(&format!(
            "<message to='bob@localhost/b' type='chat' id='m1'><body>{CHAT}</body></message>"
        ))
        .await;
    let m = bob
        .recv_until(|e| e.name() == "message" && body(e).is_some())
        .await;
    assert_eq!(body(&m).as_deref(), Some(CHAT));
    alice
        .send(&format!(
            "<message to='carol@localhost' type='chat' id='m2'><body>{OFFLINE}</body></message>"
        ))
        .await;
    // Once the offline message is stored, carol (tokio-xmpp, SCRAM) comes online and gets it.
    alice.ping("after-offline").await;
    let (mut carol, _) =
        client::online(serving.c2s, Mode::StartTls, "carol@localhost/c", PW_CAROL).await;
    carol
        .send_stanza(client::stanza("<presence xmlns='jabber:client'/>"))
        .await
        .expect("presence");
    loop {
        let s = client::next_stanza(&mut carol).await;
        if body(&s).as_deref() == Some(OFFLINE) {
            break;
        }
    }

    // alice's archive (XEP-0313) holds both messages.
    alice
        .send("<iq type='set' id='mam'><query xmlns='urn:xmpp:mam:2' queryid='q'/></iq>")
        .await;
    let mut archived = 0;
    loop {
        let e = alice.recv().await;
        if e.attr("id") == Some("mam") {
            assert_eq!(e.attr("type"), Some("result"), "{}", xml(&e));
            break;
        }
        if e.name() == "message" && String::from(&e).contains(CHAT) {
            archived += 1;
        }
    }
    assert_eq!(archived, 1, "the chat message is in alice's archive");

    // Failed logins, PLAIN and SCRAM, with a wrong password.
    let plain_wrong = B64.encode(format!("\0alice\0{WRONG}"));
    let (mut c, _) = Conn::starttls(serving.c2s, &[&cert]).await;
    let r = c.plain(&plain_wrong).await;
    assert!(r.is("failure", NS_SASL), "{}", xml(&r));
    assert!(c.scram_plus("bob", WRONG).await.is_err());

    // Malformed input carrying secrets: PLAIN that is not base64, a payload that does not
    // decode to three fields, a message before authentication, and XML that breaks mid-body.
    let (mut c2, _) = Conn::starttls(serving.c2s, &[&cert]).await;
    let r = c2.plain(&format!("%{BAD_PLAIN}%")).await;
    assert!(r.is("failure", NS_SASL), "{}", xml(&r));
    let r = c2.plain(&B64.encode(format!("alice-{BAD_PLAIN}"))).await;
    assert!(r.is("failure", NS_SASL), "{}", xml(&r));
    c2.send(&format!(
        "<message to='bob@localhost' type='chat'><body>{PREAUTH}</body></message>"
    ))
    .await;
    while c2.next_event().await.is_some() {}
    let (mut c3, _) = Conn::starttls(serving.c2s, &[&cert]).await;
    assert!(c3.plain(&plain_alice).await.is("success", NS_SASL));
    c3.bind("broken").await;
    c3.send(&format!(
        "<message to='bob@localhost/b' type='chat'><body>{MALFORMED}</bod></message>"
    ))
    .await;
    while c3.next_event().await.is_some() {}

    // The HTTP API: a user token from a password, a failed attempt, the CLI's admin token, and
    // an account created with a password through it.
    let r = super::api::call(
        serving.http,
        "POST",
        "/api/v1/tokens",
        None,
        Some(json!({ "username": "alice", "password": PW_ALICE })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let token = r.json()["token"].as_str().expect("token").to_string();
    let r = super::api::call(serving.http, "GET", "/api/v1/me/roster", Some(&token), None).await;
    assert_eq!(r.status, 200);
    let r = super::api::call(
        serving.http,
        "POST",
        "/api/v1/tokens",
        None,
        Some(json!({ "username": "alice", "password": WRONG })),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = super::api::call(
        serving.http,
        "POST",
        "/api/v1/admin/users",
        Some(&admin_token),
        Some(json!({ "jid": "dave@localhost", "password": PW_DAVE })),
    )
    .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = super::api::call(
        serving.http,
        "GET",
        "/api/v1/admin/stats",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "a user token is not an admin token");

    // Stop the server the way an operator does, so everything it logs is in the file.
    drop((alice, bob, c, carol));
    signal(serving.child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while serving.child.try_wait().expect("try_wait").is_none() {
        assert!(Instant::now() < deadline, "halyard stops after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).expect("read log");

    // The log is the real thing: low levels were on, and it saw the scenario.
    for expected in [
        "listening c2s=",
        " DEBUG ",
        "roster: item set",
        "offline: message stored",
        "alice@localhost",
        "stopped",
    ] {
        assert!(
            text.contains(expected),
            "the log has {expected:?}; log:\n{text}"
        );
    }
    for (what, secret) in [
        ("alice's password", PW_ALICE),
        ("bob's password", PW_BOB),
        ("carol's password", PW_CAROL),
        ("dave's password", PW_DAVE),
        ("the wrong password", WRONG),
        ("alice's PLAIN payload", plain_alice.as_str()),
        ("the wrong PLAIN payload", plain_wrong.as_str()),
        ("the chat message's body", CHAT),
        ("the offline message's body", OFFLINE),
        ("a PLAIN payload that is not base64", BAD_PLAIN),
        ("a message body sent before authentication", PREAUTH),
        ("the body of a malformed message", MALFORMED),
        ("the user API token", token.as_str()),
        ("the admin API token", admin_token.as_str()),
    ] {
        let hits: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            hits.is_empty(),
            "{what} is in the log:\n{}",
            hits.join("\n")
        );
    }
}
