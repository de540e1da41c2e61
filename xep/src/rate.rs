//! Fixed-window counters per key (account, address, device): how many times something happened
//! in the current window. Used for the limits that are "N per minute/hour": archive queries,
//! failed logins, push notifications per device. Hand-written: it is a map of counters, and the
//! rate-limiting crates count per key without letting us read the count (the login throttle
//! grows its delay with it).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered before those whose window has ended are dropped.
const PRUNE_AT: usize = 10_000;

pub struct Windows<K> {
    window: Duration,
    map: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K: Hash + Eq> Windows<K> {
    pub fn new(window: Duration) -> Self {
        Windows {
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<K, (Instant, u32)>, Instant) -> R) -> R {
        let now = Instant::now();
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if map.len() >= PRUNE_AT {
            let w = self.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < w);
        }
        f(&mut map, now)
    }

    fn current(&self, e: &mut (Instant, u32), now: Instant) {
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
    }

    /// Counts one event for `key`; returns the count in the current window, this one included.
    pub fn count(&self, key: K) -> u32 {
        self.with(|map, now| {
            let e = map.entry(key).or_insert((now, 0));
            self.current(e, now);
            e.1 = e.1.saturating_add(1);
            e.1
        })
    }

    /// Counts one event for `key` if the window holds fewer than `limit`; otherwise counts
    /// nothing and returns how long until the window ends. A `limit` of 0 admits everything.
    pub fn admit(&self, key: K, limit: u32) -> Result<(), Duration> {
        if limit == 0 {
            return Ok(());
        }
        self.with(|map, now| {
            let e = map.entry(key).or_insert((now, 0));
            self.current(e, now);
            if e.1 >= limit {
                return Err(self.window.saturating_sub(now.duration_since(e.0)));
            }
            e.1 += 1;
            Ok(())
        })
    }

    /// The count in `key`'s current window and the time left in it, without counting.
    pub fn peek(&self, key: &K) -> Option<(u32, Duration)> {
        self.with(|map, now| {
            let (start, n) = *map.get(key)?;
            let left = self.window.checked_sub(now.duration_since(start))?;
            (!left.is_zero()).then_some((n, left))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_admits_and_peeks_per_key() {
        let w = Windows::new(Duration::from_secs(60));
        assert_eq!(w.count("a"), 1);
        assert_eq!(w.count("a"), 2);
        assert_eq!(w.count("b"), 1);
        assert_eq!(w.peek(&"a").map(|p| p.0), Some(2));
        assert!(w.admit("a", 3).is_ok());
        let left = w.admit("a", 3).unwrap_err();
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
        assert!(w.admit("b", 3).is_ok());
        assert!(w.admit("a", 0).is_ok(), "0 is no limit");
        assert_eq!(w.peek(&"c"), None);
    }

    #[test]
    fn a_new_window_starts_from_zero() {
        let w = Windows::new(Duration::from_millis(1));
        assert_eq!(w.count("a"), 1);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(w.count("a"), 1);
    }
}
