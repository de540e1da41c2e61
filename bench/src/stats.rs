//! Figures the scenarios report: latency histograms, error counts, pacing, and the JSON lines
//! written with `--json`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

static START: OnceLock<Instant> = OnceLock::new();

/// Fixes the tool's time origin; call once at startup (later calls keep the first origin).
pub fn init_clock() {
    START.get_or_init(Instant::now);
}

/// The instant the tool's monotonic clock counts from.
pub fn origin() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Monotonic nanoseconds since the tool started: what message bodies carry as send time. Every
/// session lives in this one process, so sender and receiver read the same clock.
pub fn now_ns() -> u64 {
    origin().elapsed().as_nanos() as u64
}

/// The `now_ns()` value of an instant (0 for instants before the origin).
pub fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(origin()).as_nanos() as u64
}

/// A latency histogram in nanoseconds, 1 ns to 1 hour at 3 significant digits (HdrHistogram:
/// fixed memory, O(1) record, exact merge across tasks). Larger values are clamped to the top.
pub struct Latency {
    h: Histogram<u64>,
}

const HIGHEST_NS: u64 = 3_600_000_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // The bounds are constants that HdrHistogram accepts (low >= 1, high >= 2 * low,
        // sigfig <= 5), so this cannot fail.
        let h = Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("constant histogram bounds");
        Latency { h }
    }

    pub fn record(&mut self, d: Duration) {
        self.record_ns(d.as_nanos().min(u128::from(HIGHEST_NS)) as u64);
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.h.saturating_record(ns.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: `add` only fails on a value out of range, which
        // saturating_record never stores.
        let _ = self.h.add(&other.h);
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The value at quantile `q` (0..=1) in milliseconds; 0 for an empty histogram.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.value_at_quantile(q) as f64 / 1e6
    }

    pub fn max_ms(&self) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.max() as f64 / 1e6
    }

    pub fn mean_ms(&self) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.mean() / 1e6
    }

    /// `p50=… p90=… p99=… max=… ms`.
    pub fn line(&self) -> String {
        format!(
            "n={} p50={:.3} p90={:.3} p99={:.3} p99.9={:.3} max={:.3} mean={:.3} ms",
            self.count(),
            self.quantile_ms(0.5),
            self.quantile_ms(0.9),
            self.quantile_ms(0.99),
            self.quantile_ms(0.999),
            self.max_ms(),
            self.mean_ms()
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "n": self.count(),
            "p50_ms": self.quantile_ms(0.5),
            "p90_ms": self.quantile_ms(0.9),
            "p99_ms": self.quantile_ms(0.99),
            "p999_ms": self.quantile_ms(0.999),
            "max_ms": self.max_ms(),
            "mean_ms": self.mean_ms(),
        })
    }
}

/// Errors by kind ("connect", "tls", "auth", "timeout", …).
#[derive(Default, Debug, Clone)]
pub struct Errors(pub BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, kind: &str) {
        *self.0.entry(kind.to_string()).or_default() += 1;
    }

    pub fn merge(&mut self, o: &Errors) {
        for (k, v) in &o.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn line(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn json(&self) -> Value {
        json!(self.0)
    }
}

/// Paces work at `rate` items per second with a timer, not a busy loop: every tick (at most
/// every millisecond, tokio's timer granularity) says how many items are due since the start, so
/// rates above 1000/s are met in small bursts and a late tick catches up. Rate 0: unpaced.
pub struct Pacer {
    rate: f64,
    start: Instant,
    done: u64,
    tick: Option<tokio::time::Interval>,
}

impl Pacer {
    /// `phase` delays the first tick (spreads many pacers over one period).
    pub fn new(rate: f64, phase: Duration) -> Self {
        let start = Instant::now() + phase;
        let tick = (rate > 0.0).then(|| {
            let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_millis(1));
            let mut i = tokio::time::interval_at(start.into(), period);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            i
        });
        Pacer {
            rate,
            start,
            done: 0,
            tick,
        }
    }

    pub fn unpaced(&self) -> bool {
        self.tick.is_none()
    }

    /// Waits for the next tick; returns how many items are due now (possibly 0). Cancel-safe.
    /// Never returns for an unpaced pacer (select on it only when paced).
    pub async fn due(&mut self) -> u64 {
        match &mut self.tick {
            Some(t) => {
                t.tick().await;
                let should = (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1;
                let n = should.saturating_sub(self.done);
                self.done += n;
                n
            }
            None => std::future::pending().await,
        }
    }
}

/// Appends one JSON object as a line to `path` (created if missing).
pub fn append_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} for --json", path.display()))?;
    let mut line = serde_json::to_vec(v).context("serialising the run's JSON")?;
    line.push(b'\n');
    f.write_all(&line)
        .with_context(|| format!("appending to {}", path.display()))?;
    Ok(())
}

/// Seconds since the Unix epoch, for the JSON record.
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut l = Latency::new();
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.count(), 1000);
        // 3 significant digits: within 0.1 %.
        let near = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 1e-9;
        assert!(near(l.quantile_ms(0.5), 500.0), "{}", l.quantile_ms(0.5));
        assert!(near(l.quantile_ms(0.9), 900.0), "{}", l.quantile_ms(0.9));
        assert!(near(l.quantile_ms(0.99), 990.0), "{}", l.quantile_ms(0.99));
        assert!(near(l.max_ms(), 1000.0), "{}", l.max_ms());
        assert!(near(l.mean_ms(), 500.5), "{}", l.mean_ms());
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_max() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for _ in 0..99 {
            a.record_ns(1_000);
        }
        b.record_ns(50_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 100);
        assert!((a.quantile_ms(0.5) - 0.001).abs() < 1e-5);
        assert!((a.max_ms() - 50.0).abs() < 0.05);
        // p99 of 100 values is the 99th: still 1 µs; p99.9 reaches the outlier.
        assert!(a.quantile_ms(0.99) < 0.01);
        assert!(a.quantile_ms(0.999) > 49.0);
    }

    #[test]
    fn empty_and_out_of_range() {
        let mut l = Latency::new();
        assert_eq!(l.quantile_ms(0.99), 0.0);
        assert_eq!(l.max_ms(), 0.0);
        l.record_ns(0);
        l.record(Duration::from_secs(10_000));
        assert_eq!(l.count(), 2);
        assert!(l.max_ms() >= 3_599_000.0);
    }

    #[test]
    fn errors_merge_and_print() {
        let mut a = Errors::default();
        a.add("auth");
        a.add("auth");
        let mut b = Errors::default();
        b.add("connect");
        a.merge(&b);
        assert_eq!(a.total(), 3);
        assert_eq!(a.line(), "auth=2 connect=1");
    }
}
