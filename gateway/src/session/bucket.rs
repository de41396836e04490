//! A token bucket in 8 bytes, for a session's uplinks and room requests and for logins.

/// A token bucket for a session's uplinks: 8 bytes, time in milliseconds of the gateway clock.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens spent and not yet refilled, in thousandths of a token.
    debt_milli: u32,
    /// When `debt_milli` was last brought up to date (gateway ms, truncated).
    at_ms: u32,
}

impl TokenBucket {
    /// Takes one token at `now_ms` with `rate` per second and `burst` above it. `None`: go
    /// ahead; `Some(ms)`: refused, a token is back in `ms`. `rate` 0 means no limit.
    pub fn take(&mut self, now_ms: u64, rate: u32, burst: u32) -> Option<u32> {
        if rate == 0 {
            return None;
        }
        let now = now_ms as u32;
        let elapsed = now.wrapping_sub(self.at_ms) as u64;
        let refill = elapsed.saturating_mul(rate as u64).min(u32::MAX as u64) as u32;
        self.debt_milli = self.debt_milli.saturating_sub(refill);
        self.at_ms = now;
        let cap = burst.max(1).saturating_mul(1000);
        if self.debt_milli + 1000 > cap {
            let missing = self.debt_milli + 1000 - cap;
            return Some(missing.div_ceil(rate).max(1));
        }
        self.debt_milli += 1000;
        None
    }

    /// The bucket in one word, for an atomic that is read without a lock.
    pub fn to_bits(self) -> u64 {
        (self.debt_milli as u64) << 32 | self.at_ms as u64
    }

    pub fn from_bits(bits: u64) -> TokenBucket {
        TokenBucket {
            debt_milli: (bits >> 32) as u32,
            at_ms: bits as u32,
        }
    }

    /// Thousandths of a token owed at `now_ms` (to move the bucket to another clock).
    pub fn debt_at(&self, now_ms: u64, rate: u32) -> u32 {
        let elapsed = (now_ms as u32).wrapping_sub(self.at_ms) as u64;
        let refill = elapsed.saturating_mul(rate as u64).min(u32::MAX as u64) as u32;
        self.debt_milli.saturating_sub(refill)
    }

    /// A bucket owing `debt_milli` at `now_ms` (of this clock).
    pub fn owing(debt_milli: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            debt_milli,
            at_ms: now_ms as u32,
        }
    }

    /// Whether the bucket is full again at `now_ms` (nothing spent is still owed): such an
    /// entry of a table of buckets can be dropped, a fresh one is the same.
    pub fn is_full(&self, now_ms: u64, rate: u32) -> bool {
        let elapsed = (now_ms as u32).wrapping_sub(self.at_ms) as u64;
        rate == 0 || elapsed.saturating_mul(rate as u64) >= self.debt_milli as u64
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::default();
        // rate 10/s, burst 3: three at once, the fourth waits 100 ms.
        for _ in 0..3 {
            assert_eq!(b.take(1_000, 10, 3), None);
        }
        assert_eq!(b.take(1_000, 10, 3), Some(100));
        assert_eq!(b.take(1_050, 10, 3), Some(50));
        assert_eq!(b.take(1_100, 10, 3), None);
        assert_eq!(b.take(1_100, 10, 3), Some(100));
        // A long pause refills to the burst, no further.
        for _ in 0..3 {
            assert_eq!(b.take(60_000, 10, 3), None);
        }
        assert!(b.take(60_000, 10, 3).is_some());
        assert_eq!(
            TokenBucket::default().take(0, 0, 0),
            None,
            "rate 0: no limit"
        );
        assert_eq!(TokenBucket::from_bits(b.to_bits()), b);
    }
}
