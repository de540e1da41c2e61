//! Abuse limits that are not about one stanza's shape: connections per address and in total,
//! the rate of new connections per address, and the read rate of a session (bytes and stanzas
//! per second, shaped like Prosody's mod_limits: a fast sender is read more slowly, not cut
//! off). The `[limits]` section of config.toml sets them; every default is meant to leave heavy
//! legitimate use alone (a load test from one address, a mobile carrier's NAT).
//!
//! Hand-written: the crates that rate-limit (governor and friends) count requests, not a byte
//! budget that may go into debt by a whole stanza, and the connection table must release an
//! address's slot when the connection's task ends, which is a guard, not a limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::LimitsConfig;
use crate::stream::{StreamError, StreamErrorKind};

/// A token bucket: `rate` tokens per second, holding at most `burst`. A charge may take it
/// below zero (a stanza is read whole before its size is known); nothing more is taken until
/// it has refilled to zero.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }

    /// Takes `n` tokens if there are that many; otherwise takes none.
    pub fn try_take(&mut self, n: f64, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if need be.
    pub fn charge(&mut self, n: f64, rate: f64, burst: f64, now: Instant) {
        self.refill(rate, burst, now);
        self.tokens -= n;
    }

    /// When the bucket is out of debt; `None` when it is not in debt.
    pub fn ready_at(&self, rate: f64) -> Option<Instant> {
        if self.tokens >= 0.0 || rate <= 0.0 {
            return None;
        }
        Some(self.at + Duration::from_secs_f64(-self.tokens / rate))
    }

    /// Whether the bucket is full at `now` (nothing to remember about its owner).
    fn is_full(&self, rate: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens + dt * rate >= burst
    }
}

/// The key connections are counted under: the IPv4 address, or the /64 an IPv6 address is in
/// (one subscriber usually holds a whole /64). IPv4-mapped IPv6 addresses count as IPv4.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds `max_connections`.
    Total(usize),
    /// The address holds `connections_per_ip`.
    PerAddress(u32),
    /// The address opened connections faster than `new_connections_per_ip_per_sec`.
    Rate(u32),
}

impl Refusal {
    /// The stream error a refused XMPP connection gets: `resource-constraint` when the server is
    /// full, `policy-violation` when the address went over its share; the text names the limit.
    pub fn stream_error(&self) -> StreamError {
        match *self {
            Refusal::Total(n) => StreamError::new(
                StreamErrorKind::ResourceConstraint,
                format!("the server holds its limit of {n} connections (limits.max_connections); try again later"),
            ),
            Refusal::PerAddress(n) => StreamError::new(
                StreamErrorKind::PolicyViolation,
                format!("too many connections from your address: at most {n} at once (limits.connections_per_ip)"),
            ),
            Refusal::Rate(n) => StreamError::new(
                StreamErrorKind::PolicyViolation,
                format!("too many new connections from your address: at most {n} per second (limits.new_connections_per_ip_per_sec)"),
            ),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Total(_) => "max_connections",
            Refusal::PerAddress(_) => "connections_per_ip",
            Refusal::Rate(_) => "new_connections_per_ip",
        }
    }
}

struct PerAddress {
    open: u32,
    new: Bucket,
}

/// Counts open connections in total and per address, and new connections per address.
/// Every listener asks it before a connection gets a session; the returned [`ConnSlot`] gives
/// the slot back when dropped.
pub struct ConnLimiter {
    max_total: usize,
    per_ip: u32,
    rate: f64,
    burst: f64,
    total: AtomicUsize,
    addresses: Mutex<HashMap<IpAddr, PerAddress>>,
    /// Refused connections being told why (bounded, see [`ConnLimiter::refusal_slot`]).
    refusing: AtomicUsize,
}

/// Refused connections told why at once; beyond it they are closed without a word, so that a
/// flood of refusals cannot itself hold many sockets open.
const MAX_REFUSING: usize = 256;

/// Above this many remembered addresses, those with no connection and a full bucket are
/// forgotten.
const PRUNE_AT: usize = 4096;

impl ConnLimiter {
    pub fn new(cfg: &LimitsConfig) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max_total: cfg.effective_max_connections(),
            per_ip: cfg.connections_per_ip,
            rate: cfg.new_connections_per_ip_per_sec as f64,
            burst: cfg.new_connections_burst as f64,
            total: AtomicUsize::new(0),
            addresses: Mutex::new(HashMap::new()),
            refusing: AtomicUsize::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Admits a connection from `ip`, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Refusal> {
        let key = address_key(ip);
        let now = Instant::now();
        let mut map = match self.addresses.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if self.max_total > 0 && self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(Refusal::Total(self.max_total));
        }
        if map.len() >= PRUNE_AT {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, a| a.open > 0 || !a.new.is_full(rate, burst, now));
        }
        let a = map.entry(key).or_insert_with(|| PerAddress {
            open: 0,
            new: Bucket::full(self.burst, now),
        });
        if self.per_ip > 0 && a.open >= self.per_ip {
            return Err(Refusal::PerAddress(self.per_ip));
        }
        if self.rate > 0.0 && !a.new.try_take(1.0, self.rate, self.burst, now) {
            return Err(Refusal::Rate(self.rate as u32));
        }
        a.open += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnSlot {
            limiter: self.clone(),
            key,
        })
    }

    fn release(&self, key: IpAddr) {
        self.total.fetch_sub(1, Ordering::Relaxed);
        let mut map = match self.addresses.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(a) = map.get_mut(&key) {
            a.open = a.open.saturating_sub(1);
            if a.open == 0 && a.new.is_full(self.rate, self.burst, Instant::now()) {
                map.remove(&key);
            }
        }
    }

    /// A slot for telling a refused connection why, if fewer than [`MAX_REFUSING`] are being
    /// told now.
    pub fn refusal_slot(self: &Arc<Self>) -> Option<RefusalSlot> {
        let n = self.refusing.fetch_add(1, Ordering::Relaxed);
        if n >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(RefusalSlot(self.clone()))
    }
}

/// One admitted connection; dropping it frees the slot.
pub struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limiter.release(self.key);
    }
}

pub struct RefusalSlot(Arc<ConnLimiter>);

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Time a refused connection gets to send its stream header (and finish a TLS handshake) before
/// it is closed without being told why.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// The read shaper of one bound session: a byte bucket and a stanza bucket. After each stanza
/// is read it is charged; while either bucket is in debt the session reads nothing more (its
/// outbound traffic goes on), so TCP pushes back on the sender.
#[derive(Debug, Clone, Copy)]
pub struct Shaper {
    bytes: Bucket,
    stanzas: Bucket,
    /// The transport's byte count when the last stanza was charged.
    pub seen: u64,
}

/// The rates a [`Shaper`] applies (0: unlimited).
#[derive(Debug, Clone, Copy)]
pub struct ShaperRates {
    pub bytes_per_sec: f64,
    pub byte_burst: f64,
    pub stanzas_per_sec: f64,
    pub stanza_burst: f64,
}

impl ShaperRates {
    pub fn from_config(c: &LimitsConfig) -> ShaperRates {
        ShaperRates {
            bytes_per_sec: c.read_bytes_per_sec as f64,
            byte_burst: c.read_burst_bytes.max(1) as f64,
            stanzas_per_sec: c.stanzas_per_sec as f64,
            stanza_burst: c.stanza_burst.max(1) as f64,
        }
    }
}

impl Shaper {
    pub fn new(r: &ShaperRates, now: Instant) -> Shaper {
        Shaper {
            bytes: Bucket::full(r.byte_burst, now),
            stanzas: Bucket::full(r.stanza_burst, now),
            seen: 0,
        }
    }

    /// Charges one stanza read at `now`, when the transport had read `bytes_in` in all.
    pub fn charge_read(&mut self, r: &ShaperRates, bytes_in: u64, now: Instant) {
        let n = bytes_in.saturating_sub(self.seen);
        self.seen = bytes_in;
        self.charge(r, n, now);
    }

    /// Charges one stanza of `bytes` bytes read at `now`.
    pub fn charge(&mut self, r: &ShaperRates, bytes: u64, now: Instant) {
        if r.bytes_per_sec > 0.0 {
            self.bytes
                .charge(bytes as f64, r.bytes_per_sec, r.byte_burst, now);
        }
        if r.stanzas_per_sec > 0.0 {
            self.stanzas
                .charge(1.0, r.stanzas_per_sec, r.stanza_burst, now);
        }
    }

    /// When reading may go on; `None` when it may now.
    pub fn ready_at(&self, r: &ShaperRates) -> Option<Instant> {
        let a = if r.bytes_per_sec > 0.0 {
            self.bytes.ready_at(r.bytes_per_sec)
        } else {
            None
        };
        let b = if r.stanzas_per_sec > 0.0 {
            self.stanzas.ready_at(r.stanzas_per_sec)
        } else {
            None
        };
        a.max(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            max_connections: 3,
            connections_per_ip: 2,
            new_connections_per_ip_per_sec: 1,
            new_connections_burst: 3,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn per_address_total_and_rate() {
        let l = ConnLimiter::new(&cfg());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::PerAddress(2)));
        let s3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Refusal::Total(3)));
        drop(s3);
        assert_eq!(l.open(), 2);
        drop(s1);
        // a has used 2 of its burst of 3 plus the refused attempt took none.
        let s4 = l.admit(a).unwrap();
        drop(s4);
        drop(s2);
        assert_eq!(l.admit(a).err(), Some(Refusal::Rate(1)));
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = ConnLimiter::new(&cfg());
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _s1 = l.admit(x).unwrap();
        let _s2 = l.admit(y).unwrap();
        assert_eq!(l.admit(x).err(), Some(Refusal::PerAddress(2)));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn zero_means_unlimited() {
        let c = LimitsConfig {
            max_connections: usize::MAX,
            connections_per_ip: 0,
            new_connections_per_ip_per_sec: 0,
            ..LimitsConfig::default()
        };
        let l = ConnLimiter::new(&c);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..10_000).map(|_| l.admit(a).unwrap()).collect();
        assert_eq!(l.open(), 10_000);
        drop(slots);
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn shaper_goes_into_debt_and_recovers() {
        let r = ShaperRates {
            bytes_per_sec: 1000.0,
            byte_burst: 2000.0,
            stanzas_per_sec: 10.0,
            stanza_burst: 5.0,
        };
        let t0 = Instant::now();
        let mut s = Shaper::new(&r, t0);
        s.charge(&r, 1500, t0);
        assert!(s.ready_at(&r).is_none());
        s.charge(&r, 1500, t0);
        let at = s.ready_at(&r).unwrap();
        assert!((at - t0).as_millis() >= 999 && (at - t0).as_millis() <= 1001);
        // Half a second later the byte debt is half paid.
        let t1 = t0 + Duration::from_millis(500);
        s.charge(&r, 0, t1);
        let at = s.ready_at(&r).unwrap();
        assert!((at - t0).as_millis() >= 999 && (at - t0).as_millis() <= 1001);
        // Stanzas: 5 at once pass, the 6th and 7th put it in debt by 2 → 0.2 s.
        let mut s = Shaper::new(
            &ShaperRates {
                bytes_per_sec: 0.0,
                ..r
            },
            t0,
        );
        let r0 = ShaperRates {
            bytes_per_sec: 0.0,
            ..r
        };
        for _ in 0..5 {
            s.charge(&r0, 10, t0);
        }
        assert!(s.ready_at(&r0).is_none());
        s.charge(&r0, 10, t0);
        s.charge(&r0, 10, t0);
        let at = s.ready_at(&r0).unwrap();
        assert_eq!((at - t0).as_millis(), 200);
    }
}
