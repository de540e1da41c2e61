//! `halyard-bench archive`: fills one user's archive (default 1,000,000 messages across 100
//! contacts) through the store, then measures queries through the XEP-0313 query handler —
//! the same code path a client's `<query/>` takes, minus the socket — with a store cache
//! smaller than the data and pages chosen at random. In-process, Halyard only.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use halyard::config::Config;
use halyard::server::Server;
use halyard::store::Stores;
use halyard_xep::registry::{IqReply, IqScope};
use halyard_xep::{Kind, Stanza};
use jid::{BareJid, Jid};
use minidom::Element;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Archive append throughput, query latency through the MAM handler, disk bytes per message.
#[derive(clap::Args)]
pub struct ArchiveArgs {
    /// Messages in the archive.
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: u64,
    /// Contacts they are spread across.
    #[arg(long, default_value_t = 100)]
    pub contacts: u64,
    /// Store page cache in MiB (keep it below the data size to measure disk reads).
    #[arg(long, default_value_t = 16)]
    pub cache_mb: u64,
    /// Samples per query scenario.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Concurrent writers for the durable-append measurement.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    /// Fill without asking for group commits (to see the store's raw append rate).
    #[arg(long)]
    pub no_nudge: bool,
    /// Where to put the store (default: a temporary folder, removed afterwards).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

const OWNER: &str = "owner@localhost";
const MAM: &str = "urn:xmpp:mam:2";

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn disk_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += disk_bytes(&p);
            } else if let Ok(m) = e.metadata() {
                total += m.len();
            }
        }
    }
    total
}

/// A chat message as a client would send it, ~250 bytes.
fn stanza(rng: &mut impl Rng, i: u64, with: &str) -> String {
    const WORDS: &[&str] = &[
        "hello", "are", "you", "coming", "tonight", "the", "train", "is", "late", "see", "soon",
        "ok", "great", "thanks", "where", "meet", "at", "station",
    ];
    let n = rng.gen_range(6..20);
    let body: Vec<&str> = (0..n).map(|_| *WORDS.choose(rng).unwrap_or(&"x")).collect();
    format!(
        "<message xmlns='jabber:client' from='{OWNER}/phone' to='{with}' type='chat' id='m{i}'><body>{}</body><origin-id xmlns='urn:xmpp:sid:0' id='o{i}'/></message>",
        body.join(" ")
    )
}

struct Stats(Vec<Duration>);

impl Stats {
    fn line(mut self, what: &str) -> String {
        self.0.sort();
        let n = self.0.len().max(1);
        let at = |q: f64| {
            self.0
                .get(((n as f64 * q) as usize).min(n - 1))
                .copied()
                .unwrap_or_default()
        };
        format!(
            "{what:<28} n={:<5} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms",
            self.0.len(),
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            self.0.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        )
    }
}

fn query_iq(fields: &str, rsm: &str) -> Element {
    let form = if fields.is_empty() {
        String::new()
    } else {
        format!("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>{fields}</x>")
    };
    format!("<iq xmlns='jabber:client' type='set' id='q'><query xmlns='{MAM}' queryid='b'>{form}<set xmlns='http://jabber.org/protocol/rsm'>{rsm}</set></query></iq>")
        .parse()
        .expect("query parses")
}

fn field(var: &str, value: &str) -> String {
    format!("<field var='{var}'><value>{value}</value></field>")
}

fn stamp(micros: u64) -> String {
    // XEP-0082 UTC date-time from microseconds.
    let secs = (micros / 1_000_000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Runs one query through the handler; returns (time, last id of the page, items).
async fn run_query(
    server: &Server,
    sink: &mut halyard::sessions::OutboundRx,
    el: Element,
) -> anyhow::Result<(Duration, Option<String>, usize)> {
    let handler = server
        .registry
        .iq_handler(IqScope::Account, MAM)
        .ok_or_else(|| anyhow::anyhow!("no MAM handler registered"))?
        .clone();
    let st = Stanza {
        kind: Kind::Iq,
        from: "owner@localhost/bench".parse()?,
        to: None,
        el,
    };
    let t = Instant::now();
    let reply = handler.handle(server, &st).await;
    let took = t.elapsed();
    // What the client would read; emptied so the queue never fills across samples.
    while sink.try_recv().is_ok() {}
    match reply {
        IqReply::Result(Some(fin)) => {
            let set = fin.get_child("set", "http://jabber.org/protocol/rsm");
            let last = set
                .and_then(|s| s.get_child("last", "http://jabber.org/protocol/rsm"))
                .map(|l| l.text());
            let first = set.and_then(|s| s.get_child("first", "http://jabber.org/protocol/rsm"));
            Ok((took, last, usize::from(first.is_some())))
        }
        IqReply::Result(None) => Ok((took, None, 0)),
        IqReply::Error(e) => anyhow::bail!("query failed: {e:?}"),
    }
}

/// Opens the store again once the previous handle is gone (the group-commit task releases it
/// when it sees its channel close, on another thread).
async fn reopen(dir: &Path, cache: u64) -> anyhow::Result<Stores> {
    let mut tries = 0;
    loop {
        match Stores::open_sled(dir, Duration::from_millis(2), cache) {
            Ok(s) => return Ok(s),
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

pub async fn run(a: ArchiveArgs) -> anyhow::Result<()> {
    halyard::install_crypto_provider();
    let tmp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let cache = a.cache_mb << 20;
    let owner = BareJid::new(OWNER)?;
    let contacts: Vec<String> = (0..a.contacts).map(|c| format!("c{c}@localhost")).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let start_ts = now_micros() - a.messages * 1_000_000;

    println!(
        "halyard-bench archive: {} messages, {} contacts, cache {} MiB",
        a.messages, a.contacts, a.cache_mb
    );
    let stores = Stores::open_sled(&dir, Duration::from_millis(2), cache)?;
    // Fill as live traffic does: append, and nudge the group commit without waiting for it.
    let mut raw = 0u64;
    let mut sample_ids = Vec::new();
    let t = Instant::now();
    for i in 0..a.messages {
        let with = &contacts[(i % a.contacts) as usize];
        let s = stanza(&mut rng, i, with);
        raw += s.len() as u64;
        let with_jid: Jid = with.parse()?;
        let id = stores
            .archive
            .append(&owner, &with_jid, start_ts + i * 1_000_000, &s)
            .await?;
        if i % 997 == 0 {
            sample_ids.push(id);
        }
        stores.durable.nudge();
    }
    stores.durable.wait().await?;
    let fill = t.elapsed();
    println!(
        "append (live path: append + group-commit nudge, 1 writer): {:.0} msg/s ({} in {:.1} s)",
        a.messages as f64 / fill.as_secs_f64(),
        a.messages,
        fill.as_secs_f64()
    );

    // Durable appends: each writer waits for its message to be on disk (group commit).
    let n_durable = 20_000u64;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.writers as u64 {
        let stores = stores.clone();
        let owner = owner.clone();
        let with: Jid = contacts[(w % a.contacts) as usize].parse()?;
        tasks.push(tokio::spawn(async move {
            for i in 0..n_durable / a.writers as u64 {
                let s = format!("<message xmlns='jabber:client' to='{with}' type='chat' id='d{w}-{i}'><body>durable</body></message>");
                stores.archive.append(&owner, &with, now_micros(), &s).await?;
                stores.durable.wait().await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let d = t.elapsed();
    println!(
        "append (durable: each waits for its group commit, {} writers): {:.0} msg/s",
        a.writers,
        n_durable as f64 / d.as_secs_f64()
    );
    (stores.flush)()?;
    drop(stores);

    // Reopen: disk use after a flush, and a cold cache for the queries.
    let stores = reopen(&dir, cache).await?;
    let disk = disk_bytes(&dir);
    println!(
        "disk: {} bytes for {} bytes of stanzas ({:.2}x raw)",
        disk,
        raw,
        disk as f64 / raw as f64
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let cfg = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    let server = Arc::new(Server::new(cfg, stores, None, rx)?);
    // The querying session: results go to its queue, drained as a client would read them (the
    // serialisation of each result is part of what is measured).
    let (qtx, mut qrx) = halyard::outbound::channel(4096);
    server
        .sessions
        .bind(&"owner@localhost/bench".parse()?, 1, qtx);

    let samples = a.samples;
    let mut first = Vec::new();
    let mut last = Vec::new();
    let mut with = Vec::new();
    let mut range = Vec::new();
    let mut random = Vec::new();
    for _ in 0..samples {
        first.push(
            run_query(&server, &mut qrx, query_iq("", "<max>50</max>"))
                .await?
                .0,
        );
        last.push(
            run_query(&server, &mut qrx, query_iq("", "<max>50</max><before/>"))
                .await?
                .0,
        );
        let c = &contacts[rng.gen_range(0..contacts.len())];
        with.push(
            run_query(
                &server,
                &mut qrx,
                query_iq(&field("with", c), "<max>50</max>"),
            )
            .await?
            .0,
        );
        let at = start_ts + rng.gen_range(0..a.messages) * 1_000_000;
        let fields = format!(
            "{}{}",
            field("start", &stamp(at)),
            field("end", &stamp(at + 3_600_000_000))
        );
        range.push(
            run_query(&server, &mut qrx, query_iq(&fields, "<max>50</max>"))
                .await?
                .0,
        );
        let id = sample_ids.choose(&mut rng).cloned().unwrap_or_default();
        random.push(
            run_query(
                &server,
                &mut qrx,
                query_iq("", &format!("<max>50</max><after>{id}</after>")),
            )
            .await?
            .0,
        );
    }
    // 100 consecutive pages of 50 from a random point.
    let mut consecutive = Vec::new();
    let mut after = sample_ids.choose(&mut rng).cloned().unwrap_or_default();
    for _ in 0..100 {
        let (took, next, _) = run_query(
            &server,
            &mut qrx,
            query_iq("", &format!("<max>50</max><after>{after}</after>")),
        )
        .await?;
        consecutive.push(took);
        match next {
            Some(n) => after = n,
            None => break,
        }
    }
    println!(
        "queries through the MAM handler (pages of 50, cache {} MiB):",
        a.cache_mb
    );
    for (name, s) in [
        ("first page", first),
        ("last page (<before/>)", last),
        ("with one contact", with),
        ("time range (1 h)", range),
        ("random page (RSM after)", random),
        ("100 consecutive pages", consecutive),
    ] {
        println!("  {}", Stats(s).line(name));
    }
    Ok(())
}
