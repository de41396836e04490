//! The downlink side of a session: sequence numbers, the bounded buffer of sent but unacked
//! frames, cumulative acks, and what a resume replays (PROTOCOL.md §6.5, §6.6).
//!
//! Sans-IO: it never writes anything. The connection shell writes each pushed downlink when
//! the session is attached, and on a resume writes [`Resume::replay`] before anything new.

use std::collections::VecDeque;

use bytes::Bytes;

/// Default maximum number of unacked downlinks kept per session.
pub const DEFAULT_MAX_UNACKED_FRAMES: usize = 1024;

/// Default maximum body bytes of unacked downlinks kept per session: 256 KiB.
pub const DEFAULT_MAX_UNACKED_BYTES: usize = 256 * 1024;

/// Bounds of one session's unacked buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownlinkLimits {
    pub max_frames: usize,
    pub max_bytes: usize,
}

impl Default for DownlinkLimits {
    fn default() -> Self {
        DownlinkLimits {
            max_frames: DEFAULT_MAX_UNACKED_FRAMES,
            max_bytes: DEFAULT_MAX_UNACKED_BYTES,
        }
    }
}

/// One downlink as the session keeps it until acked. The body is shared (a room message's
/// body is one allocation for every member); only the seq is per session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    pub seq: u64,
    pub body_type: u32,
    pub gzip: bool,
    pub body: Bytes,
    /// The upstream's id for the delivery receipt sent when this is acked.
    pub receipt: u64,
}

/// [`DownlinkBuffer::push`] found the buffer full: the downlink was not taken (no seq used).
/// The pusher hears of it (PROTOCOL.md §6.5: refused, retriable); nothing already accepted is
/// pushed out to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What a resume must tell and send.
#[derive(Debug)]
pub struct Resume<'a> {
    /// Seqs lost for good (`LoginResult.gap_from..=gap_to`), if any.
    pub gap: Option<(u64, u64)>,
    /// Every buffered downlink after the client's `last_seq`, in order: send these before
    /// anything new.
    pub replay: std::collections::vec_deque::Iter<'a, Downlink>,
}

/// Sequence numbers and the unacked buffer of one session.
/// Nothing unacked: what [`DownlinkBuffer::after`] reads when there is no [`Unacked`].
static EMPTY: VecDeque<Downlink> = VecDeque::new();

#[derive(Debug, Default)]
pub struct DownlinkBuffer {
    /// The seq of the last downlink pushed (0: none yet).
    last_seq: u64,
    /// The client's cumulative ack.
    acked: u64,
    /// `None` while nothing is unacked and no gap is pending, so that an idle session holds
    /// 8 bytes here and no queue capacity left over from its last burst.
    unacked: Option<Box<Unacked>>,
}

#[derive(Debug, Default)]
struct Unacked {
    /// Oldest first, seqs strictly increasing.
    list: VecDeque<Downlink>,
    bytes: usize,
    /// Seqs lost before this session was restored here (a gap to announce at the next
    /// resume), not yet acked past. A live buffer never drops what it accepted.
    lost: Option<(u64, u64)>,
}

impl DownlinkBuffer {
    /// Numbers a downlink and buffers it until acked, or refuses it if the buffer is at
    /// `limits` (an empty buffer takes one downlink of any size, so that a single body larger
    /// than `max_bytes` can still be delivered).
    pub fn push(
        &mut self,
        body_type: u32,
        gzip: bool,
        body: Bytes,
        receipt: u64,
        limits: &DownlinkLimits,
    ) -> Result<u64, Full> {
        let (n, bytes) = self.unacked();
        if n > 0 && (n >= limits.max_frames || bytes + body.len() > limits.max_bytes) {
            return Err(Full);
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let u = self.unacked.get_or_insert_with(Default::default);
        u.bytes += body.len();
        u.list.push_back(Downlink {
            seq,
            body_type,
            gzip,
            body,
            receipt,
        });
        Ok(seq)
    }

    /// Whether a body of `len` bytes would be taken now.
    pub fn has_room(&self, len: usize, limits: &DownlinkLimits) -> bool {
        let (n, bytes) = self.unacked();
        n == 0 || (n < limits.max_frames && bytes + len <= limits.max_bytes)
    }

    /// Takes every unacked downlink out (the session ends: they were never delivered), and
    /// frees the buffer. Seqs are not reused.
    pub fn take_unacked(&mut self) -> Vec<Downlink> {
        self.unacked
            .take()
            .map(|u| Vec::from(u.list))
            .unwrap_or_default()
    }

    /// A buffer restored from a snapshot: `acked` and `last_seq` as they were, the unacked
    /// downlinks (seqs increasing, above `acked`) and a pending gap.
    pub fn restore(
        last_seq: u64,
        acked: u64,
        list: Vec<Downlink>,
        lost: Option<(u64, u64)>,
    ) -> DownlinkBuffer {
        let list: VecDeque<Downlink> = list
            .into_iter()
            .filter(|d| d.seq > acked && d.seq <= last_seq)
            .collect();
        let lost = lost.filter(|&(from, to)| from <= to && to > acked && to <= last_seq);
        let unacked = (!list.is_empty() || lost.is_some()).then(|| {
            Box::new(Unacked {
                bytes: list.iter().map(|d| d.body.len()).sum(),
                list,
                lost,
            })
        });
        DownlinkBuffer {
            last_seq,
            acked: acked.min(last_seq),
            unacked,
        }
    }

    /// The pending gap (seqs lost and not yet acked past), if any.
    pub fn lost(&self) -> Option<(u64, u64)> {
        self.unacked.as_ref().and_then(|u| u.lost)
    }

    /// The unacked downlinks, oldest first.
    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Downlink> {
        self.list().iter()
    }

    /// Applies a cumulative DOWNLINK_ACK and hands `released` the downlinks it releases (for
    /// delivery receipts), oldest first. An ack at or below the previous one releases
    /// nothing; an ack above the last seq pushed is taken as the last seq pushed (a client
    /// cannot have more).
    pub fn ack(&mut self, seq: u64, mut released: impl FnMut(Downlink)) {
        let seq = seq.min(self.last_seq);
        if seq > self.acked {
            self.acked = seq;
        }
        let acked = self.acked;
        let Some(u) = self.unacked.as_mut() else {
            return;
        };
        if matches!(u.lost, Some((_, to)) if to <= acked) {
            u.lost = None;
        }
        let n = u.list.partition_point(|d| d.seq <= acked);
        for d in u.list.drain(..n) {
            u.bytes -= d.body.len();
            released(d);
        }
        if u.list.is_empty() && u.lost.is_none() {
            self.unacked = None;
        }
    }

    /// A resume with the client's `last_seq`: everything up to it counts as acked (the
    /// released downlinks are dropped here; call [`ack`](Self::ack) first to get their
    /// receipts), then the gap and the replay.
    pub fn resume(&mut self, last_seq: u64) -> Resume<'_> {
        self.ack(last_seq, drop);
        let acked = self.acked;
        let gap = self
            .unacked
            .as_ref()
            .and_then(|u| u.lost)
            .map(|(from, to)| (from.max(acked + 1), to))
            .filter(|(from, to)| from <= to);
        Resume {
            gap,
            replay: self.list().iter(),
        }
    }

    fn list(&self) -> &VecDeque<Downlink> {
        self.unacked.as_ref().map_or(&EMPTY, |u| &u.list)
    }

    /// The buffered downlinks with a seq above `seq`, oldest first (what a connection that
    /// was sent everything up to `seq` still needs).
    pub fn after(&self, seq: u64) -> std::collections::vec_deque::Iter<'_, Downlink> {
        let list = self.list();
        let n = list.partition_point(|d| d.seq <= seq);
        list.range(n..)
    }

    /// The seq of the last downlink pushed.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The client's cumulative ack.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Number and body bytes of unacked downlinks.
    pub fn unacked(&self) -> (usize, usize) {
        self.unacked
            .as_ref()
            .map_or((0, 0), |u| (u.list.len(), u.bytes))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn push(b: &mut DownlinkBuffer, n: u8, limits: &DownlinkLimits) -> Result<u64, Full> {
        b.push(0, false, Bytes::from(vec![n; 10]), n as u64, limits)
    }

    #[test]
    fn seqs_start_at_one_and_acks_release_in_order() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=5u8 {
            assert_eq!(push(&mut b, i, &limits), Ok(i as u64));
        }
        let mut released = Vec::new();
        b.ack(3, |d| released.push(d.receipt));
        assert_eq!(released, [1, 2, 3]);
        assert_eq!(b.unacked(), (2, 20));
        let mut n = 0;
        b.ack(2, |_| n += 1);
        assert_eq!(n, 0, "acks only move forward");
        b.ack(99, |_| n += 1);
        assert_eq!(n, 2, "an ack past the last seq is clamped");
        assert_eq!((b.acked(), b.unacked()), (5, (0, 0)));
        assert!(b.unacked.is_none(), "nothing unacked: nothing held");
    }

    #[test]
    fn a_full_buffer_refuses_and_keeps_what_it_took() {
        let limits = DownlinkLimits {
            max_frames: 3,
            max_bytes: usize::MAX,
        };
        let mut b = DownlinkBuffer::default();
        for i in 1..=3u8 {
            assert_eq!(push(&mut b, i, &limits), Ok(i as u64));
        }
        assert_eq!(push(&mut b, 4, &limits), Err(Full));
        assert_eq!(b.last_seq(), 3, "a refused downlink takes no seq");
        let r = b.resume(1);
        assert_eq!(r.gap, None, "nothing accepted is pushed out");
        assert_eq!(r.replay.map(|d| d.seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(push(&mut b, 4, &limits), Ok(4), "room again after the ack");
    }

    #[test]
    fn the_byte_bound_refuses_but_an_empty_buffer_takes_any_size() {
        let limits = DownlinkLimits {
            max_frames: 100,
            max_bytes: 25,
        };
        let mut b = DownlinkBuffer::default();
        push(&mut b, 1, &limits).unwrap();
        push(&mut b, 2, &limits).unwrap();
        assert!(!b.has_room(10, &limits));
        assert_eq!(push(&mut b, 3, &limits), Err(Full));
        assert_eq!(b.unacked(), (2, 20));
        b.ack(2, drop);
        assert!(b.has_room(100, &limits));
        assert_eq!(
            b.push(0, false, Bytes::from(vec![0; 100]), 4, &limits),
            Ok(3)
        );
        assert_eq!(b.unacked(), (1, 100));
    }

    #[test]
    fn taking_the_unacked_frees_the_buffer_and_keeps_the_seqs() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=4u8 {
            push(&mut b, i, &limits).unwrap();
        }
        b.ack(1, drop);
        let left: Vec<u64> = b.take_unacked().iter().map(|d| d.receipt).collect();
        assert_eq!(left, [2, 3, 4]);
        assert!(b.unacked.is_none());
        assert_eq!(push(&mut b, 5, &limits), Ok(5));
    }

    #[test]
    fn a_restored_buffer_replays_and_announces_like_the_original() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=6u8 {
            push(&mut b, i, &limits).unwrap();
        }
        b.ack(2, drop);
        let list: Vec<Downlink> = b.iter().skip(1).cloned().collect(); // 4..=6; 3 lost
        let mut r = DownlinkBuffer::restore(b.last_seq(), b.acked(), list, Some((3, 3)));
        assert_eq!(r.unacked(), (3, 30));
        let res = r.resume(2);
        assert_eq!(res.gap, Some((3, 3)));
        assert_eq!(res.replay.map(|d| d.seq).collect::<Vec<_>>(), [4, 5, 6]);
        // Nonsense in a snapshot is dropped, not trusted.
        let odd = DownlinkBuffer::restore(2, 5, b.iter().cloned().collect(), Some((9, 1)));
        assert_eq!((odd.acked(), odd.unacked(), odd.lost()), (2, (0, 0), None));
    }

    #[test]
    fn a_resume_from_a_client_that_has_everything_replays_nothing() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=4u8 {
            push(&mut b, i, &limits).unwrap();
        }
        let r = b.resume(4);
        assert_eq!((r.gap, r.replay.count()), (None, 0));
        assert_eq!(b.unacked(), (0, 0));
    }

    /// A client as PROTOCOL.md §6.5 describes it: processes `last_seq + 1`, drops duplicates.
    #[derive(Default)]
    struct Client {
        last_seq: u64,
        got: Vec<u64>,
    }

    impl Client {
        fn receive(&mut self, seq: u64) {
            if seq == self.last_seq + 1 {
                self.got.push(seq);
                self.last_seq = seq;
            } else {
                assert!(
                    seq <= self.last_seq,
                    "seq {seq} skips past {}",
                    self.last_seq
                );
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Push,
        Ack,
        Cut,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![8 => Just(Step::Push), 2 => Just(Step::Ack), 1 => Just(Step::Cut)]
    }

    proptest! {
        /// Pushes, acks and connection cuts in any order: every accepted downlink reaches the
        /// client exactly once and in order, every refused one is refused before it took a
        /// seq (the pusher knows), receipts come once each in order, and the buffer never
        /// exceeds its bound.
        #[test]
        fn every_accepted_downlink_arrives_exactly_once_in_order_across_cuts(
            steps in prop::collection::vec(step(), 1..400),
            max_frames in 1usize..16,
        ) {
            let limits = DownlinkLimits { max_frames, max_bytes: usize::MAX };
            let mut b = DownlinkBuffer::default();
            let mut client = Client::default();
            let mut attached = true;
            let mut released = Vec::new();
            let mut accepted = 0u64;
            for s in steps {
                match s {
                    Step::Push => {
                        if let Ok(seq) = b.push(0, false, Bytes::new(), seq_receipt(accepted), &limits) {
                            accepted += 1;
                            prop_assert_eq!(seq, accepted);
                            if attached {
                                client.receive(seq);
                            }
                        }
                    }
                    Step::Ack if attached => {
                        b.ack(client.last_seq, |d| released.push(d.seq));
                    }
                    Step::Ack => {}
                    Step::Cut if attached => attached = false,
                    Step::Cut => {
                        // Reconnect and resume.
                        let r = b.resume(client.last_seq);
                        prop_assert_eq!(r.gap, None);
                        let replay: Vec<u64> = r.replay.map(|d| d.seq).collect();
                        for seq in replay {
                            client.receive(seq);
                        }
                        attached = true;
                    }
                }
                prop_assert!(b.unacked().0 <= max_frames);
            }
            // A final resume delivers the rest.
            let r = b.resume(client.last_seq);
            let replay: Vec<u64> = r.replay.map(|d| d.seq).collect();
            for seq in replay {
                client.receive(seq);
            }
            prop_assert_eq!(&client.got, &(1..=accepted).collect::<Vec<_>>());
            prop_assert!(released.windows(2).all(|w| w[0] < w[1]), "receipts twice or out of order");
        }
    }

    fn seq_receipt(n: u64) -> u64 {
        n + 1
    }
}
