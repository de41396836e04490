//! Sessions handed between the sibling processes of one `--processes N` gateway.
//!
//! The processes share their listen ports, so a client's reconnect lands on any of them. A
//! session's id names the process that made it (its first two bytes; the other 14 are
//! random). A LOGIN that asks to resume a session of another process claims it from that
//! process over a Unix socket in a directory only this user can enter (made by the
//! supervisor): the owner takes a [`Snapshot`] of the session (seqs, unacked downlinks,
//! dedup window, rooms, rate bucket), ends it there as [`EndReason::Moved`] (its connection,
//! if still attached, gets KICK `RESUMED_ELSEWHERE`; its unacked downlinks are not reported
//! undelivered: they moved), and answers with the snapshot; the claimer restores it and
//! resumes it on the new connection, so nothing held is lost and a resent uplink the owner
//! answered is not forwarded again.
//!
//! Neither side blocks a worker: the owner answers on a thread of its own, and the claim is
//! made by the claimer's handoff thread, whose answer reaches the worker as a command. A
//! sibling that does not answer within `handoff_timeout_ms` (restarted, gone) is treated as not
//! holding the session: the login gets a fresh one, as PROTOCOL.md §6.6 allows.
//!
//! Uplinks still with the owner's upstream move as ids in flight: the claimer's window waits
//! for them (a resend is not forwarded again), the owner relays each answer when its upstream
//! gives it (a one-way message to the claimer's socket), and the claimer acks it on the new
//! connection, or answers `UPSTREAM_TIMEOUT` itself if no answer is relayed within the
//! upstream timeout (the owner gone: the client may resend, and the back end sees it twice
//! only if the first had reached it). What does not move: the owner's embedded back end's
//! per-process state.
//!
//! [`EndReason::Moved`]: crate::upstream::EndReason::Moved

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use prost::Message;
use tether_protocol::pb::{ErrorCode, Platform};

use crate::metrics::Metrics;
use crate::node::{Cmd, Node, SessionId};
use crate::session::bucket::TokenBucket;
use crate::session::core::Snapshot;
use crate::session::downlink::Downlink;
use crate::worker::PendingLogin;

/// The environment variable through which the supervisor tells its children the directory of
/// their handoff sockets.
pub const DIR_ENV: &str = "TETHER_HANDOFF_DIR";

/// Largest claim or answer read from a sibling: what a session's snapshot can hold under this
/// gateway's limits (its unacked buffer, one more body, per-frame and per-entry overhead,
/// rooms, dedup window), and a margin.
fn max_message(c: &crate::config::Config) -> usize {
    let limits = c.session_limits();
    limits.downlink.max_bytes
        + limits.max_body
        + 64 * (limits.downlink.max_frames + 1)
        + (c.max_header_len as usize + 8) * limits.max_rooms
        + 16 * limits.dedup_window
        + 64 * 1024
}

/// How long a claim may take (connect, ask, answer), each way.
fn timeout(c: &crate::config::Config) -> Option<Duration> {
    Some(Duration::from_millis(c.handoff_timeout_ms.max(1) as u64))
}

/// This process's place among its siblings, and where their sockets are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Siblings {
    pub index: usize,
    pub count: usize,
    pub dir: PathBuf,
}

impl Siblings {
    fn socket(&self, index: usize) -> PathBuf {
        socket_path(&self.dir, index)
    }

    /// The process that made session `id`, if it is one of the others.
    pub(crate) fn owner(&self, id: &SessionId) -> Option<usize> {
        let i = u16::from_be_bytes([id[0], id[1]]) as usize;
        (i < self.count && i != self.index).then_some(i)
    }

    /// Marks a fresh session id as this process's.
    pub(crate) fn stamp(&self, id: &mut SessionId) {
        id[..2].copy_from_slice(&(self.index as u16).to_be_bytes());
    }
}

/// The socket of process `index` in `dir`.
pub fn socket_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("{index}.sock"))
}

/// What a sibling sends: a claim (answered with [`Handed`]) or a relayed answer (one way).
#[derive(Clone, PartialEq, prost::Message)]
struct Ask {
    #[prost(message, optional, tag = "1")]
    claim: Option<Claim>,
    #[prost(message, optional, tag = "2")]
    relayed: Option<Relayed>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Claim {
    #[prost(bytes = "vec", tag = "1")]
    session_id: Vec<u8>,
    #[prost(string, tag = "2")]
    user: String,
    #[prost(string, tag = "3")]
    device: String,
    /// The claimer's process index (where answers to uplinks in flight are relayed).
    #[prost(uint32, tag = "4")]
    from: u32,
}

/// The upstream's answer to an uplink of a session that moved to the receiver.
#[derive(Clone, PartialEq, prost::Message)]
struct Relayed {
    #[prost(bytes = "vec", tag = "1")]
    session_id: Vec<u8>,
    #[prost(uint64, tag = "2")]
    msg_id: u64,
    #[prost(int32, tag = "3")]
    code: i32,
    #[prost(uint32, tag = "4")]
    retry_after_ms: u32,
    #[prost(string, tag = "5")]
    message: String,
    #[prost(bytes = "bytes", tag = "6")]
    body: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Handed {
    #[prost(bool, tag = "1")]
    found: bool,
    #[prost(uint64, tag = "2")]
    last_seq: u64,
    #[prost(uint64, tag = "3")]
    acked: u64,
    #[prost(message, repeated, tag = "4")]
    unacked: Vec<HandedDownlink>,
    #[prost(uint64, tag = "5")]
    lost_from: u64,
    #[prost(uint64, tag = "6")]
    lost_to: u64,
    #[prost(message, repeated, tag = "7")]
    dedup: Vec<HandedUplink>,
    #[prost(string, repeated, tag = "8")]
    rooms: Vec<String>,
    /// Tokens owed by the uplink bucket, in thousandths (the clocks of two processes differ:
    /// the debt travels, not the time stamp).
    #[prost(uint32, tag = "9")]
    bucket_debt_milli: u32,
    #[prost(bool, tag = "10")]
    accept_gzip: bool,
    #[prost(int32, tag = "11")]
    platform: i32,
    #[prost(uint64, tag = "12")]
    sent: u64,
    #[prost(uint64, repeated, tag = "13")]
    in_flight: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HandedDownlink {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(uint32, tag = "2")]
    body_type: u32,
    #[prost(bool, tag = "3")]
    gzip: bool,
    #[prost(bytes = "bytes", tag = "4")]
    body: Bytes,
    #[prost(uint64, tag = "5")]
    receipt: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HandedUplink {
    #[prost(uint64, tag = "1")]
    msg_id: u64,
    #[prost(int32, tag = "2")]
    code: i32,
}

impl Handed {
    fn from_snapshot(s: Snapshot, now_ms: u64, rate: u32) -> Handed {
        let (lost_from, lost_to) = s.lost.unwrap_or((0, 0));
        Handed {
            found: true,
            last_seq: s.last_seq,
            sent: s.sent,
            acked: s.acked,
            unacked: s
                .unacked
                .into_iter()
                .map(|d| HandedDownlink {
                    seq: d.seq,
                    body_type: d.body_type,
                    gzip: d.gzip,
                    body: d.body,
                    receipt: d.receipt,
                })
                .collect(),
            lost_from,
            lost_to,
            dedup: s
                .dedup
                .into_iter()
                .map(|(msg_id, code)| HandedUplink {
                    msg_id,
                    code: code as i32,
                })
                .collect(),
            in_flight: s.in_flight,
            rooms: s.rooms,
            bucket_debt_milli: s.bucket.debt_at(now_ms, rate),
            accept_gzip: s.accept_gzip,
            platform: s.platform as i32,
        }
    }

    fn into_snapshot(self, now_ms: u64) -> Snapshot {
        Snapshot {
            last_seq: self.last_seq,
            sent: self.sent,
            acked: self.acked,
            unacked: self
                .unacked
                .into_iter()
                .map(|d| Downlink {
                    seq: d.seq,
                    body_type: d.body_type,
                    gzip: d.gzip,
                    body: d.body,
                    receipt: d.receipt,
                })
                .collect(),
            lost: (self.lost_to != 0).then_some((self.lost_from, self.lost_to)),
            dedup: self
                .dedup
                .into_iter()
                .map(|u| {
                    let code = ErrorCode::try_from(u.code).unwrap_or(ErrorCode::Internal);
                    (u.msg_id, code)
                })
                .collect(),
            in_flight: self.in_flight,
            rooms: self.rooms,
            bucket: TokenBucket::owing(self.bucket_debt_milli, now_ms),
            accept_gzip: self.accept_gzip,
            platform: Platform::try_from(self.platform).unwrap_or(Platform::Unspecified),
        }
    }
}

fn write_message(s: &mut UnixStream, m: &impl Message) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out)
}

fn read_message<M: Message + Default>(s: &mut UnixStream, max: usize) -> std::io::Result<M> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::other("handoff message too large"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    M::decode(&body[..]).map_err(std::io::Error::other)
}

/// One claim the handoff thread makes for a worker.
pub(crate) struct ClaimJob {
    pub owner: usize,
    pub worker: u16,
    pub session_id: SessionId,
    /// The login that claims it (whose user and device the owner checks).
    pub pending: Box<PendingLogin>,
}

/// One answer the handoff thread relays to the sibling a session moved to.
pub(crate) struct RelayJob {
    pub to: usize,
    pub session_id: SessionId,
    pub msg_id: u64,
    pub outcome: crate::upstream::Outcome,
}

enum Job {
    Claim(ClaimJob),
    Relay(RelayJob),
}

/// This process's side of the handoff: the socket it answers on, and the thread that makes
/// its claims and relays answers.
pub(crate) struct Handoff {
    pub siblings: Siblings,
    claims: Sender<Job>,
    stop: Arc<AtomicBool>,
    threads: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Handoff {
    /// Listens on this process's socket (replacing a stale one) and starts both threads.
    pub(crate) fn start(node: &Arc<Node>, siblings: Siblings) -> std::io::Result<Handoff> {
        let path = siblings.socket(siblings.index);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let answer = {
            let (node, stop) = (Arc::downgrade(node), stop.clone());
            std::thread::Builder::new()
                .name("tether-handoff".into())
                .spawn(move || answer_claims(node, listener, stop))?
        };
        let claim = {
            let (node, siblings, stop) = (Arc::downgrade(node), siblings.clone(), stop.clone());
            std::thread::Builder::new()
                .name("tether-claims".into())
                .spawn(move || make_claims(node, siblings, rx, stop))?
        };
        Ok(Handoff {
            siblings,
            claims: tx,
            stop,
            threads: parking_lot::Mutex::new(vec![answer, claim]),
        })
    }

    pub(crate) fn claim(&self, job: ClaimJob) {
        let _ = self.claims.send(Job::Claim(job));
    }

    /// Bounded like the uplinks it answers: at most the dedup window per moved session, for
    /// the upstream timeout.
    pub(crate) fn relay(&self, job: RelayJob) {
        let _ = self.claims.send(Job::Relay(job));
    }

    /// Stops both threads and removes the socket.
    pub(crate) fn stop(&self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let path = self.siblings.socket(self.siblings.index);
        // Wakes the accept.
        let _ = UnixStream::connect(&path);
        let _ = std::fs::remove_file(&path);
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("siblings", &self.siblings)
            .finish_non_exhaustive()
    }
}

fn answer_claims(node: std::sync::Weak<Node>, listener: UnixListener, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut s) = conn else { continue };
        let Some(node) = node.upgrade() else { return };
        let _ = s.set_read_timeout(timeout(&node.config));
        let _ = s.set_write_timeout(timeout(&node.config));
        let Ok(ask) = read_message::<Ask>(&mut s, max_message(&node.config)) else {
            continue;
        };
        if let Some(r) = ask.relayed {
            if let Ok(id) = r.session_id.as_slice().try_into() {
                Metrics::inc(&node.metrics.handoffs, "side", "relay_received");
                let outcome = crate::upstream::Outcome {
                    code: ErrorCode::try_from(r.code).unwrap_or(ErrorCode::Internal),
                    retry_after_ms: r.retry_after_ms,
                    message: r.message,
                    body: r.body,
                };
                node.relayed_answer(&id, r.msg_id, outcome);
            }
            continue;
        }
        let Some(claim) = ask.claim else { continue };
        let from = u16::try_from(claim.from).unwrap_or(u16::MAX);
        let handed = claim
            .session_id
            .as_slice()
            .try_into()
            .ok()
            .and_then(|id: SessionId| node.hand_off(&id, &claim.user, &claim.device, from))
            .map(|snap| {
                let rate = node.config.uplink_rate;
                Handed::from_snapshot(snap, node.clock.elapsed_ms(), rate)
            })
            .unwrap_or_default();
        if handed.found {
            Metrics::inc(&node.metrics.handoffs, "side", "given");
        }
        let _ = write_message(&mut s, &handed);
    }
}

fn make_claims(
    node: std::sync::Weak<Node>,
    siblings: Siblings,
    jobs: Receiver<Job>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(job) = jobs.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let Some(node) = node.upgrade() else { return };
        let connect = |to: usize| -> std::io::Result<UnixStream> {
            let s = UnixStream::connect(siblings.socket(to))?;
            s.set_read_timeout(timeout(&node.config))?;
            s.set_write_timeout(timeout(&node.config))?;
            Ok(s)
        };
        let job = match job {
            Job::Claim(job) => job,
            Job::Relay(r) => {
                let o = r.outcome;
                let ask = Ask {
                    claim: None,
                    relayed: Some(Relayed {
                        session_id: r.session_id.to_vec(),
                        msg_id: r.msg_id,
                        code: o.code as i32,
                        retry_after_ms: o.retry_after_ms,
                        message: o.message,
                        body: o.body,
                    }),
                };
                let sent = connect(r.to).and_then(|mut s| write_message(&mut s, &ask));
                let side = match sent {
                    Ok(()) => "relayed",
                    Err(e) => {
                        // The sibling answers UPSTREAM_TIMEOUT itself.
                        tracing::warn!(sibling = r.to, "relaying an uplink's answer failed: {e}");
                        "relay_failed"
                    }
                };
                Metrics::inc(&node.metrics.handoffs, "side", side);
                continue;
            }
        };
        let ask = Ask {
            claim: Some(Claim {
                session_id: job.session_id.to_vec(),
                user: job.pending.id.user().to_owned(),
                device: job.pending.id.device().to_owned(),
                from: siblings.index as u32,
            }),
            relayed: None,
        };
        let asked = (|| {
            let mut s = connect(job.owner)?;
            write_message(&mut s, &ask)?;
            read_message::<Handed>(&mut s, max_message(&node.config))
        })();
        let snapshot = match asked {
            Ok(h) if h.found => {
                Metrics::inc(&node.metrics.handoffs, "side", "taken");
                Some(Box::new(h.into_snapshot(node.clock.elapsed_ms())))
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(sibling = job.owner, "session claim failed: {e}");
                Metrics::inc(&node.metrics.handoffs, "side", "failed");
                None
            }
        };
        node.send(job.worker, Cmd::Claimed(job.pending, snapshot));
    }
}
