//! The message archive (XEP-0313 storage) through the `ArchiveStore` trait on a temporary sled
//! store: appending one message, and pages of 50 in a 100,000-message archive filled once,
//! outside the timing. The store's cache (the server's default size) holds the whole archive,
//! so these are warm-cache figures; `halyard-bench archive` measures cold reads.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use halyard::config::Config;
use halyard::store::Stores;
use halyard_xep::host::KeyRange;
use jid::{BareJid, Jid};
use rand::{Rng, SeedableRng};

const MESSAGES: u64 = 100_000;
const CONTACTS: u64 = 20;
const PAGE: usize = 50;
/// Archive timestamps start here (µs since the epoch; 2025-01-01), one message per second.
const START_TS: u64 = 1_735_689_600_000_000;

/// A chat message as archived (~270 bytes): from, to, type, id, a body, an origin-id.
fn stanza(i: u64, with: &str) -> String {
    format!(
        "<message xmlns='jabber:client' from='owner@localhost/phone' to='{with}' type='chat' id='5e1c7a2b-3f4d-4c8e-9a61-{i:012}'>\
         <body>Are you coming to the station tonight? The train is late, ok</body>\
         <origin-id xmlns='urn:xmpp:sid:0' id='b7f3e2a1-6c5d-4e9f-8a7b-{i:012}'/></message>"
    )
}

fn open(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> Stores {
    let cfg = Config::default();
    // The group-commit task is spawned on the runtime, hence the guard.
    let _enter = rt.enter();
    Stores::open_sled(dir, cfg.group_commit(), cfg.cache_bytes()).expect("sled store opens")
}

fn contacts() -> Vec<Jid> {
    (0..CONTACTS)
        .map(|c| format!("c{c}@localhost").parse().expect("contact JID"))
        .collect()
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let stores = open(&rt, tmp.path());
    let owner = BareJid::new("owner@localhost").expect("owner JID");
    let contacts = contacts();
    let texts: Vec<String> = contacts
        .iter()
        .enumerate()
        .map(|(i, w)| stanza(i as u64, &w.to_string()))
        .collect();
    let mut i = 0u64;
    let mut g = c.benchmark_group("archive");
    g.throughput(Throughput::Elements(1));
    // One append as the archive hook makes it (not waiting for the group commit to flush).
    g.bench_function("append", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let k = (i % CONTACTS) as usize;
                    stores
                        .archive
                        .append(&owner, &contacts[k], START_TS + i * 1_000_000, &texts[k])
                        .await
                        .expect("append");
                    i += 1;
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    (stores.flush)().expect("flush");
}

fn pages(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let stores = open(&rt, tmp.path());
    let owner = BareJid::new("owner@localhost").expect("owner JID");
    let contacts = contacts();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::with_capacity(MESSAGES as usize);
        for i in 0..MESSAGES {
            let with = &contacts[(i % CONTACTS) as usize];
            let id = stores
                .archive
                .append(
                    &owner,
                    with,
                    START_TS + i * 1_000_000,
                    &stanza(i, &with.to_string()),
                )
                .await
                .expect("prefill append");
            ids.push(id);
        }
        (stores.flush)().expect("flush");
        ids
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    let mut g = c.benchmark_group("archive_100k");
    g.throughput(Throughput::Elements(1));
    // The newest page (what a client asks for first: RSM `<before/>`, max 50).
    g.bench_function("page_newest_50", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    let page = stores
                        .archive
                        .scan(&owner, None, KeyRange::default(), true, PAGE)
                        .await
                        .expect("scan");
                    assert_eq!(page.len(), PAGE);
                }
                t.elapsed()
            })
        })
    });
    // A page after a random archive id (RSM `<after>id</after>`, max 50): the id's lookup,
    // then the scan from it.
    g.bench_function("page_after_random_id_50", |b| {
        b.iter_custom(|iters| {
            // Any id but the newest 50, so every page is full; picked outside the timing.
            let picks: Vec<&str> = (0..iters)
                .map(|_| ids[rng.gen_range(0..ids.len() - PAGE)].as_str())
                .collect();
            rt.block_on(async {
                let t = Instant::now();
                for id in picks {
                    let key = stores
                        .archive
                        .locate(&owner, id)
                        .await
                        .expect("locate")
                        .expect("id is in the archive");
                    let range = KeyRange {
                        after: Some(key),
                        before: None,
                    };
                    let page = stores
                        .archive
                        .scan(&owner, None, range, false, PAGE)
                        .await
                        .expect("scan");
                    assert_eq!(page.len(), PAGE);
                }
                t.elapsed()
            })
        })
    });
    g.finish();
}

criterion_group!(benches, append, pages);
criterion_main!(benches);
