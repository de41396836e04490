//! The embedded reference upstream: a small chat back end in the gateway's process, the
//! default when no other upstream is configured, so that the run command is a working chat
//! server. It speaks `tether.chat.v1` (body_type 0, `ChatMessage`):
//!
//! - `to_user`: delivered to every session of that user, and to the sender's other sessions
//!   (so a user's devices all see what was sent); kept in a per-user offline queue (bounded in
//!   count and age, default 1,000 messages and 72 h) when the user has no session at all, and
//!   delivered to the next fresh session of that user;
//! - `to_room`: delivered to the room's other members (the sender must be a member);
//! - no target: echoed back to the sending session.
//!
//! The gateway stamps `sender` (the authenticated user), `server_msg_id` and `sent_at_ms`.
//! Rooms are open: any room id can be joined, up to `room_max_members`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message as _;
use tether_protocol::chat::{chat_message::Target as ChatTarget, ChatMessage};
use tether_protocol::pb::ErrorCode;

use crate::config::Config;
use crate::node::{Delivery, Push, Session, Target};
use crate::upstream::{Downlink, EndReason, Hub, Outcome, Reply, SessionRef, Uplink, Upstream};

/// The body_type of `tether.chat.v1.ChatMessage`.
pub const CHAT_BODY_TYPE: u32 = 0;

/// The reference chat upstream.
#[derive(Debug)]
pub struct ChatUpstream {
    offline: Mutex<HashMap<String, VecDeque<(u64, Bytes)>>>,
    max_messages: usize,
    max_users: usize,
    max_age_ms: u64,
    room_max_members: usize,
    next_id: AtomicU64,
    /// Delivery receipts received (for tests and metrics).
    pub receipts: AtomicU64,
}

impl ChatUpstream {
    pub fn new(config: &Config) -> ChatUpstream {
        ChatUpstream {
            offline: Mutex::new(HashMap::new()),
            max_messages: config.offline_max_messages,
            max_users: config.offline_max_users,
            max_age_ms: config.offline_max_age_secs.saturating_mul(1000),
            room_max_members: config.room_max_members,
            next_id: AtomicU64::new(1),
            receipts: AtomicU64::new(0),
        }
    }

    /// Messages waiting for a user who has no session.
    pub fn offline_len(&self, user: &str) -> usize {
        self.offline.lock().get(user).map_or(0, VecDeque::len)
    }

    fn enqueue_offline(&self, user: &str, now: u64, body: Bytes) {
        if self.max_messages == 0 {
            return;
        }
        let mut all = self.offline.lock();
        if !all.contains_key(user) && all.len() >= self.max_users {
            // Bounded in users too: sweep out what has expired, then give up on this one.
            all.retain(|_, q| {
                q.back()
                    .is_some_and(|(t, _)| t.saturating_add(self.max_age_ms) > now)
            });
            if all.len() >= self.max_users {
                return;
            }
        }
        let q = all.entry(user.to_owned()).or_default();
        while q
            .front()
            .is_some_and(|(t, _)| t.saturating_add(self.max_age_ms) <= now)
        {
            q.pop_front();
        }
        while q.len() >= self.max_messages {
            q.pop_front();
        }
        q.push_back((now, body));
    }

    fn decode(hub: &Hub, uplink: &Uplink) -> Result<ChatMessage, Outcome> {
        if uplink.body_type != CHAT_BODY_TYPE {
            return Err(Outcome::err(
                ErrorCode::Rejected,
                format!("unknown body_type {}", uplink.body_type),
            ));
        }
        let body = if uplink.gzip {
            tether_codec::gunzip(&uplink.body, &hub.limits)
                .map(Bytes::from)
                .map_err(|e| Outcome::err(ErrorCode::Rejected, format!("body: {e}")))?
        } else {
            uplink.body.clone()
        };
        ChatMessage::decode(body)
            .map_err(|e| Outcome::err(ErrorCode::Rejected, format!("not a ChatMessage: {e}")))
    }
}

fn others(hub: &Hub, sessions: Vec<Arc<Session>>, not: &Session, push: &Push) -> usize {
    let mut n = 0;
    for s in sessions {
        if s.id != not.id {
            n += matches!(hub.deliver(&s, push, None), Delivery::Sent | Delivery::Held) as usize;
        }
    }
    n
}

impl Upstream for ChatUpstream {
    fn session_opened(&self, hub: &Hub, session: &SessionRef, resumed: bool) {
        if resumed {
            return;
        }
        let Some(queue) = self.offline.lock().remove(&*session.user) else {
            return;
        };
        let now = hub.clock.unix_ms();
        for (at, body) in queue {
            if at.saturating_add(self.max_age_ms) > now {
                hub.deliver(session, &Push::new(CHAT_BODY_TYPE, body), None);
            }
        }
    }

    fn session_ended(
        &self,
        _hub: &Hub,
        _session: &SessionRef,
        _reason: EndReason,
        _undelivered: &[Downlink],
    ) {
    }

    fn uplink(&self, hub: &Hub, session: &SessionRef, uplink: Uplink, reply: Reply) {
        let mut msg = match Self::decode(hub, &uplink) {
            Ok(m) => m,
            Err(o) => return reply.send(o),
        };
        let now = hub.clock.unix_ms();
        msg.sender = session.user.to_string();
        msg.server_msg_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg.sent_at_ms = now;
        let push = Push::new(CHAT_BODY_TYPE, msg.encode_to_vec());
        if !hub.fits_a_frame(push.body.len()) {
            return reply.send(Outcome::err(
                ErrorCode::Rejected,
                "message too large to deliver",
            ));
        }
        match msg.target.clone() {
            Some(ChatTarget::ToUser(user)) => {
                if user.is_empty() {
                    return reply.send(Outcome::err(ErrorCode::Rejected, "empty to_user"));
                }
                let n = hub.push(&Target::User(user.clone()), &push).accepted();
                if n == 0 {
                    self.enqueue_offline(&user, now, push.body.clone());
                }
                if *user != *session.user {
                    others(hub, hub.user_sessions(&session.user), session, &push);
                }
            }
            Some(ChatTarget::ToRoom(room)) => {
                if !session.in_room(&room) {
                    return reply.send(Outcome::err(
                        ErrorCode::Rejected,
                        "not a member of the room",
                    ));
                }
                others(hub, hub.room_members(&room), session, &push);
            }
            None => {
                hub.deliver(session, &push, None);
            }
        }
        reply.ok();
    }

    fn room_join(&self, hub: &Hub, session: &SessionRef, room: &str, _body: Bytes, reply: Reply) {
        if room.is_empty() {
            return reply.send(Outcome::err(ErrorCode::RoomNotFound, "empty room id"));
        }
        if session.in_room(room) {
            return reply.ok();
        }
        if hub.room_size(room) >= self.room_max_members {
            return reply.send(Outcome::err(ErrorCode::RoomFull, "room is full"));
        }
        reply.ok()
    }

    fn room_leave(&self, _hub: &Hub, session: &SessionRef, room: &str, reply: Reply) {
        if session.in_room(room) {
            reply.ok()
        } else {
            reply.send(Outcome::err(ErrorCode::RoomNotFound, "not a member"))
        }
    }

    fn delivered(&self, _hub: &Hub, _session: &SessionRef, receipts: &[u64]) {
        self.receipts
            .fetch_add(receipts.len() as u64, Ordering::Relaxed);
    }
}
