//! The rate limit of failed authentication: a token bucket per peer address.
//!
//! Invariants:
//! * A peer whose bucket is empty is refused (429) before its credentials
//!   are parsed or hashed, so a storm of bad tokens costs a map lookup each.
//! * Only failures take from a bucket; a valid token never does.
//! * The map is bounded ([`MAX_PEERS`]): full buckets carry no information
//!   and are dropped first; when every tracked peer is failing, the fullest
//!   is dropped (it is the least limited).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Peers tracked at once.
const MAX_PEERS: usize = 4096;

/// How many failed authentications a peer may make: `burst` at once, then
/// one more every `1 / per_second` seconds.
///
/// ```
/// let limit = graft_http::trust::RateLimit { burst: 10, per_second: 1.0 };
/// assert!(limit.burst > 0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Failures a fresh peer may make at once.
    pub burst: u32,
    /// Failures regained per second.
    pub per_second: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            burst: 20,
            per_second: 2.0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by peer; `None` (a peer the server could not name) shares one.
pub(crate) struct Limiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<Option<IpAddr>, Bucket>>,
    /// How many peers `buckets` holds, readable without its lock: while no
    /// peer has failed, a request is let through without taking the lock
    /// (which every request on every server thread would otherwise share).
    tracked: AtomicUsize,
}

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Limiter {
        Limiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
            tracked: AtomicUsize::new(0),
        }
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let gained = now.saturating_duration_since(b.at).as_secs_f64() * self.limit.per_second;
        b.tokens = (b.tokens + gained).min(f64::from(self.limit.burst));
        b.at = now;
    }

    /// `Err(retry_after)` when `peer` has no failure left.
    pub(crate) fn check(&self, peer: Option<IpAddr>) -> Result<(), Duration> {
        if self.tracked.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let mut map = self.buckets.lock();
        let Some(b) = map.get_mut(&peer) else {
            return Ok(());
        };
        self.refill(b, Instant::now());
        if b.tokens >= f64::from(self.limit.burst) {
            // Refilled: the bucket says nothing any more. Dropping it lets
            // requests skip the lock again once every failing peer is back
            // to full.
            map.remove(&peer);
            self.tracked.store(map.len(), Ordering::Release);
            Ok(())
        } else if b.tokens >= 1.0 {
            Ok(())
        } else {
            let wait = if self.limit.per_second > 0.0 {
                (1.0 - b.tokens) / self.limit.per_second
            } else {
                3600.0
            };
            Err(Duration::from_secs_f64(wait.clamp(0.001, 3600.0)))
        }
    }

    /// Takes one failure from `peer`'s bucket.
    pub(crate) fn failed(&self, peer: Option<IpAddr>) {
        let now = Instant::now();
        let mut map = self.buckets.lock();
        if map.len() >= MAX_PEERS && !map.contains_key(&peer) {
            let burst = f64::from(self.limit.burst);
            for b in map.values_mut() {
                self.refill(b, now);
            }
            map.retain(|_, b| b.tokens < burst);
            if map.len() >= MAX_PEERS {
                if let Some(fullest) = map
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(k, _)| *k)
                {
                    map.remove(&fullest);
                }
            }
        }
        let b = map.entry(peer).or_insert(Bucket {
            tokens: f64::from(self.limit.burst),
            at: now,
        });
        self.refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
        self.tracked.store(map.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_limited_after_its_burst_and_others_are_not() {
        let l = Limiter::new(RateLimit {
            burst: 3,
            per_second: 0.0,
        });
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
            l.failed(a);
        }
        assert!(l.check(a).is_err());
        assert!(l.check(b).is_ok());
    }

    #[test]
    fn buckets_refill_with_time() {
        let l = Limiter::new(RateLimit {
            burst: 1,
            per_second: 1000.0,
        });
        l.failed(None);
        assert_eq!(l.tracked.load(Ordering::Acquire), 1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(l.check(None).is_ok());
        // Full again: dropped, so requests skip the lock once more.
        assert_eq!(l.tracked.load(Ordering::Acquire), 0);
        assert!(l.buckets.lock().is_empty());
    }

    #[test]
    fn the_map_stays_bounded() {
        let l = Limiter::new(RateLimit {
            burst: 2,
            per_second: 0.0,
        });
        for i in 0..(MAX_PEERS as u32 + 100) {
            l.failed(Some(IpAddr::from(i.to_be_bytes())));
        }
        assert!(l.buckets.lock().len() <= MAX_PEERS);
    }
}
