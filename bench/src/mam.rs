//! `mam`: N sessions each querying its own archive (XEP-0313) page after page, one query in
//! flight per session, for `--duration` seconds after a `--warmup`.
//!
//! Each session first asks for its newest page (`<before/>`) and its oldest page to learn
//! archive ids and timestamps, then repeats queries chosen by `--query`: `rsm` pages before or
//! after a random known id, `range` a page starting at a random known timestamp, `last` the
//! newest page, `mixed` all three in turn. Latency runs from the sent `<iq/>` to its result,
//! with every `<result/>` message of the page read in between.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rand::seq::SliceRandom as _;
use rand::Rng as _;
use rand::SeedableRng as _;
use serde_json::json;

use crate::procfs::Sample;
use crate::stats::{Errors, Latency};
use crate::xmpp::{attr, contains, find_tag, name, Session};
use crate::{cpu_line, login_all, procfs, Common};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QueryKind {
    Rsm,
    Range,
    Last,
    Mixed,
}

#[derive(clap::Args)]
pub struct MamArgs {
    #[command(flatten)]
    c: Common,
    /// Querying sessions (accounts first..first+N), one query in flight each.
    #[arg(long, default_value_t = 4)]
    sessions: u64,
    /// Seconds of queries before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Page size (RSM `<max/>`).
    #[arg(long, default_value_t = 50)]
    max: u32,
    /// Which queries: rsm (before/after a random known id), range (start at a random known
    /// time), last (newest page), mixed (each in turn).
    #[arg(long, value_enum, default_value_t = QueryKind::Mixed)]
    query: QueryKind,
}

const MAM: &str = "urn:xmpp:mam:2";

#[derive(Default)]
struct Outcome {
    lat: Latency,
    queries: u64,
    results: u64,
    errors: Errors,
    failure: Option<String>,
}

/// A page: the `<result/>` ids and `<delay/>` stamps it held, and whether it succeeded.
pub(crate) struct Page {
    pub ids: Vec<String>,
    pub stamps: Vec<String>,
    pub ok: bool,
}

pub(crate) async fn query(
    s: &mut Session,
    qid: u64,
    form: &str,
    rsm: &str,
    max: u32,
    learn: bool,
) -> anyhow::Result<Page> {
    let id = format!("q{qid}");
    let iq = format!(
        "<iq type='set' id='{id}'><query xmlns='{MAM}' queryid='{id}'>{form}<set xmlns='http://jabber.org/protocol/rsm'><max>{max}</max>{rsm}</set></query></iq>"
    );
    s.send(iq.as_bytes()).await?;
    let mut page = Page {
        ids: Vec::new(),
        stamps: Vec::new(),
        ok: false,
    };
    loop {
        let r = s.next_element().await?;
        let el = s.get(r);
        match name(el) {
            b"message" => {
                let Some(at) = find_tag(el, b"result") else {
                    continue;
                };
                let res = &el[at..];
                if attr(res, b"queryid") != Some(id.as_bytes()) {
                    continue;
                }
                if learn {
                    if let Some(rid) = attr(res, b"id") {
                        page.ids.push(String::from_utf8_lossy(rid).into_owned());
                    }
                    if let Some(stamp) =
                        find_tag(el, b"delay").and_then(|d| attr(&el[d..], b"stamp"))
                    {
                        page.stamps
                            .push(String::from_utf8_lossy(stamp).into_owned());
                    }
                } else {
                    page.ids.push(String::new());
                }
            }
            b"iq" if attr(el, b"id") == Some(id.as_bytes()) => {
                page.ok = attr(el, b"type") == Some(b"result") && contains(el, b"<fin");
                return Ok(page);
            }
            _ => {}
        }
    }
}

pub(crate) fn start_form(stamp: &str) -> String {
    format!("<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field><field var='start'><value>{stamp}</value></field></x>")
}

async fn drive(
    mut s: Session,
    kind: QueryKind,
    max: u32,
    warm_end: Instant,
    end: Instant,
) -> Outcome {
    let mut o = Outcome::default();
    if let Err(e) = drive_inner(&mut s, kind, max, warm_end, end, &mut o).await {
        o.failure = Some(format!("{e:#}"));
        return o;
    }
    s.close().await;
    o
}

async fn drive_inner(
    s: &mut Session,
    kind: QueryKind,
    max: u32,
    warm_end: Instant,
    end: Instant,
    o: &mut Outcome,
) -> anyhow::Result<()> {
    // Learn ids and timestamps from the newest and the oldest page.
    let newest = query(s, 0, "", "<before/>", max, true).await?;
    let oldest = query(s, 1, "", "", max, true).await?;
    if !newest.ok || !oldest.ok {
        bail!("the first queries failed: does the server support {MAM}?");
    }
    let ids: Vec<String> = newest.ids.into_iter().chain(oldest.ids).collect();
    let stamps: Vec<String> = newest.stamps.into_iter().chain(oldest.stamps).collect();
    if ids.is_empty() {
        bail!("the archive of {} is empty: fill it first (chat with archiving on, or `halyard-bench archive`)", s.jid);
    }
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut qid = 2u64;
    let mut turn = 0u32;
    while Instant::now() < end {
        let k = match kind {
            QueryKind::Mixed => {
                turn += 1;
                [QueryKind::Rsm, QueryKind::Range, QueryKind::Last][(turn % 3) as usize]
            }
            k => k,
        };
        let (form, rsm) = match k {
            QueryKind::Range if !stamps.is_empty() => (
                start_form(
                    stamps
                        .choose(&mut rng)
                        .map(String::as_str)
                        .unwrap_or_default(),
                ),
                String::new(),
            ),
            QueryKind::Last => (String::new(), "<before/>".to_string()),
            _ => {
                let id = ids.choose(&mut rng).map(String::as_str).unwrap_or_default();
                let rsm = if rng.gen_bool(0.5) {
                    format!("<after>{id}</after>")
                } else {
                    format!("<before>{id}</before>")
                };
                (String::new(), rsm)
            }
        };
        let t = Instant::now();
        let page = query(s, qid, &form, &rsm, max, false).await?;
        let took = t.elapsed();
        qid += 1;
        if t >= warm_end && t < end {
            if page.ok {
                o.queries += 1;
                o.results += page.ids.len() as u64;
                o.lat.record(took);
            } else {
                o.errors.add("query-error");
            }
        }
    }
    Ok(())
}

pub async fn run(a: MamArgs) -> anyhow::Result<()> {
    let c = &a.c;
    let t = Arc::new(c.target()?);
    println!(
        "mam: {} sessions, {:?} queries of {} items, {} s warm-up + {} s measured, {}",
        a.sessions,
        a.query,
        a.max,
        a.warmup,
        a.duration,
        if c.tls { "STARTTLS" } else { "plain" }
    );
    let (sessions, login_lat, login_errors) = login_all(c, &t, a.sessions, false).await;
    c.save_cache(&t)?;
    println!(
        "logins: {} ok, errors {}; latency {}",
        login_lat.count(),
        login_errors.line(),
        login_lat.line()
    );
    if login_lat.count() == 0 {
        bail!("no session logged in");
    }
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(a.warmup);
    let end = warm_end + Duration::from_secs_f64(a.duration);
    let tasks: Vec<_> = sessions
        .into_iter()
        .flatten()
        .map(|s| tokio::spawn(drive(s, a.query, a.max, warm_end, end)))
        .collect();
    tokio::time::sleep_until(warm_end.into()).await;
    let s1 = Sample::take(c.pid);
    tokio::time::sleep_until(end.into()).await;
    let s2 = Sample::take(c.pid);
    let mut lat = Latency::new();
    let mut errors = login_errors.clone();
    let (mut queries, mut results) = (0u64, 0u64);
    let mut failures = Vec::new();
    for task in tasks {
        let o = task.await.context("a query task panicked")?;
        lat.merge(&o.lat);
        errors.merge(&o.errors);
        queries += o.queries;
        results += o.results;
        if let Some(f) = o.failure {
            errors.add("session-failed");
            failures.push(f);
        }
    }
    let (server_cpu, own_cpu, wall) = procfs::cpu_between(&s1, &s2);
    let qps = queries as f64 / a.duration.max(1e-9);
    println!(
        "queries: {queries} in {} s: {qps:.1} queries/s, {:.0} results/s ({:.1} per page)",
        a.duration,
        results as f64 / a.duration.max(1e-9),
        results as f64 / queries.max(1) as f64
    );
    println!("query latency: {}", lat.line());
    println!("errors: {}", errors.line());
    if let Some(f) = failures.first() {
        println!("  first session failure: {f}");
    }
    println!("window {}", cpu_line(&s1, &s2));
    let per_q = server_cpu
        .filter(|_| queries > 0)
        .map(|c| c * 1e3 / queries as f64);
    if let Some(ms) = per_q {
        println!("  server CPU per query: {ms:.3} ms");
    }
    let mut m = c.json("mam");
    m.insert(
        "params".into(),
        json!({"sessions": a.sessions, "query": format!("{:?}", a.query).to_lowercase(), "max": a.max,
               "warmup_s": a.warmup, "duration_s": a.duration, "first": c.first}),
    );
    m.insert("queries".into(), json!(queries));
    m.insert("queries_per_s".into(), json!(qps));
    m.insert("results".into(), json!(results));
    m.insert("latency".into(), lat.json());
    m.insert("errors".into(), errors.json());
    m.insert("window_wall_s".into(), json!(wall));
    m.insert("server_cpu_s".into(), json!(server_cpu));
    m.insert("server_cpu_ms_per_query".into(), json!(per_q));
    m.insert("tool_cpu_s".into(), json!(own_cpu));
    c.write_json(m)?;
    Ok(())
}
