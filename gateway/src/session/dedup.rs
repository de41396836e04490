//! The uplink dedup window of a session (PROTOCOL.md §6.4): a resent UPLINK whose `msg_id`
//! is among the session's recent ids is not forwarded again; it is acked again with the
//! original's outcome, or, if the original is still with the upstream, acked when that
//! answer comes (acks go to whichever connection the session has then).

use tether_protocol::pb::ErrorCode;
use thin_vec::ThinVec;

/// Default number of recent uplink ids a session remembers.
pub const DEFAULT_DEDUP_WINDOW: usize = 128;
/// Largest window the configuration accepts (a lookup scans the whole ring).
pub const MAX_DEDUP_WINDOW: usize = 65_536;

/// What the window knew of an uplink id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not in the window: forward it (it is now recorded as in flight).
    New,
    /// Forwarded, no answer from the upstream yet: send nothing now.
    InFlight,
    /// Answered: ack again with this code.
    Done(ErrorCode),
    /// New, but every id in the window is still with the upstream: not recorded; refuse it
    /// (retriable). A window is never made to forget an uplink in flight, or a resend of it
    /// would be forwarded twice.
    Busy,
}

const IN_FLIGHT: i32 = -1;

/// The last `window` distinct uplink ids of a session with their outcome, in a ring. Nothing
/// is allocated until the first uplink, so an idle session costs the size of this struct.
///
/// A lookup scans the ring: at the default window that is 128 comparisons of a u64, less
/// than a hash lookup costs at this size, and no second structure to keep in step.
#[derive(Debug, Default)]
pub struct UplinkDedup {
    /// (ThinVec: 8 bytes, nothing allocated while empty.)
    ring: ThinVec<(u64, i32)>,
    /// Where the next id goes once the ring is full.
    next: u32,
}

impl UplinkDedup {
    /// Looks `msg_id` up, recording it as in flight if it is new.
    pub fn check(&mut self, msg_id: u64, window: usize) -> Seen {
        if let Some(&(_, code)) = self.ring.iter().find(|(id, _)| *id == msg_id) {
            return match code {
                IN_FLIGHT => Seen::InFlight,
                c => Seen::Done(ErrorCode::try_from(c).unwrap_or(ErrorCode::Internal)),
            };
        }
        if window == 0 {
            return Seen::New;
        }
        let entry = (msg_id, IN_FLIGHT);
        if self.ring.len() < window {
            if self.ring.capacity() == 0 {
                self.ring.reserve_exact(window.min(16));
            }
            self.ring.push(entry);
        } else {
            // The oldest answered entry gives way; entries in flight are never overwritten.
            let n = self.ring.len();
            let start = self.next as usize % n;
            let Some(at) = (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| self.ring[i].1 != IN_FLIGHT)
            else {
                return Seen::Busy;
            };
            self.ring[at] = entry;
            self.next = ((at + 1) % n) as u32;
        }
        Seen::New
    }

    /// Records the upstream's answer for `msg_id` (if it is still in the window).
    pub fn complete(&mut self, msg_id: u64, code: ErrorCode) {
        if let Some(e) = self.ring.iter_mut().find(|(id, _)| *id == msg_id) {
            e.1 = code as i32;
        }
    }
}

impl UplinkDedup {
    /// Forgets `msg_id`, so that a resend is forwarded again (after a retriable failure:
    /// `UPSTREAM_UNAVAILABLE`, `UPSTREAM_TIMEOUT`, `RATE_LIMITED`).
    pub fn forget(&mut self, msg_id: u64) {
        if let Some(e) = self.ring.iter_mut().find(|(id, _)| *id == msg_id) {
            // An id no client sends (PROTOCOL.md §4.5: msg_id is non-zero).
            *e = (0, 0);
        }
    }
}

impl UplinkDedup {
    /// Whether `msg_id` is recorded as with the upstream.
    pub fn is_in_flight(&self, msg_id: u64) -> bool {
        self.ring.contains(&(msg_id, IN_FLIGHT))
    }

    /// The answered ids and their codes, oldest first (for a snapshot).
    pub fn done_entries(&self) -> Vec<(u64, ErrorCode)> {
        let n = self.ring.len();
        (0..n)
            .map(|i| self.ring[(self.next as usize + i) % n.max(1)])
            .filter(|&(id, code)| id != 0 && code != IN_FLIGHT)
            .map(|(id, code)| (id, ErrorCode::try_from(code).unwrap_or(ErrorCode::Internal)))
            .collect()
    }

    /// The ids still with the upstream (for a snapshot).
    pub fn in_flight_ids(&self) -> Vec<u64> {
        self.ring
            .iter()
            .filter(|e| e.1 == IN_FLIGHT)
            .map(|e| e.0)
            .collect()
    }

    /// A window holding these answered ids and these ids in flight (from a snapshot).
    pub fn from_snapshot(done: &[(u64, ErrorCode)], in_flight: &[u64]) -> UplinkDedup {
        UplinkDedup {
            ring: done
                .iter()
                .map(|&(id, code)| (id, code as i32))
                .chain(in_flight.iter().map(|&id| (id, IN_FLIGHT)))
                .filter(|(id, _)| *id != 0)
                .collect(),
            next: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resend_is_held_while_in_flight_and_acked_with_the_outcome_after() {
        let mut d = UplinkDedup::default();
        assert_eq!(d.check(7, 3), Seen::New);
        assert_eq!(d.check(7, 3), Seen::InFlight);
        d.complete(7, ErrorCode::Ok);
        assert_eq!(d.check(7, 3), Seen::Done(ErrorCode::Ok));
        assert_eq!(d.check(8, 3), Seen::New);
        d.complete(8, ErrorCode::Rejected);
        assert_eq!(d.check(8, 3), Seen::Done(ErrorCode::Rejected));
    }

    #[test]
    fn a_forgotten_id_is_new_again() {
        let mut d = UplinkDedup::default();
        assert_eq!(d.check(7, 3), Seen::New);
        d.forget(7);
        assert_eq!(d.check(7, 3), Seen::New);
        assert_eq!(d.check(7, 3), Seen::InFlight);
    }

    #[test]
    fn the_window_forgets_the_oldest() {
        let mut d = UplinkDedup::default();
        for id in [1, 2, 3] {
            assert_eq!(d.check(id, 3), Seen::New);
            d.complete(id, ErrorCode::Ok);
        }
        assert_eq!(d.check(4, 3), Seen::New); // evicts 1
        assert_eq!(d.check(1, 3), Seen::New); // evicts 2
        assert_eq!(d.check(3, 3), Seen::Done(ErrorCode::Ok));
        d.complete(4, ErrorCode::Ok);
        d.complete(1, ErrorCode::Ok);
        assert_eq!(d.check(2, 3), Seen::New); // evicts 3
    }

    #[test]
    fn an_uplink_in_flight_is_never_forgotten_by_the_window() {
        let mut d = UplinkDedup::default();
        for id in [1, 2, 3] {
            assert_eq!(d.check(id, 3), Seen::New);
        }
        // All three with the upstream: a fourth is refused, not recorded over one of them.
        assert_eq!(d.check(4, 3), Seen::Busy);
        assert_eq!(d.check(1, 3), Seen::InFlight, "a resend of 1 is still held");
        d.complete(2, ErrorCode::Ok);
        assert_eq!(d.check(4, 3), Seen::New, "2 was answered: it gives way");
        assert_eq!(d.check(2, 3), Seen::Busy);
        assert_eq!(d.check(1, 3), Seen::InFlight);
        assert_eq!(d.check(3, 3), Seen::InFlight);
    }

    #[test]
    fn a_snapshot_keeps_the_answers_and_what_is_in_flight_apart() {
        let mut d = UplinkDedup::default();
        for id in [1, 2, 3] {
            d.check(id, 8);
        }
        d.complete(1, ErrorCode::Ok);
        d.complete(3, ErrorCode::Rejected);
        let done = d.done_entries();
        assert_eq!(done, [(1, ErrorCode::Ok), (3, ErrorCode::Rejected)]);
        assert_eq!(d.in_flight_ids(), [2]);
        let mut r = UplinkDedup::from_snapshot(&done, &[]);
        assert_eq!(r.check(3, 8), Seen::Done(ErrorCode::Rejected));
        assert_eq!(r.check(2, 8), Seen::New);
        assert!(d.is_in_flight(2) && !d.is_in_flight(1) && !d.is_in_flight(4));
        // Restored with what was in flight: a resend waits for the relayed answer.
        let mut r = UplinkDedup::from_snapshot(&done, &d.in_flight_ids());
        assert_eq!(r.check(2, 8), Seen::InFlight);
        r.complete(2, ErrorCode::Ok);
        assert_eq!(r.check(2, 8), Seen::Done(ErrorCode::Ok));
    }

    #[test]
    fn idle_sessions_allocate_nothing() {
        let d = UplinkDedup::default();
        assert_eq!(d.ring.capacity(), 0);
        assert_eq!(std::mem::size_of::<UplinkDedup>(), 16);
    }
}
