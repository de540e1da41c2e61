//! The web client in a real browser: Converse.js served at `/`, driven in headless Chromium by
//! `tests/browser/chat.mjs` (playwright-core), chatting with a TCP client. Needs Chromium and
//! `npm ci --prefix web` (`.ci/run` installs both). Screenshots of each step are kept in
//! `target/test-artifacts/browser/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Driver {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Driver {
    /// Waits for `STEP name` (the browser reached it).
    async fn step(&mut self, name: &str) {
        let want = format!("STEP {name}");
        let line = tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                match self.lines.next_line().await.expect("driver stdout") {
                    Some(l) if l == want => return Some(l),
                    Some(l) => eprintln!("browser: {l}"),
                    None => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the browser did not reach {name:?} in time"));
        if line.is_none() {
            let out = self.child.wait().await.expect("driver exit");
            panic!("the browser driver ended before {name:?} ({out}); see its stderr above and the screenshots in target/test-artifacts/browser");
        }
    }

    async fn go(&mut self, payload: &str) {
        self.stdin
            .write_all(format!("{payload}\n").as_bytes())
            .await
            .expect("driver stdin");
        self.stdin.flush().await.expect("flush");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_in_the_browser_and_find_history_in_a_fresh_context() {
    let playwright = repo().join("web/node_modules/playwright-core");
    let converse = repo().join("web/node_modules/converse.js/dist/converse.min.js");
    assert!(
        std::path::Path::new(CHROMIUM).exists() && playwright.exists() && converse.exists(),
        "the browser test needs Chromium ({CHROMIUM}) and the web packages: run .ci/run, or \
         `apt-get install chromium` and `npm ci --prefix web`"
    );
    let s = TestServer::start_with(|c| {
        c.web.client_dir = repo().join("web/node_modules/converse.js/dist");
    })
    .await;
    s.add_user("alice", "pw").await;
    s.add_user("bob", "pw").await;
    // Alice and Bob are contacts (subscriptions both ways), set up over TCP.
    let mut alice = RawClient::login(&s, "alice", "pw", "setup").await;
    let mut bob = RawClient::login(&s, "bob", "pw", "tcp").await;
    for (c, other, name) in [(&mut alice, "bob", "Bob"), (&mut bob, "alice", "Alice")] {
        c.send(&format!("<iq type='set' id='r'><query xmlns='jabber:iq:roster'><item jid='{other}@localhost' name='{name}'/></query></iq>")).await;
        c.recv_until(|e| e.attr("id") == Some("r")).await;
        // Pre-approve, then ask.
        c.send(&format!("<presence to='{other}@localhost' type='subscribed'/><presence to='{other}@localhost' type='subscribe'/>")).await;
    }
    bob.online().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice.send("</stream:stream>").await;
    drop(alice);

    let artifacts = repo().join("target/test-artifacts/browser");
    let _ = std::fs::remove_dir_all(&artifacts);
    let mut child = Command::new("node")
        .arg(repo().join("tests/browser/chat.mjs"))
        // Plain HTTP from loopback may authenticate (as a TLS-terminating proxy would).
        .env("URL", format!("http://127.0.0.1:{}/", s.http.port()))
        .env("USER", "alice")
        .env("PASSWORD", "pw")
        .env("PEER", "bob@localhost")
        .env("PEER_NAME", "Bob")
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", CHROMIUM)
        .env("PLAYWRIGHT", &playwright)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node (install Node.js)");
    let stdin = child.stdin.take().expect("stdin");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut d = Driver {
        child,
        stdin,
        lines,
    };

    // The browser logs in; a TCP client writes to it; it shows the message and replies.
    d.step("logged-in").await;
    let first = "hello from a TCP client";
    bob.send(&format!(
        "<message to='alice@localhost' type='chat'><body>{first}</body></message>"
    ))
    .await;
    d.go(first).await;
    d.step("replied").await;
    let reply = bob
        .recv_until(|e| e.name() == "message" && body(e).is_some())
        .await;
    assert_eq!(body(&reply).as_deref(), Some("reply typed in the browser"));

    // The page is closed; a message arrives meanwhile; a fresh browser context (no cached
    // messages) logs in and shows all three: offline delivery and the archive.
    d.step("closed").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = "sent while the page was closed";
    bob.send(&format!(
        "<message to='alice@localhost' type='chat'><body>{later}</body></message>"
    ))
    .await;
    d.go(later).await;
    d.step("history").await;
    let status = d.child.wait().await.expect("driver exit");
    assert!(status.success(), "browser driver: {status}");
    assert!(
        artifacts.join("07-history.png").exists(),
        "screenshots are kept as artifacts"
    );
}

/// Plain HTTP/1.1 GET on loopback; returns the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_page_starts_converse_or_says_how_to_install_it() {
    let s = TestServer::start_with(|c| {
        c.web.client_dir = repo().join("web/node_modules/converse.js/dist");
    })
    .await;
    let (status, body) = http_get(s.http, "/").await;
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("converse.initialize"), "{body}");
    assert!(body.contains("/xmpp-websocket"));
    assert!(body.contains("locked_domain: \"localhost\""));
    let (status, _) = http_get(s.http, "/converse/converse.min.css").await;
    assert!(status.contains("200"), "assets are served: {status}");

    let s = TestServer::start_with(|c| {
        c.web.client_dir = PathBuf::from("/nonexistent/converse");
    })
    .await;
    let (status, body) = http_get(s.http, "/").await;
    assert!(status.contains("503"), "{status}");
    assert!(body.contains("npm ci --prefix web"), "{body}");
}
