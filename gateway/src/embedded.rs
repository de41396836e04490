//! The embedded reference upstream: a small chat back end in the gateway's process, the
//! default when no other upstream is configured, so that the run command is a working chat
//! server. It speaks `tether.chat.v1` (body_type 0, `ChatMessage`):
//!
//! - `to_user`: delivered to every session of that user, and to the sender's other sessions
//!   (so a user's devices all see what was sent); kept in a per-user offline queue when the
//!   user has no session at all, and delivered to the next fresh session of that user;
//! - `to_room`: delivered to the room's other members (the sender must be a member);
//! - no target: echoed back to the sending session.
//!
//! The gateway stamps `sender` (the authenticated user), `server_msg_id` and `sent_at_ms`.
//!
//! Nothing it accepts is lost unseen. Every message is pushed with a receipt id (its
//! `server_msg_id`). A session whose buffer refuses a message (full: its client has not
//! acked yet) gets it later: it waits in that session's backlog, which is sent on as the
//! client's acks come back, so a burst from somebody else never overruns a receiver that
//! reads. An offline queue is handed to the next fresh session the same way, paced by its
//! acks. A session that ends hands back what it never acked; that and its backlog go back to
//! the user's offline queue. Everything kept is stored as it will be sent (compressed once)
//! and bounded: per user or session in messages (`offline_max_messages`) and bytes
//! (`offline_max_user_bytes`), in all (`offline_max_total_bytes`), in users
//! (`offline_max_users`) and age (`offline_max_age_secs`). When a direct message does not
//! fit, the sender gets `RATE_LIMITED` (a live recipient that is behind: retry later) or
//! `REJECTED` (an offline recipient whose queue is full), never a silent drop; a room member
//! whose backlog is full misses that room message (the room does not wait for its slowest
//! member).
//! Rooms are open: any room id can be joined, up to `room_max_members`.
//!
//! It accepts each uplink once per device: the ids it accepted are kept per (user, device),
//! the last `dedup_window` of each, for `accepted_max_devices` devices (the longest idle
//! forgotten first), so that a resend the gateway's window no longer knows (its session was
//! kicked or expired before the client heard the ack: PROTOCOL.md §6.4) is acked again and
//! not delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message as _;
use tether_protocol::chat::{chat_message::Target as ChatTarget, ChatMessage};
use tether_protocol::pb::ErrorCode;

use crate::config::Config;
use crate::upstream::{
    Delivery, Downlink, EndReason, Hub, Names, Outcome, Push, Refusal, Reply, SessionId,
    SessionInfo, Target, Uplink, Upstream,
};

/// The body_type of `tether.chat.v1.ChatMessage`.
pub const CHAT_BODY_TYPE: u32 = 0;

/// retry_after_ms told to a sender whose recipient has too much waiting already.
pub const BUSY_RETRY_AFTER_MS: u32 = 1_000;

/// One message kept for a user or a session: the encoded `ChatMessage`, compressed (once)
/// when it is large enough, as it will be sent.
#[derive(Debug, Clone)]
struct Stored {
    at_ms: u64,
    id: u64,
    gzip: bool,
    body: Bytes,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Stored>,
    bytes: usize,
}

/// Uplink ids accepted per device (see the module docs), least recently used first out.
#[derive(Debug, Default)]
struct Accepted {
    by_device: HashMap<Names, (VecDeque<u64>, u64)>,
    /// (device, its use stamp then), oldest first; an entry whose stamp is not the device's
    /// current one is stale (the device was used since) and skipped.
    order: VecDeque<(Names, u64)>,
    stamp: u64,
}

impl Accepted {
    fn contains(&self, device: &Names, msg_id: u64) -> bool {
        self.by_device
            .get(device)
            .is_some_and(|(ids, _)| ids.contains(&msg_id))
    }

    fn record(&mut self, device: &Names, msg_id: u64, per_device: usize, max_devices: usize) {
        if per_device == 0 || max_devices == 0 {
            return;
        }
        self.stamp += 1;
        let stamp = self.stamp;
        let (ids, at) = self.by_device.entry(device.clone()).or_default();
        if ids.len() >= per_device {
            ids.pop_front();
        }
        ids.push_back(msg_id);
        *at = stamp;
        self.order.push_back((device.clone(), stamp));
        while self.by_device.len() > max_devices {
            let Some((d, s)) = self.order.pop_front() else {
                break;
            };
            if self.by_device.get(&d).is_some_and(|(_, at)| *at == s) {
                self.by_device.remove(&d);
            }
        }
        if self.order.len() > 2 * self.by_device.len() + 16 {
            // Stale entries would pile up for a device that sends a lot: rebuilt, in use order.
            let mut live: Vec<(Names, u64)> = self
                .by_device
                .iter()
                .map(|(d, (_, at))| (d.clone(), *at))
                .collect();
            live.sort_unstable_by_key(|(_, at)| *at);
            self.order = live.into();
        }
    }
}

#[derive(Debug, Default)]
struct Mail {
    /// Users with no session: delivered to their next fresh session.
    offline: HashMap<String, Queue>,
    /// Live sessions whose buffer refused a message, or that are working through an offline
    /// queue: sent on, oldest first, as the client's acks make room (receipts).
    backlog: HashMap<SessionId, Queue>,
    /// Body bytes in all of the above.
    bytes: usize,
    accepted: Accepted,
}

/// The reference chat upstream.
#[derive(Debug)]
pub struct ChatUpstream {
    mail: Mutex<Mail>,
    max_messages: usize,
    max_users: usize,
    max_age_ms: u64,
    max_user_bytes: usize,
    max_total_bytes: usize,
    room_max_members: usize,
    accepted_per_device: usize,
    accepted_max_devices: usize,
    next_id: AtomicU64,
    /// Sessions with a backlog (`mail.backlog.len()`, stored under the lock after every
    /// change), so that an ack's receipts take the lock only when something waits. A pusher
    /// that starts a backlog stores this and then tries the session once more, so an ack that
    /// read 0 just before cannot leave the backlog waiting: either it sees the count or the
    /// retry sees the room it made.
    backlogged: AtomicUsize,
    /// Delivery receipts received (for tests and metrics).
    pub receipts: AtomicU64,
    /// Resends acked again without delivering (for tests and metrics).
    pub resends: AtomicU64,
}

impl ChatUpstream {
    pub fn new(config: &Config) -> ChatUpstream {
        ChatUpstream {
            mail: Mutex::new(Mail::default()),
            max_messages: config.offline_max_messages,
            max_users: config.offline_max_users,
            max_age_ms: config.offline_max_age_secs.saturating_mul(1000),
            max_user_bytes: config.offline_max_user_bytes,
            max_total_bytes: config.offline_max_total_bytes,
            room_max_members: config.room_max_members,
            accepted_per_device: config.dedup_window,
            accepted_max_devices: config.accepted_max_devices,
            next_id: AtomicU64::new(1),
            backlogged: AtomicUsize::new(0),
            receipts: AtomicU64::new(0),
            resends: AtomicU64::new(0),
        }
    }

    /// Devices whose accepted uplink ids are remembered.
    pub fn accepted_devices(&self) -> usize {
        self.mail.lock().accepted.by_device.len()
    }

    /// Messages waiting for a user who has no session.
    pub fn offline_len(&self, user: &str) -> usize {
        self.mail
            .lock()
            .offline
            .get(user)
            .map_or(0, |q| q.items.len())
    }

    /// Body bytes kept (offline queues and backlogs of live sessions).
    pub fn stored_bytes(&self) -> usize {
        self.mail.lock().bytes
    }

    fn fits(&self, mail: &Mail, q: Option<&Queue>, len: usize) -> bool {
        let (n, bytes) = q.map_or((0, 0), |q| (q.items.len(), q.bytes));
        n < self.max_messages
            && bytes + len <= self.max_user_bytes
            && mail.bytes + len <= self.max_total_bytes
    }

    /// Keeps a message for a user with no session. False if the user's queue or the total is
    /// full (the sender is told).
    fn enqueue_offline(&self, mail: &mut Mail, user: &str, m: Stored) -> bool {
        if self.max_messages == 0 {
            return false;
        }
        let now = m.at_ms;
        if !mail.offline.contains_key(user) && mail.offline.len() >= self.max_users {
            // Bounded in users too: sweep out what has expired, then give up on this one.
            let max_age = self.max_age_ms;
            let mut freed = 0;
            mail.offline.retain(|_, q| {
                let keep = q
                    .items
                    .back()
                    .is_some_and(|m| m.at_ms.saturating_add(max_age) > now);
                if !keep {
                    freed += q.bytes;
                }
                keep
            });
            mail.bytes -= freed;
            if mail.offline.len() >= self.max_users {
                return false;
            }
        }
        let mut freed = 0;
        if let Some(q) = mail.offline.get_mut(user) {
            while q
                .items
                .front()
                .is_some_and(|m| m.at_ms.saturating_add(self.max_age_ms) <= now)
            {
                let old = q.items.pop_front().expect("front");
                q.bytes -= old.body.len();
                freed += old.body.len();
            }
        }
        mail.bytes -= freed;
        if !self.fits(mail, mail.offline.get(user), m.body.len()) {
            return false;
        }
        mail.bytes += m.body.len();
        let q = mail.offline.entry(user.to_owned()).or_default();
        q.bytes += m.body.len();
        q.items.push_back(m);
        true
    }

    /// Sends a session what waits for it, oldest first, until its buffer refuses.
    fn flush(&self, hub: &dyn Hub, mail: &mut Mail, session: &SessionId) {
        let Some(q) = mail.backlog.get_mut(session) else {
            return;
        };
        while let Some(m) = q.items.front() {
            match deliver_stored(hub, session, m) {
                Delivery::Refused(Refusal::Full) => break,
                // Taken, or never deliverable to this session (ended: it goes offline at
                // `session_ended`, which hands the rest back).
                Delivery::Refused(Refusal::Ended) => return,
                _ => {}
            }
            let m = q.items.pop_front().expect("front");
            q.bytes -= m.body.len();
            mail.bytes -= m.body.len();
        }
        if q.items.is_empty() {
            mail.backlog.remove(session);
            self.count_backlogs(mail);
        }
    }

    fn count_backlogs(&self, mail: &Mail) {
        self.backlogged.store(mail.backlog.len(), Ordering::SeqCst);
    }

    /// Delivers a new message to a session, behind anything already waiting for it
    /// (`waiting`: the session has a backlog): `live` as it is pushed now, or, if the
    /// session's buffer refuses it, `stored` into its backlog.
    fn send(
        &self,
        hub: &dyn Hub,
        mail: &mut Mail,
        session: &SessionId,
        waiting: bool,
        live: &Push,
        stored: &Stored,
    ) {
        if !waiting && hub.deliver(session, live) != Delivery::Refused(Refusal::Full) {
            return;
        }
        self.hold(hub, mail, session, !waiting, stored);
    }

    /// Puts a message at the end of a session's backlog (`started`: the session had none, it
    /// was refused just now).
    fn hold(
        &self,
        hub: &dyn Hub,
        mail: &mut Mail,
        session: &SessionId,
        started: bool,
        stored: &Stored,
    ) {
        mail.bytes += stored.body.len();
        let q = mail.backlog.entry(*session).or_default();
        q.bytes += stored.body.len();
        q.items.push_back(stored.clone());
        if started {
            // Counted first, then tried once more (see `backlogged`).
            self.count_backlogs(mail);
            self.flush(hub, mail, session);
        }
    }

    fn decode(hub: &dyn Hub, uplink: &Uplink) -> Result<ChatMessage, Outcome> {
        if uplink.body_type != CHAT_BODY_TYPE {
            return Err(Outcome::err(
                ErrorCode::Rejected,
                format!("unknown body_type {}", uplink.body_type),
            ));
        }
        let body = if uplink.gzip {
            tether_codec::gunzip(&uplink.body, hub.limits())
                .map(Bytes::from)
                .map_err(|e| Outcome::err(ErrorCode::Rejected, format!("body: {e}")))?
        } else {
            uplink.body.clone()
        };
        ChatMessage::decode(body)
            .map_err(|e| Outcome::err(ErrorCode::Rejected, format!("not a ChatMessage: {e}")))
    }
}

fn deliver_stored(hub: &dyn Hub, session: &SessionId, m: &Stored) -> Delivery {
    let push = if m.gzip {
        // Kept compressed; a session that does not take gzip gets it inflated (the gateway
        // compressed it itself, within its limits).
        match tether_codec::gunzip(&m.body, hub.limits()) {
            Ok(p) => Push {
                gzip: Some(m.body.clone()),
                ..Push::new(CHAT_BODY_TYPE, p)
            },
            Err(_) => return Delivery::Refused(Refusal::TooLarge),
        }
    } else {
        Push::new(CHAT_BODY_TYPE, m.body.clone())
    };
    hub.deliver(
        session,
        &Push {
            receipt: m.id,
            ..push
        },
    )
}

impl Upstream for ChatUpstream {
    fn session_opened(&self, hub: &dyn Hub, session: &SessionInfo, _login_body: &Bytes) {
        let mut mail = self.mail.lock();
        let Some(q) = mail.offline.remove(session.user()) else {
            return;
        };
        // Handed to the session as a backlog: sent as fast as its acks make room, never
        // dumped past its buffer.
        let now = hub.unix_ms();
        let mut fresh = Queue::default();
        for m in q.items {
            if m.at_ms.saturating_add(self.max_age_ms) > now {
                fresh.bytes += m.body.len();
                fresh.items.push_back(m);
            }
        }
        mail.bytes -= q.bytes - fresh.bytes;
        if !fresh.items.is_empty() {
            mail.backlog.insert(session.id, fresh);
            self.count_backlogs(&mail);
            self.flush(hub, &mut mail, &session.id);
        }
    }

    fn session_ended(
        &self,
        hub: &dyn Hub,
        session: &SessionInfo,
        _reason: EndReason,
        undelivered: &[Downlink],
    ) {
        // What the session never acked, then what still waited for it, goes back to the
        // user's offline queue, in order, for the next fresh session; or, when a new session
        // of the same device is already there (it replaced this one, or logged in as this one
        // expired, and has taken the offline queue already: races.rs), to that session's
        // backlog, behind what waits for it.
        // Looked up under the lock: a fresh session is either registered by now (and found
        // here), or its `session_opened` comes after this and takes the offline queue.
        let mut mail = self.mail.lock();
        let heir = hub
            .user_sessions(session.user())
            .into_iter()
            .rev()
            .find(|s| s.id != session.id && s.device() == session.device())
            .map(|s| s.id);
        let waiting = mail.backlog.remove(&session.id).unwrap_or_default();
        self.count_backlogs(&mail);
        mail.bytes -= waiting.bytes;
        let now = hub.unix_ms();
        let back = undelivered
            .iter()
            .filter(|d| d.body_type == CHAT_BODY_TYPE)
            .map(|d| Stored {
                at_ms: now,
                id: d.receipt,
                gzip: d.gzip,
                body: d.body.clone(),
            })
            .chain(waiting.items);
        for m in back {
            if let Some(heir) = &heir {
                if self.fits(&mail, mail.backlog.get(heir), m.body.len()) {
                    let started = !mail.backlog.contains_key(heir);
                    self.hold(hub, &mut mail, heir, started, &m);
                    continue;
                }
            }
            if !self.enqueue_offline(&mut mail, session.user(), m) {
                tracing::debug!(user = %session.user(), "offline queue full: a message is dropped");
            }
        }
    }

    fn uplink(&self, hub: &dyn Hub, session: &SessionInfo, uplink: Uplink, reply: Reply) {
        let mut msg = match Self::decode(hub, &uplink) {
            Ok(m) => m,
            Err(o) => return reply.send(o),
        };
        let now = hub.unix_ms();
        msg.sender = session.user().to_string();
        msg.server_msg_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg.sent_at_ms = now;
        let plain = Bytes::from(msg.encode_to_vec());
        if !hub.fits_a_frame(plain.len()) {
            return reply.send(Outcome::err(
                ErrorCode::Rejected,
                "message too large to deliver",
            ));
        }
        let gz = hub.compressed(&plain);
        let stored = Stored {
            at_ms: now,
            id: msg.server_msg_id,
            gzip: gz.is_some(),
            body: gz.clone().unwrap_or_else(|| plain.clone()),
        };
        // Compressed once, for every recipient that takes gzip.
        let push = Push {
            gzip: gz,
            receipt: msg.server_msg_id,
            ..Push::new(CHAT_BODY_TYPE, plain)
        };
        let busy = || Outcome {
            code: ErrorCode::RateLimited,
            retry_after_ms: BUSY_RETRY_AFTER_MS,
            message: "the recipient has too much waiting; retry later".into(),
            body: Bytes::new(),
        };
        let len = stored.body.len();
        let mut mail = self.mail.lock();
        if mail.accepted.contains(&session.names, uplink.msg_id) {
            // Accepted before, from this device: the client did not hear the ack.
            drop(mail);
            self.resends.fetch_add(1, Ordering::Relaxed);
            return reply.ok();
        }
        match msg.target.clone() {
            Some(ChatTarget::ToUser(user)) => {
                if user.is_empty() {
                    return reply.send(Outcome::err(ErrorCode::Rejected, "empty to_user"));
                }
                let mut targets: Vec<SessionId> =
                    hub.user_sessions(&user).iter().map(|s| s.id).collect();
                if targets.is_empty() && !self.enqueue_offline(&mut mail, &user, stored.clone()) {
                    return reply.send(Outcome::err(
                        ErrorCode::Rejected,
                        "the recipient's offline queue is full",
                    ));
                }
                if user != session.user() {
                    // The sender's other devices see what was sent.
                    targets.extend(
                        hub.user_sessions(session.user())
                            .iter()
                            .map(|s| s.id)
                            .filter(|id| *id != session.id),
                    );
                }
                // Every target takes it or none does: refused to the sender (retriable)
                // rather than delivered to some devices and lost for others.
                let room_for_all = targets.iter().all(|id| match mail.backlog.get(id) {
                    None => hub.has_room(id, len) || self.fits(&mail, None, len),
                    q => self.fits(&mail, q, len),
                });
                if !room_for_all {
                    return reply.send(busy());
                }
                for id in &targets {
                    let waiting = mail.backlog.contains_key(id);
                    self.send(hub, &mut mail, id, waiting, &push, &stored);
                }
            }
            Some(ChatTarget::ToRoom(room)) => {
                if !hub.in_room(&session.id, &room) {
                    return reply.send(Outcome::err(
                        ErrorCode::Rejected,
                        "not a member of the room",
                    ));
                }
                // The gateway fans out; members with a backlog are left out of the push
                // (the message joins their backlog, behind what waits), and members whose
                // buffer refused it start one.
                let mut behind = Vec::new();
                let me = session.id;
                let report = if mail.backlog.is_empty() {
                    // The usual case, and one lookup fewer per member.
                    hub.push_except(&Target::Room(room), &push, &mut |id| *id == me)
                } else {
                    let mail = &mail;
                    hub.push_except(&Target::Room(room), &push, &mut |id| {
                        if *id == me {
                            return true;
                        }
                        let waiting = mail.backlog.contains_key(id);
                        if waiting {
                            behind.push(*id);
                        }
                        waiting
                    })
                };
                for id in &behind {
                    if !self.fits(&mail, mail.backlog.get(id), len) {
                        // A member that cannot keep up with the room misses this message
                        // (logged); the room does not wait for it.
                        tracing::debug!("room backlog full: message skipped");
                        continue;
                    }
                    self.hold(hub, &mut mail, id, false, &stored);
                }
                for id in &report.full {
                    if !self.fits(&mail, None, len) {
                        tracing::debug!("backlogs full: a room message skipped for a member");
                        continue;
                    }
                    self.hold(hub, &mut mail, id, true, &stored);
                }
            }
            None => {
                if !self.fits(&mail, mail.backlog.get(&session.id), len) {
                    return reply.send(busy());
                }
                let waiting = mail.backlog.contains_key(&session.id);
                self.send(hub, &mut mail, &session.id, waiting, &push, &stored);
            }
        }
        let (per_device, max_devices) = (self.accepted_per_device, self.accepted_max_devices);
        mail.accepted
            .record(&session.names, uplink.msg_id, per_device, max_devices);
        drop(mail);
        reply.ok();
    }

    fn room_join(
        &self,
        hub: &dyn Hub,
        session: &SessionInfo,
        room: &str,
        _body: Bytes,
        reply: Reply,
    ) {
        if room.is_empty() {
            return reply.send(Outcome::err(ErrorCode::RoomNotFound, "empty room id"));
        }
        if hub.in_room(&session.id, room) {
            return reply.ok();
        }
        if hub.room_size(room) >= self.room_max_members {
            return reply.send(Outcome::err(ErrorCode::RoomFull, "room is full"));
        }
        reply.ok()
    }

    fn room_leave(&self, hub: &dyn Hub, session: &SessionInfo, room: &str, reply: Reply) {
        if hub.in_room(&session.id, room) {
            reply.ok()
        } else {
            reply.send(Outcome::err(ErrorCode::RoomNotFound, "not a member"))
        }
    }

    fn delivered(&self, hub: &dyn Hub, session: &SessionInfo, receipts: &[u64]) {
        self.receipts
            .fetch_add(receipts.len() as u64, Ordering::Relaxed);
        // Acks made room: send on what waits.
        if self.backlogged.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut mail = self.mail.lock();
        if mail.backlog.contains_key(&session.id) {
            self.flush(hub, &mut mail, &session.id);
        }
    }
}
