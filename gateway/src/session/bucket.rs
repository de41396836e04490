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

/// Token buckets by key (a hash), all with one rate, for limits on things that are not a
/// session's: logins per device, logins per user. An entry exists only while its bucket owes
/// something: a bucket that has refilled is the same as none, so a shard sweeps such entries
/// out whenever it has doubled since its last sweep, and [`sweep`](Self::sweep) (the workers
/// call it once a second) empties and shrinks what has refilled. Memory follows the recent
/// rate of what is limited, not the number of keys ever seen (a login burst's table is gone a
/// few seconds after it).
#[derive(Debug)]
pub struct BucketTable {
    shards: Box<[parking_lot::Mutex<Shard>]>,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    buckets: std::collections::HashMap<u64, TokenBucket>,
    /// Sweep when the map reaches this many entries.
    sweep_at: usize,
}

const TABLE_SHARDS: usize = 16;
const MIN_SWEEP: usize = 256;

impl Default for BucketTable {
    fn default() -> Self {
        BucketTable::new()
    }
}

impl BucketTable {
    pub fn new() -> BucketTable {
        BucketTable {
            shards: (0..TABLE_SHARDS).map(|_| Default::default()).collect(),
            hasher: Default::default(),
        }
    }

    /// Takes one token from the bucket of `key` (see [`TokenBucket::take`]).
    pub fn take<K: std::hash::Hash + ?Sized>(
        &self,
        key: &K,
        now_ms: u64,
        rate: u32,
        burst: u32,
    ) -> Option<u32> {
        use std::hash::BuildHasher;
        if rate == 0 {
            return None;
        }
        let h = self.hasher.hash_one(key);
        let mut shard = self.shards[(h as usize) % TABLE_SHARDS].lock();
        if shard.buckets.len() >= shard.sweep_at.max(MIN_SWEEP) {
            shard.buckets.retain(|_, b| !b.is_full(now_ms, rate));
            shard.sweep_at = shard.buckets.len() * 2;
        }
        shard
            .buckets
            .entry(h)
            .or_default()
            .take(now_ms, rate, burst)
    }

    /// Drops every bucket that has refilled by `now_ms` and gives back the room they took.
    pub fn sweep(&self, now_ms: u64, rate: u32) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            if shard.buckets.is_empty() && shard.buckets.capacity() == 0 {
                continue;
            }
            shard.buckets.retain(|_, b| !b.is_full(now_ms, rate));
            let len = shard.buckets.len();
            if shard.buckets.capacity() > 2 * len + MIN_SWEEP {
                shard.buckets.shrink_to(2 * len);
            }
            shard.sweep_at = len * 2;
        }
    }

    /// Bytes the table holds in its maps (capacity, not just entries).
    pub fn capacity(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().buckets.capacity())
            .sum()
    }

    /// Keys with a bucket that owes something (or has not been swept yet).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().buckets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::{BucketTable, TokenBucket};

    #[test]
    fn a_table_limits_each_key_and_forgets_the_refilled() {
        let t = BucketTable::new();
        for _ in 0..3 {
            assert_eq!(t.take("alice", 0, 1, 3), None);
        }
        assert_eq!(t.take("alice", 0, 1, 3), Some(1000));
        assert_eq!(t.take("bob", 0, 1, 3), None, "another key, its own bucket");
        // 10,000 keys that owe a token are all kept...
        for i in 0..10_000u32 {
            t.take(&i, 10_000, 1, 3);
        }
        assert!((10_000..=10_002).contains(&t.len()));
        // ...and swept out once refilled, as new keys come: not 20,002.
        for i in 10_000..20_000u32 {
            t.take(&i, 1_000_000, 1, 3);
        }
        assert!(t.len() < 15_000, "{}", t.len());
        // Once everything has refilled, a sweep empties the table and gives the room back.
        t.sweep(10_000_000, 1);
        assert_eq!(t.len(), 0);
        assert!(t.capacity() <= 16 * 2 * 256, "{}", t.capacity());
    }
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
    }
}
