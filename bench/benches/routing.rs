//! Routing a chat message to a bare JID with 1 and with 3 bound, available resources, on a real
//! `Server` (every module registered, a temporary sled store):
//!
//! - `message_targets`: the RFC 6121 §8.5 decision alone (which sessions' queues get it);
//! - `from_client`: the whole path of a stanza from a bound session — `from` stamping, address
//!   checks, the recipient's account lookup, every module's message hook (the archive writes a
//!   copy for sender and recipient), serialisation once and queueing to each resource.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use halyard::config::Config;
use halyard::server::Server;
use halyard::sessions::OutboundRx;
use halyard::store::{Account, Stores};
use halyard_xep::{Kind, Stanza};
use jid::{BareJid, FullJid, Jid};
use minidom::Element;

const SENDER: &str = "romeo@localhost/orchard";

/// A chat message to `to` as it leaves the sender's stream reader.
fn message(to: &str) -> Element {
    format!(
        "<message xmlns='jabber:client' to='{to}' id='5e1c7a2b-3f4d-4c8e-9a61-000000000001' type='chat'>\
         <body>Are you coming to the station tonight? The train is late, ok</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='b7f3e2a1-6c5d-4e9f-8a7b-000000000001'/></message>"
    )
    .parse()
    .expect("message parses")
}

struct Bench {
    rt: tokio::runtime::Runtime,
    server: Server,
    /// The queues of every bound session, drained as their writers would.
    queues: Vec<OutboundRx>,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Self {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temporary directory");
        let cfg = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let server = {
            let _enter = rt.enter();
            let stores = Stores::open_sled(dir.path(), cfg.group_commit(), cfg.cache_bytes())
                .expect("sled store opens");
            let (_tx, shutdown) = tokio::sync::watch::channel(false);
            Server::new(cfg, stores, None, shutdown).expect("server")
        };
        let mut b = Bench {
            rt,
            server,
            queues: Vec::new(),
            _dir: dir,
        };
        b.account("romeo@localhost", &["orchard"]);
        b.account("juliet1@localhost", &["balcony"]);
        b.account("juliet3@localhost", &["balcony", "chamber", "phone"]);
        b
    }

    /// Creates an account and binds `resources`, each available (initial presence, priority 0).
    fn account(&mut self, bare: &str, resources: &[&str]) {
        let jid = BareJid::new(bare).expect("bare JID");
        self.rt
            .block_on(self.server.stores.accounts.create(
                &jid,
                &Account {
                    scram: Default::default(),
                    created: 0,
                },
            ))
            .expect("account created");
        for r in resources {
            let full: FullJid = format!("{bare}/{r}").parse().expect("full JID");
            let (tx, rx) = halyard::outbound::channel(1024);
            // Connection ids only need to be distinct.
            let conn_id = self.queues.len() as u64 + 1;
            self.server.sessions.bind(&full, conn_id, tx);
            let presence: Element = "<presence xmlns='jabber:client'/>"
                .parse()
                .expect("presence parses");
            self.server
                .sessions
                .set_presence(&full, Some((presence, 0)));
            self.queues.push(rx);
        }
    }

    fn drain(&mut self) {
        for q in &mut self.queues {
            while q.try_recv().is_ok() {}
        }
    }
}

fn routing(c: &mut Criterion) {
    let mut b = Bench::new();
    let sender: FullJid = SENDER.parse().expect("sender JID");

    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    for (n, to) in [(1, "juliet1@localhost"), (3, "juliet3@localhost")] {
        let st = Stanza {
            kind: Kind::Message,
            from: Jid::from(sender.clone()),
            to: Some(to.parse().expect("recipient JID")),
            el: message(to),
        };
        assert_eq!(
            halyard::router::message_targets(&b.server, &st).len(),
            n,
            "every resource gets it"
        );
        g.bench_with_input(
            BenchmarkId::new("message_targets", format!("{n}_resources")),
            &st,
            |bench, st| bench.iter(|| halyard::router::message_targets(&b.server, st)),
        );
    }
    for (n, to) in [(1, "juliet1@localhost"), (3, "juliet3@localhost")] {
        let el = message(to);
        // Once untimed: every resource's queue gets the message.
        b.rt.block_on(halyard::router::from_client(&b.server, &sender, el.clone()));
        let got: usize = b
            .queues
            .iter_mut()
            .map(|q| std::iter::from_fn(|| q.try_recv().ok()).count())
            .sum();
        assert_eq!(
            got, n,
            "the message reaches every resource, and nothing else is sent"
        );
        g.bench_function(
            BenchmarkId::new("from_client_chat_to_bare", format!("{n}_resources")),
            |bench| {
                bench.iter_custom(|iters| {
                    // The stanzas are consumed by routing; copies are made outside the timing.
                    let els: Vec<Element> = (0..iters).map(|_| el.clone()).collect();
                    let Bench {
                        rt, server, queues, ..
                    } = &mut b;
                    rt.block_on(async {
                        let t = Instant::now();
                        for el in els {
                            halyard::router::from_client(server, &sender, el).await;
                            for q in queues.iter_mut() {
                                while q.try_recv().is_ok() {}
                            }
                        }
                        t.elapsed()
                    })
                })
            },
        );
        b.drain();
    }
    g.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
