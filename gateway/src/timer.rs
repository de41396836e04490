//! Deadlines for a million connections without a million OS timers.
//!
//! One coarse timing wheel per worker thread, one-second slots. A connection is in the wheel
//! at most once per deadline it has, as a 4-byte id; activity never touches the wheel: a frame
//! from the client only updates the connection's `last_rx`. When a slot comes due, each id in
//! it is checked against the connection's real deadline (computed from `last_rx`): if it has
//! passed, the connection times out; if not, the id is put back in the slot of that deadline.
//! So a connection that heartbeats every 30 s with a 90 s timeout costs one check and one
//! re-insert per 90 s, whatever its traffic; the worker sleeps until the next non-empty slot.
//! Stale ids (a closed connection whose id was reused) cost one check and are harmless.
//!
//! Sans-IO: time is given in [`Tick`]s (whole seconds since the gateway started); the shell
//! converts its clock and sleeps until [`TimerWheel::next_due`].

/// Whole seconds since an epoch chosen by the caller (the gateway's start).
pub type Tick = u32;

/// Default number of one-second slots: deadlines further out wrap around and are re-checked
/// when their slot comes up, which costs one check per lap.
pub const DEFAULT_WHEEL_SLOTS: usize = 512;

/// A hashed timing wheel of connection ids.
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<u32>>,
    /// Every slot for ticks before this one has been taken.
    next_tick: Tick,
    len: usize,
}

impl TimerWheel {
    /// An empty wheel of `slots` one-second slots (at least 1) whose time starts at `now`.
    pub fn new(slots: usize, now: Tick) -> TimerWheel {
        TimerWheel {
            slots: vec![Vec::new(); slots.max(1)],
            next_tick: now,
            len: 0,
        }
    }

    /// Puts `id` in the slot of `at` (a past `at` goes in the next slot due). Beyond the
    /// wheel's horizon it lands in an earlier lap's slot and is simply re-checked then.
    pub fn insert(&mut self, id: u32, at: Tick) {
        let at = at.max(self.next_tick);
        let n = self.slots.len();
        self.slots[at as usize % n].push(id);
        self.len += 1;
    }

    /// Takes every id whose slot is due at `now` (slots up to and including `now`) and gives
    /// them to `due`, which checks each against its connection's real deadline and may
    /// [`insert`](Self::insert) it again. At most one lap of slots is visited per call.
    pub fn advance(&mut self, now: Tick, mut due: impl FnMut(&mut Self, u32)) {
        let n = self.slots.len() as u32;
        if now < self.next_tick {
            return;
        }
        let last = now.min(self.next_tick.saturating_add(n - 1));
        let mut taken = Vec::new();
        for tick in self.next_tick..=last {
            let slot = &mut self.slots[(tick % n) as usize];
            if slot.is_empty() {
                continue;
            }
            // Swap the slot's storage out so that `due` may insert into the wheel (even into
            // this very slot, for the next lap) while we walk it.
            std::mem::swap(&mut taken, slot);
            self.len -= taken.len();
            // `insert` clamps to next_tick: ids put back while we walk go at least one past.
            self.next_tick = tick + 1;
            for id in taken.drain(..) {
                due(self, id);
            }
            // Give the (now empty) storage back to the slot if it has none, to keep its
            // capacity for the next lap instead of allocating again.
            let slot = &mut self.slots[(tick % n) as usize];
            if slot.capacity() == 0 {
                std::mem::swap(&mut taken, slot);
            }
        }
        self.next_tick = now.max(last) + 1;
    }

    /// The tick of the first non-empty slot, if any: sleep until then.
    pub fn next_due(&self) -> Option<Tick> {
        if self.len == 0 {
            return None;
        }
        let n = self.slots.len() as u32;
        (0..n)
            .map(|i| self.next_tick + i)
            .find(|t| !self.slots[(t % n) as usize].is_empty())
    }

    /// Number of ids in the wheel (stale ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn ids_come_due_in_their_slot_and_not_before() {
        let mut w = TimerWheel::new(8, 100);
        w.insert(1, 103);
        w.insert(2, 105);
        w.insert(3, 90); // in the past: due at once
        assert_eq!(w.next_due(), Some(100));
        let mut got = Vec::new();
        w.advance(102, |_, id| got.push(id));
        assert_eq!(got, [3]);
        w.advance(104, |_, id| got.push(id));
        assert_eq!(got, [3, 1]);
        assert_eq!(w.next_due(), Some(105));
        w.advance(110, |_, id| got.push(id));
        assert_eq!(got, [3, 1, 2]);
        assert!(w.is_empty() && w.next_due().is_none());
    }

    #[test]
    fn a_deadline_beyond_the_horizon_is_rechecked_each_lap_until_due() {
        let mut w = TimerWheel::new(4, 0);
        let deadline = 10;
        w.insert(7, deadline);
        let mut checks = 0;
        let mut fired = None;
        for now in 0..=12 {
            w.advance(now, |w, id| {
                checks += 1;
                if now >= deadline {
                    fired = Some(now);
                } else {
                    w.insert(id, deadline);
                }
            });
        }
        assert_eq!(fired, Some(10));
        assert_eq!(checks, 3, "once per lap: ticks 2, 6 and 10");
    }

    #[test]
    fn ids_put_back_into_the_slot_being_walked_wait_for_a_later_tick() {
        let mut w = TimerWheel::new(4, 0);
        w.insert(1, 1);
        let mut seen = Vec::new();
        w.advance(1, |w, id| {
            seen.push(id);
            w.insert(id, 1); // "still alive, check again": must not loop
        });
        assert_eq!(seen, [1]);
        assert_eq!(w.next_due(), Some(2));
    }

    proptest! {
        /// Connections with activity at random times and a fixed timeout: each times out
        /// exactly when its real deadline passes (to the tick), never early, never missed.
        #[test]
        fn lazy_rechecks_time_out_exactly_the_idle_connections(
            activity in prop::collection::vec(prop::collection::vec(0u32..300, 0..6), 1..40),
            timeout in 1u32..120,
            slots in 1usize..64,
        ) {
            let mut last_rx: Vec<u32> = vec![0; activity.len()];
            let mut timed_out: Vec<Option<u32>> = vec![None; activity.len()];
            let mut w = TimerWheel::new(slots, 0);
            for id in 0..activity.len() as u32 {
                w.insert(id, timeout);
            }
            for now in 0..=450u32 {
                for (id, times) in activity.iter().enumerate() {
                    if timed_out[id].is_none() && times.contains(&now) {
                        last_rx[id] = now; // activity: no wheel operation
                    }
                }
                w.advance(now, |w, id| {
                    let deadline = last_rx[id as usize] + timeout;
                    if now >= deadline {
                        timed_out[id as usize] = Some(now);
                    } else {
                        w.insert(id, deadline);
                    }
                });
            }
            for (id, times) in activity.iter().enumerate() {
                // The expected: the first gap of more than `timeout` seconds with no activity
                // (activity at the deadline tick itself comes before the check).
                let mut last = 0;
                let mut expect = None;
                let mut sorted = times.clone();
                sorted.sort_unstable();
                for t in sorted.into_iter().chain(std::iter::once(u32::MAX)) {
                    if t > last + timeout {
                        expect = Some(last + timeout);
                        break;
                    }
                    last = last.max(t);
                }
                prop_assert_eq!(timed_out[id], expect, "connection {}", id);
            }
        }
    }
}
