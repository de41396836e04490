//! The uplink dedup window of a session (PROTOCOL.md §6.4): a resent UPLINK whose `msg_id`
//! is among the session's recent ids is acked again and not forwarded twice.

/// Default number of recent uplink ids a session remembers.
pub const DEFAULT_DEDUP_WINDOW: usize = 128;

/// The last `window` distinct uplink ids of a session, in a ring. Nothing is allocated until
/// the first uplink, so an idle session costs the size of this struct (32 bytes).
///
/// A lookup scans the ring: at the default window that is 128 comparisons of a u64, less
/// than a hash lookup costs at this size, and no second structure to keep in step.
#[derive(Debug, Default)]
pub struct UplinkDedup {
    ring: Vec<u64>,
    /// Where the next id goes once the ring is full.
    next: usize,
}

impl UplinkDedup {
    /// Records `msg_id`; false if it is already in the window (a resend).
    pub fn insert(&mut self, msg_id: u64, window: usize) -> bool {
        if self.ring.contains(&msg_id) {
            return false;
        }
        if window == 0 {
            return true;
        }
        if self.ring.len() < window {
            if self.ring.capacity() == 0 {
                self.ring.reserve_exact(window.min(16));
            }
            self.ring.push(msg_id);
        } else {
            let at = self.next % self.ring.len();
            self.ring[at] = msg_id;
            self.next = at + 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_id_is_recognised_within_the_window_and_forgotten_after() {
        let mut d = UplinkDedup::default();
        assert!(d.insert(7, 3));
        assert!(!d.insert(7, 3));
        assert!(d.insert(8, 3));
        assert!(d.insert(9, 3));
        assert!(!d.insert(8, 3));
        assert!(d.insert(10, 3)); // evicts 7, the oldest
        assert!(d.insert(7, 3));
        assert!(!d.insert(9, 3));
        assert!(!d.insert(10, 3));
    }

    #[test]
    fn idle_sessions_allocate_nothing() {
        let d = UplinkDedup::default();
        assert_eq!(d.ring.capacity(), 0);
        assert_eq!(std::mem::size_of::<UplinkDedup>(), 32);
    }
}
