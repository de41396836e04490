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

/// What [`DownlinkBuffer::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pushed {
    /// The seq the downlink got.
    pub seq: u64,
    /// Older unacked downlinks dropped to make room (now part of the announced gap). When the
    /// session is attached and this is non-zero, the client is too slow: close the connection
    /// (`SLOW_CONSUMER`) and keep the session, so the client resumes and learns of the gap.
    pub dropped: usize,
}

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
    /// Seqs dropped from the buffer before they were acked, not yet acked past.
    lost: Option<(u64, u64)>,
}

impl DownlinkBuffer {
    /// Numbers a downlink and buffers it until acked, dropping the oldest unacked ones if the
    /// buffer is over `limits` (a single downlink larger than `max_bytes` is still kept: the
    /// buffer never drops the newest).
    pub fn push(
        &mut self,
        body_type: u32,
        gzip: bool,
        body: Bytes,
        receipt: u64,
        limits: &DownlinkLimits,
    ) -> Pushed {
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
        let mut dropped = 0;
        while u.list.len() > 1 && (u.list.len() > limits.max_frames || u.bytes > limits.max_bytes) {
            let old = u.list.pop_front().expect("len > 1");
            u.bytes -= old.body.len();
            u.lost = Some(match u.lost {
                Some((from, _)) => (from, old.seq),
                None => (old.seq, old.seq),
            });
            dropped += 1;
        }
        Pushed { seq, dropped }
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

    fn push(b: &mut DownlinkBuffer, n: u8, limits: &DownlinkLimits) -> Pushed {
        b.push(0, false, Bytes::from(vec![n; 10]), n as u64, limits)
    }

    #[test]
    fn seqs_start_at_one_and_acks_release_in_order() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=5u8 {
            assert_eq!(
                push(&mut b, i, &limits),
                Pushed {
                    seq: i as u64,
                    dropped: 0
                }
            );
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
    fn overflow_drops_the_oldest_and_a_resume_announces_the_gap() {
        let limits = DownlinkLimits {
            max_frames: 3,
            max_bytes: usize::MAX,
        };
        let mut b = DownlinkBuffer::default();
        for i in 1..=3u8 {
            push(&mut b, i, &limits);
        }
        assert_eq!(push(&mut b, 4, &limits).dropped, 1);
        assert_eq!(push(&mut b, 5, &limits).dropped, 1);
        // The client had seq 1: 2 is lost, 3..=5 replayed.
        let r = b.resume(1);
        assert_eq!(r.gap, Some((2, 2)));
        assert_eq!(r.replay.map(|d| d.seq).collect::<Vec<_>>(), [3, 4, 5]);
        // It drops again before acking anything: the same answer.
        assert_eq!(b.resume(1).gap, Some((2, 2)));
        // Once acked past the gap, it is forgotten.
        b.ack(3, drop);
        assert_eq!(b.resume(3).gap, None);
    }

    #[test]
    fn byte_bound_keeps_at_least_the_newest() {
        let limits = DownlinkLimits {
            max_frames: 100,
            max_bytes: 25,
        };
        let mut b = DownlinkBuffer::default();
        push(&mut b, 1, &limits);
        push(&mut b, 2, &limits);
        assert_eq!(push(&mut b, 3, &limits).dropped, 1);
        assert_eq!(b.unacked(), (2, 20));
        let big = b.push(0, false, Bytes::from(vec![0; 100]), 4, &limits);
        assert_eq!(big, Pushed { seq: 4, dropped: 2 });
        assert_eq!(b.unacked(), (1, 100));
    }

    #[test]
    fn a_resume_from_a_client_that_has_everything_replays_nothing() {
        let limits = DownlinkLimits::default();
        let mut b = DownlinkBuffer::default();
        for i in 1..=4u8 {
            push(&mut b, i, &limits);
        }
        let r = b.resume(4);
        assert_eq!((r.gap, r.replay.count()), (None, 0));
        assert_eq!(b.unacked(), (0, 0));
    }

    /// A client as PROTOCOL.md §6.5 describes it: processes `last_seq + 1`, drops duplicates,
    /// treats an announced gap as fetched from the back end.
    #[derive(Default)]
    struct Client {
        last_seq: u64,
        got: Vec<u64>,
        fetched: Vec<u64>,
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
        /// Pushes, acks and connection cuts in any order: the client ends with every seq
        /// exactly once and in order, each either received or announced as a gap, and the
        /// buffer never exceeds its bound.
        #[test]
        fn every_downlink_arrives_exactly_once_in_order_across_cuts(
            steps in prop::collection::vec(step(), 1..400),
            max_frames in 1usize..16,
        ) {
            let limits = DownlinkLimits { max_frames, max_bytes: usize::MAX };
            let mut b = DownlinkBuffer::default();
            let mut client = Client::default();
            let mut attached = true;
            let mut released = Vec::new();
            for s in steps {
                match s {
                    Step::Push => {
                        let p = b.push(0, false, Bytes::new(), 0, &limits);
                        if attached {
                            if p.dropped > 0 {
                                // Slow consumer: closed, the frame never went out.
                                attached = false;
                            } else {
                                client.receive(p.seq);
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
                        if let Some((from, to)) = r.gap {
                            prop_assert_eq!(from, client.last_seq + 1);
                            client.fetched.extend(from..=to);
                            client.last_seq = to;
                        }
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
            if let Some((from, to)) = r.gap {
                client.fetched.extend(from..=to);
                client.last_seq = to;
            }
            let replay: Vec<u64> = r.replay.map(|d| d.seq).collect();
            for seq in replay {
                client.receive(seq);
            }
            let mut all = client.got.clone();
            all.extend(&client.fetched);
            all.sort_unstable();
            prop_assert_eq!(all, (1..=b.last_seq()).collect::<Vec<_>>());
            prop_assert!(released.windows(2).all(|w| w[0] < w[1]), "receipts twice or out of order");
        }
    }
}
