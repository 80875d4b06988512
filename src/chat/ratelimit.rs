//! Rate limiting: a token bucket for chat messages and a sliding-window failure counter for
//! logins. Time is passed in, so both are deterministic under test.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Classic token bucket: `rate` tokens per second up to `burst`. A rate of 0 disables it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if available.
    pub fn try_take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts failures per key in a sliding window; a key with `max` failures inside the window is
/// blocked until the oldest of them leaves it (the backoff). Checked before any hashing, so a
/// blocked attacker costs us no CPU.
///
/// Attempts still being hashed count as failures until their result is known
/// ([`FailureThrottle::begin`] / [`FailureThrottle::finish`]): otherwise 500 guesses sent at
/// once would all pass the check before the first one failed.
#[derive(Debug)]
pub struct FailureThrottle<K> {
    window: Duration,
    max: usize,
    failures: HashMap<K, VecDeque<Instant>>,
    in_flight: HashMap<K, usize>,
}

impl<K: Hash + Eq + Clone> FailureThrottle<K> {
    pub fn new(max: usize, window: Duration) -> Self {
        FailureThrottle {
            window,
            max,
            failures: HashMap::new(),
            in_flight: HashMap::new(),
        }
    }

    pub fn is_blocked(&mut self, key: &K, now: Instant) -> bool {
        if self.max == 0 {
            return false;
        }
        let window = self.window;
        let pending = self.in_flight.get(key).copied().unwrap_or(0);
        let failed = match self.failures.get_mut(key) {
            Some(q) => {
                while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
                    q.pop_front();
                }
                q.len()
            }
            None => 0,
        };
        failed + pending >= self.max
    }

    /// An attempt for `key` is being checked; it counts against the limit until
    /// [`FailureThrottle::finish`].
    pub fn begin(&mut self, key: K) {
        if self.max != 0 {
            *self.in_flight.entry(key).or_default() += 1;
        }
    }

    /// The attempt begun for `key` has its result (record the failure separately).
    pub fn finish(&mut self, key: &K) {
        if let Some(n) = self.in_flight.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(key);
            }
        }
    }

    pub fn record_failure(&mut self, key: K, now: Instant) {
        if self.max == 0 {
            return;
        }
        let q = self.failures.entry(key).or_default();
        q.push_back(now);
        // Only the newest `max` matter for the decision; bound memory per key.
        while q.len() > self.max {
            q.pop_front();
        }
    }

    /// Drops keys whose failures have all expired (called from the tick), bounding memory.
    pub fn prune(&mut self, now: Instant) {
        let window = self.window;
        self.failures.retain(|_, q| {
            q.back()
                .is_some_and(|t| now.saturating_duration_since(*t) < window)
        });
    }

    /// Keys currently remembered (to check that pruning bounds memory).
    pub fn tracked(&self) -> usize {
        self.failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bursts_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3.0, t0);
        assert!((0..3).all(|_| b.try_take(1.0, 3.0, t0)));
        assert!(!b.try_take(1.0, 3.0, t0));
        assert!(b.try_take(1.0, 3.0, t0 + Duration::from_millis(1001)));
        assert!(!b.try_take(1.0, 3.0, t0 + Duration::from_millis(1002)));
        assert!((0..100).all(|_| b.try_take(0.0, 3.0, t0)));
    }

    #[test]
    fn throttle_blocks_then_expires() {
        let t0 = Instant::now();
        let mut t = FailureThrottle::new(2, Duration::from_secs(60));
        assert!(!t.is_blocked(&"a", t0));
        t.record_failure("a", t0);
        t.record_failure("a", t0);
        assert!(t.is_blocked(&"a", t0));
        assert!(!t.is_blocked(&"b", t0));
        assert!(!t.is_blocked(&"a", t0 + Duration::from_secs(61)));
        t.prune(t0 + Duration::from_secs(61));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn attempts_in_flight_count_until_finished() {
        let t0 = Instant::now();
        let mut t = FailureThrottle::new(2, Duration::from_secs(60));
        t.begin("a");
        assert!(!t.is_blocked(&"a", t0));
        t.begin("a");
        assert!(
            t.is_blocked(&"a", t0),
            "two guesses in flight use the allowance"
        );
        t.finish(&"a");
        assert!(!t.is_blocked(&"a", t0), "the first one succeeded");
        t.record_failure("a", t0);
        assert!(t.is_blocked(&"a", t0));
        t.finish(&"a");
        assert!(!t.is_blocked(&"a", t0 + Duration::from_secs(61)));
    }
}
