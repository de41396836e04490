//! What the workers of one gateway share: the sessions and their registry (by id, by user, by
//! room), pushes, kicks, and the links to the workers.
//!
//! Locks: the registry maps are sharded `parking_lot` mutexes; each session has its own
//! mutex. A registry shard lock is never held while a session lock is taken, and the other
//! way round only to *send* a worker command (a channel push), never to take a second lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use crossbeam_channel::Sender;
use hashbrown::HashTable;
use parking_lot::Mutex;
use smallvec::SmallVec;
use tether_codec::{Frame, Header, Limits};
use tether_protocol::pb::{self, ErrorCode, KickReason, Platform};
use thin_vec::ThinVec;

use crate::auth::{Authenticator, Identity};
use crate::clock::Clock;
use crate::config::{Config, MultiDevice};
use crate::metrics::Metrics;
use crate::session::dedup::{Seen, UplinkDedup};
use crate::session::downlink::DownlinkBuffer;
use crate::upstream::{EndReason, Outcome, Reply, ReplyInner, Uplink, Upstream};

/// 128 random bits (PROTOCOL.md §4.2).
pub type SessionId = [u8; 16];

const SHARDS: usize = 64;

/// A connection, as a worker command addresses it: the worker, its slab slot, and the slot's
/// generation (a reused slot has a new one, so a stale command finds nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub worker: u16,
    pub slot: u32,
    pub gen: u32,
}

/// What a worker is asked to do.
#[derive(Debug)]
pub enum Cmd {
    /// The session attached to this connection has downlinks to write.
    Flush(ConnRef),
    /// Write this frame (an UPLINK_ACK or ROOM_RESULT that came back from the upstream).
    Send(ConnRef, Frame),
    /// Send KICK and close; the session is already ended.
    Kick(ConnRef, KickReason, String),
    /// Close (with ERROR `code` first if given); the session stays for resume.
    Close(ConnRef, Option<ErrorCode>),
    /// Start draining: stop accepting, GOAWAY everyone over the window, then exit.
    Drain,
    /// Close everything now and exit (no GOAWAY).
    Stop,
    /// Look at the clock (a manual clock moved).
    Tick,
}

struct WorkerLink {
    tx: Sender<Cmd>,
    waker: mio::Waker,
    /// Set when a wake is pending: senders skip the eventfd write (one per batch, not per
    /// command).
    woken: AtomicBool,
}

/// Where a session's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    Attached(ConnRef),
    /// Waiting for a resume; `epoch` tells this detach from a later one.
    Detached {
        epoch: u32,
    },
    Ended,
}

pub(crate) struct State {
    pub downlink: DownlinkBuffer,
    pub dedup: UplinkDedup,
    pub link: Link,
    /// The highest seq written to the attached connection.
    pub sent: u64,
    pub flush_queued: bool,
    /// A resume attached this session: its next fill is a replay, packed into gzip BATCH
    /// frames when long. Live traffic is never packed per connection (encode once, send to
    /// many: a burst of a busy room would otherwise be compressed once per member).
    pub replay: bool,
    pub epoch: u32,
    /// Transient (seq 0) downlinks waiting for the next flush.
    /// (ThinVec: 8 bytes and no allocation while empty, which is nearly always.)
    pub transient: ThinVec<(u32, bool, Bytes)>,
    pub rooms: ThinVec<Arc<str>>,
    pub bucket: TokenBucket,
}

/// A token bucket for a session's uplinks: 8 bytes, time in milliseconds of the gateway clock.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TokenBucket {
    /// Tokens spent and not yet refilled, in thousandths of a token.
    debt_milli: u32,
    /// When `debt_milli` was last brought up to date (gateway ms, truncated).
    at_ms: u32,
}

impl TokenBucket {
    /// Takes one token at `now_ms` with `rate` per second and `burst` above it. `None`: go
    /// ahead; `Some(ms)`: refused, a token is back in `ms`. `rate` 0 means no limit.
    pub(crate) fn take(&mut self, now_ms: u64, rate: u32, burst: u32) -> Option<u32> {
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
}

/// One session: a (user, device) logged in, attached to a connection or waiting for one.
pub struct Session {
    pub id: SessionId,
    pub user: Arc<str>,
    pub device: Box<str>,
    pub platform: Platform,
    pub accept_gzip: bool,
    pub(crate) state: Mutex<State>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &hex(&self.id))
            .field("user", &self.user)
            .field("device", &self.device)
            .finish()
    }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    pub fn is_attached(&self) -> bool {
        matches!(self.state.lock().link, Link::Attached(_))
    }

    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.state.lock().rooms.to_vec()
    }

    /// (unacked downlinks, their body bytes, last seq pushed).
    pub fn downlink_state(&self) -> (usize, usize, u64) {
        let st = self.state.lock();
        let (n, b) = st.downlink.unacked();
        (n, b, st.downlink.last_seq())
    }
}

/// Who a push goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Session(SessionId),
    User(String),
    Users(Vec<String>),
    Room(String),
    All,
}

/// A downlink to push.
#[derive(Debug, Clone)]
pub struct Push {
    pub body_type: u32,
    /// The plain body; the gateway compresses it (once) for clients that take gzip.
    pub body: Bytes,
    /// Seq 0: not buffered, not acked, only to attached sessions (typing, presence).
    pub transient: bool,
    /// Non-zero: reported back to the upstream when the client acks it.
    pub receipt: u64,
}

impl Push {
    pub fn new(body_type: u32, body: impl Into<Bytes>) -> Push {
        Push {
            body_type,
            body: body.into(),
            transient: false,
            receipt: 0,
        }
    }
}

struct Shards<K, V> {
    shards: Box<[Mutex<HashMap<K, V>>]>,
    hasher: std::hash::RandomState,
}

impl<K: Hash + Eq, V> Shards<K, V> {
    fn new() -> Self {
        Shards {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> &Mutex<HashMap<K, V>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }
}

/// A sharded hash table of values found by a key each value carries (a session by its id, a
/// user's session list by the user): a slot holds the value alone (8 bytes for a session, 24
/// for a list), with no second copy of the key beside it. Every session is in both tables,
/// so their slots are a good part of an idle connection's memory.
struct Table<T> {
    shards: Box<[Mutex<HashTable<T>>]>,
    hasher: std::hash::RandomState,
}

impl<T> Table<T> {
    fn new() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn hash<Q: Hash + ?Sized>(&self, key: &Q) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard of a key with hash `h`. Chosen from bits mixed out of `h`, so that the keys
    /// of one shard do not share the low bits (bucket index) or the top bits (control tag)
    /// that the table itself uses.
    fn shard(&self, h: u64) -> &Mutex<HashTable<T>> {
        let mixed = (h ^ (h >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(mixed >> 40) as usize % SHARDS]
    }
}

/// What a login bound.
#[derive(Debug)]
pub struct Bound {
    pub session: Arc<Session>,
    pub resumed: bool,
    pub gap: Option<(u64, u64)>,
}

/// The shared state of one gateway.
pub struct Node {
    pub config: Config,
    pub limits: Limits,
    pub clock: Clock,
    pub metrics: Metrics,
    auth: Box<dyn Authenticator>,
    upstream: Arc<dyn Upstream>,
    workers: OnceLock<Vec<WorkerLink>>,
    /// Sessions by id.
    sessions: Table<Arc<Session>>,
    /// A user's sessions, by user (never empty: the user is its first session's), inline (no
    /// allocation for the usual one or two).
    users: Table<SmallVec<[Arc<Session>; 2]>>,
    rooms: Shards<Arc<str>, HashMap<SessionId, Arc<Session>>>,
    pub(crate) connections: AtomicUsize,
    session_count: AtomicUsize,
    draining: AtomicBool,
    pub(crate) stopped_workers: AtomicU32,
    /// Requests with the upstream, by deadline (the timeout is fixed, so this is a FIFO).
    pending: Mutex<std::collections::VecDeque<(u64, std::sync::Weak<ReplyInner>)>>,
    self_ref: OnceLock<std::sync::Weak<Node>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("server_id", &self.config.server_id)
            .finish_non_exhaustive()
    }
}

fn random_id() -> SessionId {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).expect("the OS random source failed");
    id
}

/// The class a platform belongs to for the `per-platform-class` policy.
fn platform_class(p: Platform) -> u8 {
    match p {
        Platform::Android | Platform::Ios | Platform::Unspecified => 0,
        Platform::Desktop => 1,
        Platform::Web => 2,
        Platform::Iot => 3,
    }
}

impl Node {
    pub(crate) fn new(
        config: Config,
        clock: Clock,
        auth: Box<dyn Authenticator>,
        upstream: Arc<dyn Upstream>,
    ) -> Arc<Node> {
        let node = Arc::new(Node {
            limits: config.limits(),
            config,
            clock,
            metrics: Metrics::new(),
            auth,
            upstream,
            workers: OnceLock::new(),
            sessions: Table::new(),
            users: Table::new(),
            rooms: Shards::new(),
            connections: AtomicUsize::new(0),
            session_count: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stopped_workers: AtomicU32::new(0),
            pending: Mutex::new(Default::default()),
            self_ref: OnceLock::new(),
        });
        let _ = node.self_ref.set(Arc::downgrade(&node));
        node
    }

    fn arc(&self) -> Arc<Node> {
        self.self_ref
            .get()
            .and_then(|w| w.upgrade())
            .expect("a Node lives in an Arc")
    }

    pub(crate) fn set_workers(&self, links: Vec<(Sender<Cmd>, mio::Waker)>) {
        let links = links
            .into_iter()
            .map(|(tx, waker)| WorkerLink {
                tx,
                waker,
                woken: AtomicBool::new(false),
            })
            .collect();
        let _ = self.workers.set(links);
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.workers.get().map_or(0, Vec::len)
    }

    /// Called by worker `w` before it drains its channel.
    pub(crate) fn clear_woken(&self, w: u16) {
        if let Some(l) = self.workers.get().and_then(|l| l.get(w as usize)) {
            l.woken.store(false, Ordering::SeqCst);
        }
    }

    pub(crate) fn send(&self, worker: u16, cmd: Cmd) {
        let Some(l) = self.workers.get().and_then(|l| l.get(worker as usize)) else {
            return;
        };
        if l.tx.send(cmd).is_ok() && !l.woken.swap(true, Ordering::SeqCst) {
            let _ = l.waker.wake();
        }
    }

    fn send_all(&self, cmd: impl Fn() -> Cmd) {
        for w in 0..self.worker_count() {
            self.send(w as u16, cmd());
        }
    }

    pub fn upstream(&self) -> &Arc<dyn Upstream> {
        &self.upstream
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts a drain (idempotent): the workers stop accepting, send GOAWAY to their
    /// connections over `drain_window_ms`, close what is left after `drain_linger_ms`, and
    /// stop.
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining");
            self.upstream.draining(&self.arc());
            self.send_all(|| Cmd::Drain);
        }
    }

    /// Makes every worker look at the clock (after a manual clock moved).
    pub fn tick(&self) {
        self.send_all(|| Cmd::Tick);
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.session_count.load(Ordering::Relaxed)
    }

    pub fn session(&self, id: &SessionId) -> Option<Arc<Session>> {
        let h = self.sessions.hash(id);
        self.sessions
            .shard(h)
            .lock()
            .find(h, |s| s.id == *id)
            .cloned()
    }

    /// The live sessions of a user.
    pub fn user_sessions(&self, user: &str) -> Vec<Arc<Session>> {
        let h = self.users.hash(user);
        self.users
            .shard(h)
            .lock()
            .find(h, |l| *l[0].user == *user)
            .map(|l| l.to_vec())
            .unwrap_or_default()
    }

    /// Every live session.
    fn all_sessions(&self) -> Vec<Arc<Session>> {
        let mut all = Vec::with_capacity(self.session_count());
        for shard in self.sessions.shards.iter() {
            all.extend(shard.lock().iter().cloned());
        }
        all
    }

    /// The sessions in a room.
    pub fn room_members(&self, room: &str) -> Vec<Arc<Session>> {
        self.rooms
            .shard(room)
            .lock()
            .get(room)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn room_size(&self, room: &str) -> usize {
        self.rooms
            .shard(room)
            .lock()
            .get(room)
            .map_or(0, HashMap::len)
    }

    pub(crate) fn authenticate(
        &self,
        login: &pb::Login,
    ) -> Result<Identity, crate::auth::AuthError> {
        self.auth.authenticate(login, self.clock.unix_ms())
    }

    /// The heartbeat interval for a platform.
    pub fn heartbeat_ms(&self, platform: Platform) -> u32 {
        match platform {
            Platform::Web => self.config.heartbeat_web_ms,
            _ => self.config.heartbeat_mobile_ms,
        }
    }

    /// Binds an authenticated login on `conn` to a session: resumes the one it names if that
    /// is allowed (PROTOCOL.md §6.6), or makes a fresh one, replacing older sessions as the
    /// multi-device policy says.
    pub(crate) fn bind(&self, id: Identity, login: &pb::Login, conn: ConnRef) -> Bound {
        let platform = Platform::try_from(login.platform).unwrap_or(Platform::Unspecified);
        if let Some(r) = &login.resume {
            match self.try_resume(&id, r, conn) {
                Some(b) => {
                    Metrics::inc(&self.metrics.resumes, "outcome", "resumed");
                    self.upstream.session_opened(&self.arc(), &b.session, true);
                    return b;
                }
                None => Metrics::inc(&self.metrics.resumes, "outcome", "not_resumed"),
            }
        }
        let accept_gzip = login.compression.contains(&(pb::Compression::Gzip as i32));
        let session = Arc::new(Session {
            id: random_id(),
            user: Arc::from(id.user_id.as_str()),
            device: id.device_id.into_boxed_str(),
            platform,
            accept_gzip,
            state: Mutex::new(State {
                downlink: DownlinkBuffer::default(),
                dedup: UplinkDedup::default(),
                link: Link::Attached(conn),
                sent: 0,
                flush_queued: false,
                replay: false,
                epoch: 0,
                transient: ThinVec::new(),
                rooms: ThinVec::new(),
                bucket: TokenBucket::default(),
            }),
        });
        // In the id map before the user's list: a concurrent login that replaces this
        // session finds it in the list and its `end` must find it in the map too.
        let h = self.sessions.hash(&session.id);
        self.sessions
            .shard(h)
            .lock()
            .insert_unique(h, session.clone(), |s| self.sessions.hash(&s.id));
        let mut victims = Vec::new();
        {
            let h = self.users.hash(&*session.user);
            let mut users = self.users.shard(h).lock();
            let list = match users.find_mut(h, |l| l[0].user == session.user) {
                Some(list) => list,
                None => users
                    .insert_unique(h, SmallVec::new(), |l| self.users.hash(&*l[0].user))
                    .into_mut(),
            };
            let class = platform_class(platform);
            list.retain(|s| {
                let replace = match self.config.multi_device {
                    MultiDevice::PerDevice => s.device == session.device,
                    MultiDevice::PerPlatformClass => {
                        s.device == session.device || platform_class(s.platform) == class
                    }
                    MultiDevice::Single => true,
                };
                if replace {
                    victims.push((s.clone(), KickReason::LoggedInElsewhere));
                }
                !replace
            });
            while list.len() >= self.config.max_sessions_per_user.max(1) {
                victims.push((list.remove(0), KickReason::SessionLimit));
            }
            list.push(session.clone());
        }
        self.session_count.fetch_add(1, Ordering::Relaxed);
        self.metrics.sessions.inc();
        for (victim, reason) in victims {
            self.end(&victim, EndReason::Replaced(reason));
        }
        self.upstream.session_opened(&self.arc(), &session, false);
        Bound {
            session,
            resumed: false,
            gap: None,
        }
    }

    fn try_resume(&self, id: &Identity, r: &pb::Resume, conn: ConnRef) -> Option<Bound> {
        let sid: SessionId = r.session_id.as_ref().try_into().ok()?;
        let session = self.session(&sid)?;
        if *session.user != *id.user_id || *session.device != *id.device_id {
            return None;
        }
        let (gap, receipts, old) = {
            let mut st = session.state.lock();
            let old = match st.link {
                Link::Ended => return None,
                Link::Attached(c) => Some(c),
                Link::Detached { .. } => None,
            };
            st.link = Link::Attached(conn);
            // A last_seq above what was ever sent counts as the highest seq sent (§6.6), not
            // as the highest pushed: downlinks buffered while detached were never seen.
            let last_seq = r.last_seq.min(st.sent);
            let mut receipts = Vec::new();
            st.downlink.ack(last_seq, |d| {
                if d.receipt != 0 {
                    receipts.push(d.receipt);
                }
            });
            let gap = st.downlink.resume(last_seq).gap;
            st.sent = st.downlink.acked().max(gap.map_or(0, |g| g.1));
            st.flush_queued = false;
            st.replay = true;
            st.transient.clear();
            (gap, receipts, old)
        };
        if let Some(old) = old {
            // The client came back before we noticed it had gone: drop the old connection.
            self.send(old.worker, Cmd::Close(old, None));
        }
        if !receipts.is_empty() {
            self.upstream.delivered(&self.arc(), &session, &receipts);
        }
        Some(Bound {
            session,
            resumed: true,
            gap,
        })
    }

    /// The connection `conn` of `session` is gone: the session waits for a resume. Returns
    /// the detach epoch to expire it by, or `None` if the session had moved on.
    pub(crate) fn detach(&self, session: &Session, conn: ConnRef) -> Option<u32> {
        let mut st = session.state.lock();
        if st.link != Link::Attached(conn) {
            return None;
        }
        st.epoch = st.epoch.wrapping_add(1);
        st.link = Link::Detached { epoch: st.epoch };
        st.transient.clear();
        st.flush_queued = false;
        Some(st.epoch)
    }

    /// The grace period of the detach `epoch` is over: end the session if it is still
    /// detached since then.
    pub(crate) fn expire(&self, session: &Arc<Session>, epoch: u32) {
        // Checked and ended under one lock: a resume between the two would be undone.
        self.end_if(session, EndReason::Expired, |link| {
            link == Link::Detached { epoch }
        });
    }

    /// Ends a session: out of the registry and its rooms, upstream told, its connection (if
    /// any) kicked when `reason` is a kick or replacement.
    pub fn end(&self, session: &Arc<Session>, reason: EndReason) {
        self.end_if(session, reason, |_| true);
    }

    fn end_if(&self, session: &Arc<Session>, reason: EndReason, when: impl FnOnce(Link) -> bool) {
        let (link, rooms) = {
            let mut st = session.state.lock();
            if st.link == Link::Ended || !when(st.link) {
                return;
            }
            let link = std::mem::replace(&mut st.link, Link::Ended);
            (link, std::mem::take(&mut st.rooms))
        };
        {
            let h = self.sessions.hash(&session.id);
            let mut sessions = self.sessions.shard(h).lock();
            if let Ok(e) = sessions.find_entry(h, |s| Arc::ptr_eq(s, session)) {
                e.remove();
            }
        }
        {
            let h = self.users.hash(&*session.user);
            let mut users = self.users.shard(h).lock();
            if let Ok(mut e) = users.find_entry(h, |l| l[0].user == session.user) {
                let list = e.get_mut();
                list.retain(|s| !Arc::ptr_eq(s, session));
                if list.is_empty() {
                    e.remove();
                }
            }
        }
        for room in rooms {
            self.room_remove_entry(&room, &session.id);
        }
        self.session_count.fetch_sub(1, Ordering::Relaxed);
        self.metrics.sessions.dec();
        Metrics::inc(&self.metrics.sessions_ended, "reason", reason.label());
        if let Link::Attached(c) = link {
            match reason {
                EndReason::Replaced(k) | EndReason::Kicked(k) => {
                    let msg = match k {
                        KickReason::LoggedInElsewhere => "logged in elsewhere",
                        KickReason::SessionLimit => "too many sessions for this user",
                        _ => "kicked",
                    };
                    self.send(c.worker, Cmd::Kick(c, k, msg.into()))
                }
                EndReason::Shutdown | EndReason::Expired => {
                    self.send(c.worker, Cmd::Close(c, None))
                }
            }
        }
        self.upstream.session_ended(&self.arc(), session, reason);
    }

    /// Kicks every session of a user. Returns how many.
    pub fn kick_user(&self, user: &str, reason: KickReason) -> usize {
        let sessions = self.user_sessions(user);
        for s in &sessions {
            self.end(s, EndReason::Kicked(reason));
        }
        Metrics::inc(&self.metrics.kicks, "reason", "admin");
        sessions.len()
    }

    /// Ends every session (at shutdown).
    pub(crate) fn end_all(&self) {
        for s in self.all_sessions() {
            self.end(&s, EndReason::Shutdown);
        }
    }

    fn room_remove_entry(&self, room: &str, id: &SessionId) {
        let mut rooms = self.rooms.shard(room).lock();
        if let Some(m) = rooms.get_mut(room) {
            m.remove(id);
            if m.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Puts a session in a room (the upstream said yes). False if the session has ended.
    pub fn room_add(&self, room: &str, session: &Arc<Session>) -> bool {
        let room: Arc<str> = Arc::from(room);
        {
            let mut st = session.state.lock();
            if st.link == Link::Ended {
                return false;
            }
            if !st.rooms.contains(&room) {
                st.rooms.push(room.clone());
            }
        }
        self.rooms
            .shard(&*room)
            .lock()
            .entry(room.clone())
            .or_default()
            .insert(session.id, session.clone());
        // An `end` or a LEAVE may have run between the two steps: the registry must not keep
        // a member the session no longer lists.
        let still = {
            let st = session.state.lock();
            st.link != Link::Ended && st.rooms.contains(&room)
        };
        if !still {
            self.room_remove_entry(&room, &session.id);
        }
        still
    }

    /// Takes a session out of a room. False if it was not in it.
    pub fn room_remove(&self, room: &str, session: &Session) -> bool {
        let was = {
            let mut st = session.state.lock();
            let n = st.rooms.len();
            st.rooms.retain(|r| **r != *room);
            n != st.rooms.len()
        };
        self.room_remove_entry(room, &session.id);
        was
    }

    /// Puts a request with the upstream under the upstream timeout.
    fn watch(&self, reply: &Reply) {
        let deadline = self.clock.elapsed_ms() + self.config.upstream_timeout_ms as u64;
        let mut p = self.pending.lock();
        // Drop answered requests from the front as we go, so the queue holds about what is
        // really pending.
        while p.front().is_some_and(|(_, w)| w.strong_count() == 0) {
            p.pop_front();
        }
        p.push_back((deadline, reply.watch()));
    }

    /// Answers UPSTREAM_TIMEOUT for every request past its deadline (called by the workers'
    /// timer step).
    pub(crate) fn expire_requests(&self) {
        let now = self.clock.elapsed_ms();
        loop {
            let expired = {
                let mut p = self.pending.lock();
                match p.front() {
                    Some((at, _)) if *at <= now => p.pop_front(),
                    _ => None,
                }
            };
            let Some((_, w)) = expired else { break };
            if let Some(inner) = w.upgrade() {
                inner.answer(Outcome::err(
                    ErrorCode::UpstreamTimeout,
                    "the upstream did not answer in time",
                ));
            }
        }
    }

    /// Pushes a downlink to `target`. Returns the sessions it was queued to (attached ones
    /// and ones in their grace period; transient pushes only count attached ones).
    pub fn push(&self, target: &Target, push: &Push) -> usize {
        let gz = (push.body.len() >= self.config.compress_threshold)
            .then(|| {
                self.config
                    .compress()
                    .compress(push.body.clone(), &self.limits)
            })
            .and_then(|(b, gz)| gz.then_some(b));
        let mut n = 0;
        let mut each = |s: &Arc<Session>| n += self.deliver(s, push, gz.as_ref()) as usize;
        match target {
            Target::Session(id) => {
                if let Some(s) = self.session(id) {
                    each(&s)
                }
            }
            Target::User(u) => self.user_sessions(u).iter().for_each(each),
            Target::Users(us) => us
                .iter()
                .for_each(|u| self.user_sessions(u).iter().for_each(&mut each)),
            Target::Room(r) => self.room_members(r).iter().for_each(each),
            Target::All => self.all_sessions().iter().for_each(each),
        }
        n
    }

    /// Whether a DOWNLINK with a body of `len` bytes fits the frame limit (with room for the
    /// largest DOWNLINK header: two varints).
    pub fn fits_a_frame(&self, len: usize) -> bool {
        const MAX_DOWNLINK_HEADER: usize = 2 + 10 + 1 + 5;
        (tether_protocol::MIN_LENGTH as usize + MAX_DOWNLINK_HEADER + len)
            <= self.limits.frame_len_cap() as usize
    }

    /// Queues one downlink on one session and asks its worker to write it.
    pub fn deliver(&self, s: &Session, push: &Push, gz: Option<&Bytes>) -> bool {
        let (gzip, body) = match gz {
            Some(b) if s.accept_gzip => (true, b.clone()),
            _ => (false, push.body.clone()),
        };
        if !self.fits_a_frame(body.len()) {
            // It could never be written: refuse it here rather than skip a seq later.
            Metrics::inc(&self.metrics.decode_errors, "error", "downlink_too_large");
            return false;
        }
        let mut st = s.state.lock();
        let conn = match st.link {
            Link::Ended => return false,
            Link::Detached { .. } if push.transient => return false,
            Link::Detached { .. } => None,
            Link::Attached(c) => Some(c),
        };
        if push.transient {
            st.transient.push((push.body_type, gzip, body));
        } else {
            let limits = self.config.downlink_limits();
            let pushed = st
                .downlink
                .push(push.body_type, gzip, body, push.receipt, &limits);
            self.metrics.downlinks.inc();
            if pushed.dropped > 0 {
                self.metrics.queue_overflows.inc_by(pushed.dropped as u64);
                if let Some(c) = conn {
                    // The client neither reads nor acks fast enough (PROTOCOL.md §6.5).
                    self.send(c.worker, Cmd::Close(c, Some(ErrorCode::SlowConsumer)));
                    return true;
                }
            }
        }
        if let Some(c) = conn {
            if !st.flush_queued {
                st.flush_queued = true;
                self.send(c.worker, Cmd::Flush(c));
            }
        }
        true
    }

    /// An UPLINK from `session`: dedup, then forward to the upstream. The ack goes to the
    /// session's connection when the upstream answers. Returns an ack to send now, if any.
    pub(crate) fn uplink(&self, session: &Arc<Session>, uplink: Uplink) -> Option<Frame> {
        if uplink.msg_id == 0 {
            return Some(uplink_ack(
                0,
                &Outcome::err(ErrorCode::Rejected, "msg_id 0"),
            ));
        }
        let now_ms = self.clock.elapsed_ms();
        let seen = {
            let mut st = session.state.lock();
            let seen = st.dedup.check(uplink.msg_id, self.config.dedup_window);
            if seen == Seen::New {
                if let Some(wait_ms) =
                    st.bucket
                        .take(now_ms, self.config.uplink_rate, self.config.uplink_burst)
                {
                    // Not forwarded: a resend must be taken as new.
                    st.dedup.forget(uplink.msg_id);
                    drop(st);
                    Metrics::inc(
                        &self.metrics.uplink_acks,
                        "code",
                        ErrorCode::RateLimited.as_str_name(),
                    );
                    return Some(uplink_ack(
                        uplink.msg_id,
                        &Outcome {
                            code: ErrorCode::RateLimited,
                            retry_after_ms: wait_ms,
                            message: "too many uplinks".into(),
                        },
                    ));
                }
            }
            seen
        };
        match seen {
            Seen::InFlight => {
                self.metrics.uplink_duplicates.inc();
                None
            }
            Seen::Done(code) => {
                self.metrics.uplink_duplicates.inc();
                Some(uplink_ack(uplink.msg_id, &Outcome::err(code, "")))
            }
            Seen::New => {
                self.metrics.uplinks.inc();
                let node = self.arc();
                let s = session.clone();
                let msg_id = uplink.msg_id;
                let start = Instant::now();
                let reply = Reply::new(move |o: Outcome| node.uplink_done(&s, msg_id, o, start));
                self.watch(&reply);
                self.upstream.uplink(&self.arc(), session, uplink, reply);
                None
            }
        }
    }

    fn uplink_done(&self, s: &Session, msg_id: u64, o: Outcome, start: Instant) {
        self.metrics
            .upstream_latency
            .observe(start.elapsed().as_secs_f64());
        Metrics::inc(&self.metrics.uplink_acks, "code", o.code.as_str_name());
        let link = {
            let mut st = s.state.lock();
            match o.code {
                ErrorCode::UpstreamUnavailable
                | ErrorCode::UpstreamTimeout
                | ErrorCode::RateLimited => st.dedup.forget(msg_id),
                code => st.dedup.complete(msg_id, code),
            }
            st.link
        };
        if let Link::Attached(c) = link {
            self.send(c.worker, Cmd::Send(c, uplink_ack(msg_id, &o)));
        }
    }

    pub(crate) fn room_request(
        &self,
        session: &Arc<Session>,
        join: bool,
        request_id: u64,
        room: String,
        body: Bytes,
    ) {
        let node = self.arc();
        let s = session.clone();
        let room2 = room.clone();
        let reply = Reply::new(move |o: Outcome| {
            if o.code == ErrorCode::Ok {
                if join {
                    node.room_add(&room2, &s);
                } else {
                    node.room_remove(&room2, &s);
                }
            }
            let link = s.state.lock().link;
            if let Link::Attached(c) = link {
                let f = Frame::new(Header::RoomResult(Box::new(pb::RoomResult {
                    request_id,
                    room_id: room2,
                    code: o.code as i32,
                    message: o.message,
                })));
                node.send(c.worker, Cmd::Send(c, f));
            }
        });
        self.watch(&reply);
        if join {
            self.upstream
                .room_join(&self.arc(), session, &room, body, reply);
        } else {
            self.upstream.room_leave(&self.arc(), session, &room, reply);
        }
    }

    /// A cumulative DOWNLINK_ACK: release acked downlinks, report receipts.
    pub(crate) fn downlink_ack(&self, session: &Arc<Session>, seq: u64) {
        self.metrics.downlink_acks.inc();
        let receipts: Vec<u64> = {
            let mut st = session.state.lock();
            // An ack beyond what this connection was sent is capped there (§6.5).
            let seq = seq.min(st.sent);
            let mut receipts = Vec::new();
            st.downlink.ack(seq, |d| {
                if d.receipt != 0 {
                    receipts.push(d.receipt);
                }
            });
            receipts
        };
        if !receipts.is_empty() {
            self.upstream.delivered(&self.arc(), session, &receipts);
        }
    }
}

pub(crate) fn uplink_ack(msg_id: u64, o: &Outcome) -> Frame {
    Frame::new(Header::UplinkAck(pb::UplinkAck {
        msg_id,
        code: o.code as i32,
        retry_after_ms: o.retry_after_ms,
        message: o.message.clone(),
    }))
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
    }
}
