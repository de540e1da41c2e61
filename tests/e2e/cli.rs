//! The command-line contract of the `halyard` binary, run as a subprocess: `user add|passwd|remove|
//! list` with and without a running server, configuration errors, `serve` and its `listening ...`
//! line, signals, the stale admin socket, and the generated development certificate.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_halyard");

const CONFIG: &str = r#"
domains = ["localhost"]
data_dir = "data"
certs_dir = "certs"

[listeners]
c2s = ["127.0.0.1:0"]
c2s_tls = []
http = []
https = []
"#;

/// A folder with a config.toml (relative data and certs folders next to it).
pub(crate) struct Env {
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

impl Env {
    /// An environment with no certificate: `serve` generates one.
    pub(crate) fn bare() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, CONFIG).expect("write config");
        Env { dir, cfg }
    }

    /// An environment whose certs folder holds the test certificate, which
    /// [`RawClient::starttls`] trusts.
    pub(crate) async fn with_test_cert() -> Env {
        let env = Env::bare();
        let certs = env.path().join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        // The harness keeps the test certificate private; a stopped in-process server leaves a
        // copy of it in its folder, next to its data folder.
        let s = TestServer::start_with(|c| {
            c.listeners.c2s.clear();
            c.listeners.c2s_tls.clear();
            c.listeners.http.clear();
            c.listeners.https.clear();
        })
        .await;
        let src = s.data_dir().parent().expect("server folder").join("certs");
        for f in ["localhost.crt", "localhost.key"] {
            std::fs::copy(src.join(f), certs.join(f)).expect("copy test cert");
        }
        s.stop().await;
        env
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn data(&self) -> PathBuf {
        self.path().join("data")
    }

    pub(crate) fn cfg(&self) -> &str {
        self.cfg.to_str().expect("utf-8 path")
    }

    /// `halyard --config <cfg> <args...>`.
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config").arg(&self.cfg);
        c.args(args);
        self.prepare(&mut c);
        c
    }

    /// `halyard <args...>` with nothing added.
    pub(crate) fn raw(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args);
        self.prepare(&mut c);
        c
    }

    fn prepare(&self, c: &mut Command) {
        c.current_dir(self.path())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
    }

    pub(crate) fn run(&self, args: &[&str]) -> Run {
        Run::of(run_bounded(self.cmd(args), None))
    }

    pub(crate) fn run_stdin(&self, args: &[&str], input: &str) -> Run {
        Run::of(run_bounded(self.cmd(args), Some(input)))
    }

    /// Starts `halyard serve` with a STARTTLS listener on a free port only.
    pub(crate) fn serve(&self) -> Serving {
        let mut c = self.cmd(&[
            "--log",
            "info",
            "serve",
            "--c2s",
            "127.0.0.1:0",
            "--c2s-tls",
            "none",
            "--http",
            "none",
            "--https",
            "none",
        ]);
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        Serving::start(c)
    }
}

/// What a finished command did.
pub(crate) struct Run {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    fn of(o: Output) -> Run {
        Run {
            status: o.status,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub(crate) fn ok(&self, what: &str) -> &Run {
        assert!(
            self.status.success(),
            "{what}: expected success, got {:?}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts failure with a message on stderr; returns stderr.
    #[track_caller]
    pub(crate) fn fails(&self, what: &str) -> &str {
        assert!(
            !self.status.success(),
            "{what}: expected failure, got success\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.trim().is_empty(),
            "{what}: a failure explains itself on stderr"
        );
        &self.stderr
    }
}

/// Runs a command to completion, killing it if it takes more than 20 s (a CLI command that hangs,
/// e.g. a `serve` that should have refused to start, must not hang the suite).
pub(crate) fn run_bounded(mut cmd: Command, input: Option<&str>) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn halyard");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(Duration::from_secs(20)).is_err() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        let out = waiter.join().expect("waiter").expect("wait");
        panic!(
            "halyard did not finish within 20 s\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    waiter.join().expect("waiter").expect("wait")
}

/// A running `halyard serve` child; killed when dropped.
pub(crate) struct Serving {
    pub(crate) child: Child,
    lines: mpsc::Receiver<String>,
    pub(crate) c2s: SocketAddr,
}

impl Serving {
    fn start(mut cmd: Command) -> Serving {
        let mut child = cmd.spawn().expect("spawn halyard serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        // Keeps reading for the child's whole life, so a full pipe never blocks its logging.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep draining.
                    continue;
                }
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        let c2s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        break addr;
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "no `listening c2s=` line from halyard serve ({status:?}); stderr so far:\n{}",
                        seen.join("\n")
                    );
                }
            }
        };
        Serving { child, lines, c2s }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit, up to `limit`.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some((st, start.elapsed()));
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stderr lines logged so far.
    pub(crate) fn drain_log(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The c2s address from the `listening c2s=ADDR[,ADDR] c2s_tls=...` log line.
pub(crate) fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening c2s=")? + "listening c2s=".len()..];
    let first: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    first.parse().ok()
}

#[test]
fn listening_line_parses() {
    assert_eq!(
        parse_listening(
            "2025-01-01T00:00:00Z  INFO halyard: listening c2s=127.0.0.1:40000 c2s_tls= http= https="
        ),
        Some("127.0.0.1:40000".parse().unwrap())
    );
    assert_eq!(
        parse_listening("x listening c2s=127.0.0.1:5,127.0.0.1:6 c2s_tls="),
        Some("127.0.0.1:5".parse().unwrap())
    );
    assert_eq!(parse_listening("listening c2s= c2s_tls=1.2.3.4:5"), None);
}

/// STARTTLS, PLAIN and bind against `addr`; the SASL answer when authentication fails.
pub(crate) async fn try_login_at(
    addr: SocketAddr,
    user: &str,
    password: &str,
    resource: &str,
) -> Result<RawClient, Element> {
    let mut c = RawClient::connect(addr).await;
    c.open().await;
    let mut c = c.starttls().await;
    c.open().await;
    let r = c.auth_plain(user, password).await;
    if !r.is("success", NS_SASL) {
        return Err(r);
    }
    c.open().await;
    c.bind(resource).await;
    Ok(c)
}

pub(crate) async fn login_at(
    addr: SocketAddr,
    user: &str,
    password: &str,
    resource: &str,
) -> RawClient {
    match try_login_at(addr, user, password, resource).await {
        Ok(c) => c,
        Err(e) => panic!("{user} with {password:?} should log in, got {}", xml(&e)),
    }
}

#[track_caller]
fn assert_login_refused(r: Result<RawClient, Element>, what: &str) {
    match r {
        Ok(_) => panic!("{what}: login should fail"),
        Err(e) => {
            assert!(e.is("failure", NS_SASL), "{what}: {}", xml(&e));
            assert!(
                e.get_child("not-authorized", NS_SASL).is_some(),
                "{what}: not-authorized, got {}",
                xml(&e)
            );
        }
    }
}

/// Proves a session is alive: the server answers its ping.
async fn assert_alive(c: &mut RawClient, id: &str) {
    c.send(&format!(
        "<iq type='get' id='{id}' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>"
    ))
    .await;
    let r = c.recv_until(|e| e.attr("id") == Some(id)).await;
    assert_eq!(r.attr("type"), Some("result"), "{}", xml(&r));
}

#[tokio::test]
async fn user_commands_without_a_running_server() {
    let env = Env::with_test_cert().await;

    env.run(&["user", "add", "alice@localhost", "--password", "pw"])
        .ok("user add");
    let err = env
        .run(&["user", "add", "alice@localhost", "--password", "other"])
        .fails("adding an existing account")
        .to_string();
    assert!(err.contains("alice@localhost"), "names the account: {err}");

    // JIDs are normalised (RFC 7622): the localpart and domain are case-folded.
    env.run(&["user", "add", "Bob@LocalHost", "--password", "pw-bob"])
        .ok("user add with capitals");
    let list = env.run(&["user", "list"]);
    list.ok("user list");
    assert_eq!(list.stdout, "alice@localhost\nbob@localhost\n");

    // Issue 7: a name not stable under preparation (℻ → FAX → fax) is refused, saying why.
    for name in ["\u{213b}@localhost", "\u{213b}"] {
        let err = env
            .run(&["user", "add", name, "--password", "pw"])
            .fails("user add of an unstable JID")
            .to_string();
        assert!(
            err.contains('\u{213b}') && err.contains("JID"),
            "names the JID and what is wrong: {err}"
        );
    }

    // The password from stdin, its line ending not included.
    env.run_stdin(&["user", "add", "carol@localhost"], "pw-carol\n")
        .ok("user add, password on stdin");
    env.run_stdin(&["user", "add", "dave@localhost"], "pw-dave\n")
        .ok("user add, password on stdin");
    // No password at all is refused.
    env.run_stdin(&["user", "add", "erin@localhost"], "")
        .fails("user add without any password");

    env.run(&[
        "user",
        "passwd",
        "alice@localhost",
        "--password",
        "new-alice",
    ])
    .ok("user passwd");
    env.run_stdin(&["user", "passwd", "bob@localhost"], "new-bob\n")
        .ok("user passwd, password on stdin");
    env.run(&["user", "passwd", "nobody@localhost", "--password", "x"])
        .fails("passwd of a nonexistent account");

    env.run(&["user", "remove", "carol@localhost"])
        .ok("user remove");
    env.run(&["user", "remove", "carol@localhost"])
        .fails("removing a removed account");
    env.run(&["user", "remove", "nobody@localhost"])
        .fails("removing a nonexistent account");

    let err = env
        .run(&["user", "add", "alice@otherdomain", "--password", "pw"])
        .fails("an account on a domain not served")
        .to_string();
    assert!(err.contains("otherdomain"), "names the domain: {err}");
    env.run(&["user", "add", "not a jid@@", "--password", "pw"])
        .fails("an invalid JID");

    // Global flags after the subcommand.
    let list = Run::of(run_bounded(
        env.raw(&["user", "list", "--config", env.cfg()]),
        None,
    ));
    list.ok("user list --config after the subcommand");
    assert_eq!(
        list.stdout,
        "alice@localhost\nbob@localhost\ndave@localhost\n"
    );

    // What the commands stored is what a server then authenticates against.
    let serving = env.serve();
    let addr = serving.c2s;
    login_at(addr, "alice", "new-alice", "r").await;
    assert_login_refused(
        try_login_at(addr, "alice", "pw", "r").await,
        "alice's old password",
    );
    login_at(addr, "bob", "new-bob", "r").await;
    login_at(addr, "dave", "pw-dave", "r").await;
    assert_login_refused(
        try_login_at(addr, "carol", "pw-carol", "r").await,
        "removed carol",
    );
    drop(serving);
}

#[tokio::test]
async fn configuration_errors() {
    let env = Env::bare();

    let err = Run::of(run_bounded(
        env.raw(&["--config", "/nonexistent/halyard.toml", "user", "list"]),
        None,
    ))
    .fails("--config to a missing file")
    .to_string();
    assert!(
        err.contains("/nonexistent/halyard.toml"),
        "names the file: {err}"
    );
    // serve as well must refuse to start, not fall back to defaults.
    Run::of(run_bounded(
        env.raw(&["--config", "/nonexistent/halyard.toml", "serve"]),
        None,
    ))
    .fails("serve with --config to a missing file");

    let write = |name: &str, text: &str| {
        let p = env.path().join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf-8").to_string()
    };

    let unknown = write("unknown.toml", "domains = [\"localhost\"]\nbogus_key = 1\n");
    let err = Run::of(run_bounded(
        env.raw(&["--config", &unknown, "check-config"]),
        None,
    ))
    .fails("an unknown top-level key")
    .to_string();
    assert!(err.contains("bogus_key"), "names the key: {err}");

    let nested = write("nested.toml", "[c2s]\nrequire_tsl = true\n");
    let err = Run::of(run_bounded(
        env.raw(&["--config", &nested, "check-config"]),
        None,
    ))
    .fails("an unknown nested key")
    .to_string();
    assert!(err.contains("require_tsl"), "names the key: {err}");

    let domain = write("domain.toml", "domains = [\"not a domain\"]\n");
    let err = Run::of(run_bounded(
        env.raw(&["--config", &domain, "check-config"]),
        None,
    ))
    .fails("an invalid domain")
    .to_string();
    assert!(err.contains("not a domain"), "names the domain: {err}");
    assert!(err.contains("domain"), "{err}");

    let iters = write("iters.toml", "[auth]\nscram_iterations = 10\n");
    let err = Run::of(run_bounded(
        env.raw(&["--config", &iters, "check-config"]),
        None,
    ))
    .fails("too few SCRAM iterations")
    .to_string();
    assert!(err.contains("scram_iterations"), "names the key: {err}");

    env.run(&["check-config"]).ok("a good file");
    Run::of(run_bounded(
        env.raw(&["check-config", "--config", env.cfg()]),
        None,
    ))
    .ok("a good file, --config after the subcommand");
}

#[tokio::test]
async fn user_commands_through_a_running_server() {
    let env = Env::with_test_cert().await;
    let serving = env.serve();
    let addr = serving.c2s;

    // While the server holds the store, the CLI goes through the admin socket.
    env.run(&["user", "add", "erin@localhost", "--password", "pw1"])
        .ok("user add while serving");
    let mut erin = login_at(addr, "erin", "pw1", "laptop").await;
    assert_alive(&mut erin, "alive1").await;
    let list = env.run(&["user", "list"]);
    list.ok("user list while serving");
    assert_eq!(list.stdout, "erin@localhost\n");
    env.run(&["user", "add", "erin@localhost", "--password", "x"])
        .fails("adding an existing account while serving");

    // A new password ends the live sessions and replaces the old one.
    env.run(&["user", "passwd", "erin@localhost", "--password", "pw2"])
        .ok("user passwd while serving");
    let cond = erin.expect_stream_error().await;
    assert!(!cond.is_empty(), "a stream error condition");
    assert_login_refused(
        try_login_at(addr, "erin", "pw1", "laptop").await,
        "erin's old password",
    );
    let mut erin = login_at(addr, "erin", "pw2", "laptop").await;
    assert_alive(&mut erin, "alive2").await;

    // Removal ends the live sessions and the account.
    env.run(&["user", "remove", "erin@localhost"])
        .ok("user remove while serving");
    let cond = erin.expect_stream_error().await;
    assert!(!cond.is_empty(), "a stream error condition");
    assert_login_refused(
        try_login_at(addr, "erin", "pw2", "laptop").await,
        "removed erin",
    );
    let list = env.run(&["user", "list"]);
    list.ok("user list after remove");
    assert_eq!(list.stdout, "");
    drop(serving);
}

#[tokio::test]
async fn a_killed_server_leaves_a_socket_that_does_not_get_in_the_way() {
    let env = Env::with_test_cert().await;
    let mut serving = env.serve();
    env.run(&["user", "add", "frank@localhost", "--password", "pw"])
        .ok("user add while serving");
    serving.child.kill().expect("SIGKILL");
    serving.child.wait().expect("wait");
    assert!(
        env.data().join("admin.sock").exists(),
        "a SIGKILLed server cannot remove its socket (precondition)"
    );

    // The CLI falls back to the store when nobody answers on the socket.
    let list = env.run(&["user", "list"]);
    list.ok("user list with a stale socket");
    assert_eq!(list.stdout, "frank@localhost\n");
    env.run(&["user", "add", "gina@localhost", "--password", "pw"])
        .ok("user add with a stale socket");

    // A fresh server replaces the stale socket.
    let serving = env.serve();
    login_at(serving.c2s, "frank", "pw", "r").await;
    login_at(serving.c2s, "gina", "pw", "r").await;
    env.run(&["user", "add", "hank@localhost", "--password", "pw"])
        .ok("user add through the new server's socket");
    login_at(serving.c2s, "hank", "pw", "r").await;
    drop(serving);
}

#[tokio::test]
async fn sigterm_closes_sessions_with_system_shutdown_and_exits_0() {
    let env = Env::with_test_cert().await;
    let mut serving = env.serve();
    env.run(&["user", "add", "ivy@localhost", "--password", "pw"])
        .ok("user add");
    let mut ivy = login_at(serving.c2s, "ivy", "pw", "r").await;
    assert_alive(&mut ivy, "before-term").await;

    let sent = Instant::now();
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(serving.pid().to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -TERM");

    let cond = ivy.expect_stream_error().await;
    assert_eq!(cond, "system-shutdown");
    let left = Duration::from_secs(2).saturating_sub(sent.elapsed());
    let (status, _) = serving.wait_exit(left).unwrap_or_else(|| {
        panic!(
            "halyard still running 2 s after SIGTERM; log:\n{}",
            serving.drain_log().join("\n")
        )
    });
    assert!(
        status.success(),
        "exit status 0 after SIGTERM, got {status:?}; log:\n{}",
        serving.drain_log().join("\n")
    );
    assert!(
        sent.elapsed() <= Duration::from_secs(2),
        "stopped within 2 s: {:?}",
        sent.elapsed()
    );
    assert!(
        !env.data().join("admin.sock").exists(),
        "a clean shutdown removes its admin socket"
    );
    // The store was flushed and released: the CLI opens it directly.
    let list = env.run(&["user", "list"]);
    list.ok("user list after shutdown");
    assert_eq!(list.stdout, "ivy@localhost\n");
}

#[tokio::test]
async fn serve_generates_a_private_self_signed_certificate() {
    let env = Env::bare();
    let certs = env.path().join("certs");
    assert!(!certs.exists(), "precondition: no certs folder");
    let serving = env.serve();

    let crt = certs.join("localhost.crt");
    let key = certs.join("localhost.key");
    assert!(crt.is_file(), "{} was generated", crt.display());
    assert!(key.is_file(), "{} was generated", key.display());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key)
            .expect("key metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the private key is private: {mode:o}");
    }
    let pem = std::fs::read(&crt).expect("read crt");
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .expect("PEM certificate");
    assert_eq!(chain.len(), 1, "one self-signed certificate");
    let key_pem = std::fs::read(&key).expect("read key");
    assert!(
        rustls_pemfile::private_key(&mut key_pem.as_slice())
            .expect("PEM key")
            .is_some(),
        "a PEM private key"
    );

    // And the server presents it: a client trusting exactly that certificate completes STARTTLS
    // for "localhost".
    halyard::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(chain[0].clone()).expect("root");
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = TcpStream::connect(serving.c2s).await.expect("connect");
    tcp.write_all(stream_open(DOMAIN).as_bytes())
        .await
        .expect("write");
    read_until(&mut tcp, |t| {
        t.contains("starttls") && t.trim_end().ends_with("features>")
    })
    .await;
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .expect("write");
    read_until(&mut tcp, |t| t.contains("proceed")).await;
    let name = rustls::pki_types::ServerName::try_from(DOMAIN).expect("name");
    tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake with the generated certificate");

    // Restarting keeps the certificate rather than generating another.
    drop(serving);
    let again = env.serve();
    assert_eq!(
        std::fs::read(&crt).expect("read crt"),
        pem,
        "certificate kept"
    );
    drop(again);
}

/// Reads raw bytes until the text so far satisfies `done`.
async fn read_until(tcp: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(TIMEOUT, tcp.read(&mut chunk))
            .await
            .expect("server answers in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed; got {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if done(&text) {
            return text;
        }
    }
}
