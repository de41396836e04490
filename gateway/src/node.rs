//! What the workers of one gateway share: the sessions and their registry (by id, by user, by
//! room), pushes, kicks, and the links to the workers.
//!
//! Locks: the registry maps are sharded `parking_lot` mutexes; each session has its own
//! mutex. A registry shard lock is never held while a session lock is taken, and the other
//! way round only to *send* a worker command (a channel push), never to take a second lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
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

use crate::auth::{Authenticator, Identity};
use crate::clock::Clock;
use crate::config::{Config, MultiDevice};
use crate::metrics::Metrics;
pub use crate::session::core::{ConnRef, Delivery, Link, Refusal};
use crate::session::core::{PushBody, SessionCore, SessionLimits, Verdict};
use crate::timer::Tick;
use crate::upstream::{
    EndReason, Hub, LoginRequest, Names, Outcome, Reply, ReplyInner, SessionInfo, Uplink, Upstream,
};
pub use crate::upstream::{Push, PushReport, SessionId, Target};

const SHARDS: usize = 64;

/// Longest `message` of an answer from the upstream passed to a client, bytes (cut at a char
/// boundary); the header limit is 4 KiB.
pub const MAX_ANSWER_MESSAGE: usize = 1024;

/// Slots counting connections awaiting login by source address (a hash of it: two addresses
/// in one slot share its limit, which a random hasher keeps an attacker from arranging).
const PRELOGIN_SLOTS: usize = 4096;

/// The pre-login limit a new connection would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PreloginLimit {
    /// `max_prelogin_connections`.
    Total,
    /// `max_prelogin_per_ip`.
    PerIp,
}

impl PreloginLimit {
    pub(crate) fn label(self) -> &'static str {
        match self {
            PreloginLimit::Total => "total",
            PreloginLimit::PerIp => "per_ip",
        }
    }

    /// What the refused client is told.
    pub(crate) fn message(self) -> &'static str {
        match self {
            PreloginLimit::Total => "too many connections awaiting login",
            PreloginLimit::PerIp => "too many connections awaiting login from this address",
        }
    }
}

/// Requests with the upstream by deadline (elapsed ms).
type Pending = std::collections::VecDeque<(u64, std::sync::Weak<ReplyInner>)>;

/// What a worker is asked to do.
#[derive(Debug)]
pub(crate) enum Cmd {
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
    /// The upstream answered a login after its `login` call had returned.
    LoginVerdict(Box<crate::worker::PendingLogin>, Outcome),
    /// A sibling process answered the claim of the session a login asks to resume: its
    /// snapshot, or `None` (not there, or no answer).
    Claimed(
        Box<crate::worker::PendingLogin>,
        Option<Box<crate::session::core::Snapshot>>,
    ),
}

struct WorkerLink {
    tx: Sender<Cmd>,
    waker: mio::Waker,
    /// Set when a wake is pending: senders skip the eventfd write (one per batch, not per
    /// command).
    woken: AtomicBool,
}

/// One session: a (user, device) logged in, attached to a connection or waiting for one.
/// What never changes is here; everything else is its [`SessionCore`], under its lock.
pub struct Session {
    pub id: SessionId,
    /// The user and device ids, in one allocation shared with every [`SessionInfo`] of it.
    pub names: Names,
    /// The platform class of the login that made it (for the `per-platform-class` policy,
    /// read under a registry shard lock, where a session lock must not be taken).
    class: u8,
    /// The login buckets of its device and its user, as its latest login left them (read
    /// under a registry shard lock, where the session lock must not be taken: atomics).
    logins: AtomicLogins,
    pub(crate) state: Mutex<SessionCore>,
}

/// A login's buckets: its device's and its user's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Logins {
    device: crate::session::bucket::TokenBucket,
    user: crate::session::bucket::TokenBucket,
}

#[derive(Debug, Default)]
struct AtomicLogins {
    device: std::sync::atomic::AtomicU64,
    user: std::sync::atomic::AtomicU64,
}

impl AtomicLogins {
    fn new(l: Logins) -> AtomicLogins {
        let a = AtomicLogins::default();
        a.set(l);
        a
    }

    fn set(&self, l: Logins) {
        self.device.store(l.device.to_bits(), Ordering::Relaxed);
        self.user.store(l.user.to_bits(), Ordering::Relaxed);
    }

    fn device(&self) -> crate::session::bucket::TokenBucket {
        crate::session::bucket::TokenBucket::from_bits(self.device.load(Ordering::Relaxed))
    }

    fn user(&self) -> crate::session::bucket::TokenBucket {
        crate::session::bucket::TokenBucket::from_bits(self.user.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &hex(&self.id))
            .field("names", &self.names)
            .finish()
    }
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Session {
    pub fn user(&self) -> &str {
        self.names.user()
    }

    pub fn device(&self) -> &str {
        self.names.device()
    }

    pub fn is_attached(&self) -> bool {
        self.state.lock().is_attached()
    }

    pub fn rooms(&self) -> Vec<Arc<str>> {
        self.state.lock().rooms().to_vec()
    }

    pub fn in_room(&self, room: &str) -> bool {
        self.state.lock().in_room(room)
    }

    /// Whether the latest login or resume asked for gzip bodies.
    pub fn accepts_gzip(&self) -> bool {
        self.state.lock().accept_gzip()
    }

    /// The platform of the latest login or resume.
    pub fn platform(&self) -> Platform {
        self.state.lock().platform()
    }

    /// (unacked downlinks, their body bytes, last seq pushed).
    pub fn downlink_state(&self) -> (usize, usize, u64) {
        self.state.lock().downlink_state()
    }

    /// The session as a back end sees it, with `core` its state (under its lock).
    pub(crate) fn info(&self, core: &SessionCore, peer: Option<SocketAddr>) -> SessionInfo {
        SessionInfo {
            id: self.id,
            names: self.names.clone(),
            platform: core.platform(),
            peer,
            attached: core.is_attached(),
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
    pub(crate) session_limits: SessionLimits,
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
    /// Connections awaiting login, in all and per source-address slot.
    prelogin: AtomicUsize,
    prelogin_by_ip: Box<[AtomicU32]>,
    ip_hasher: std::collections::hash_map::RandomState,
    /// Requests with the upstream, by deadline (the timeout is fixed, so each is a FIFO), in
    /// one queue per thread stripe: a worker watches and expires its own requests, and no
    /// lock is shared by the workers per uplink.
    pending: Box<[crossbeam_utils::CachePadded<Mutex<Pending>>]>,
    /// With `--processes`: the sibling processes, and the handoff of sessions between them.
    pub(crate) handoff: OnceLock<crate::handoff::Handoff>,
    /// Sessions handed to a sibling with uplinks still with this process's upstream: the
    /// sibling to relay their answers to, until the upstream timeout (elapsed ms) passes.
    moved_to: Mutex<Expiring<SessionId, u16>>,
    /// Uplinks in flight in sessions taken from a sibling (see [`Relays`]).
    relayed: Mutex<Relays>,
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

/// Uplinks in flight in sessions taken from a sibling process: each answered when the
/// sibling relays its upstream's answer, or UPSTREAM_TIMEOUT here (the reply is watched). An
/// answer relayed before the session is taken in (the claim's answer and the relay race)
/// waits in `early` until then, for the upstream timeout at most.
#[derive(Default)]
struct Relays {
    replies: HashMap<(SessionId, u64), Reply>,
    early: Expiring<(SessionId, u64), Outcome>,
}

/// A map whose entries lapse at a deadline (elapsed ms). Deadlines are inserted in order
/// (now + a fixed timeout), so lapsed entries leave from the front of a FIFO: pruning is O(1)
/// per entry, however many there are.
struct Expiring<K, V> {
    map: HashMap<K, (V, u64)>,
    order: std::collections::VecDeque<(u64, K)>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Expiring {
            map: HashMap::new(),
            order: Default::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy, V> Expiring<K, V> {
    fn prune(&mut self, now: u64) {
        while let Some(&(until, k)) = self.order.front() {
            if until > now {
                break;
            }
            self.order.pop_front();
            if self.map.get(&k).is_some_and(|(_, u)| *u == until) {
                self.map.remove(&k);
            }
        }
    }

    fn insert(&mut self, k: K, v: V, now: u64, until: u64) {
        self.prune(now);
        self.map.insert(k, (v, until));
        self.order.push_back((until, k));
    }

    fn get(&mut self, k: &K, now: u64) -> Option<&V> {
        self.prune(now);
        self.map.get(k).map(|(v, _)| v)
    }

    fn remove(&mut self, k: &K, now: u64) -> Option<V> {
        self.prune(now);
        self.map.remove(k).map(|(v, _)| v)
    }
}

/// What pushes added to the node-wide metrics, counted once per push.
#[derive(Default)]
struct Tally {
    buffered: i64,
    downlinks: u64,
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
        Arc::new(Node {
            limits: config.limits(),
            session_limits: config.session_limits(),
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
            prelogin: AtomicUsize::new(0),
            prelogin_by_ip: (0..PRELOGIN_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            ip_hasher: Default::default(),
            pending: (0..crate::metrics::STRIPES)
                .map(|_| Default::default())
                .collect(),
            handoff: OnceLock::new(),
            moved_to: Default::default(),
            relayed: Default::default(),
        })
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

    /// Calls the upstream with this node as its hub. A panic in the upstream stops at this
    /// call (logged and counted; a reply it held answers `INTERNAL` as it is dropped): it
    /// never unwinds a worker, whose sessions would stay attached forever.
    fn up(&self, what: &'static str, f: impl FnOnce(&dyn Upstream, &dyn Hub)) {
        let call = AssertUnwindSafe(|| f(&*self.upstream, self));
        if std::panic::catch_unwind(call).is_err() {
            Metrics::inc(&self.metrics.upstream_panics, "call", what);
            tracing::error!("the upstream panicked in {what}; the gateway carries on");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts a drain (idempotent): the workers stop accepting, send GOAWAY to their
    /// connections over `drain_window_ms`, close what is left after `drain_linger_ms`, and
    /// stop.
    pub fn drain(self: &Arc<Self>) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::info!("draining");
            self.up("draining", |u, hub| u.draining(hub));
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
            .find(h, |l| l[0].user() == user)
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

    /// Takes a login token for this device and this user: `Ok` with the buckets the session
    /// it binds will carry on, or `Err(ms)`: refused (RATE_LIMITED), retry after `ms`.
    ///
    /// The buckets live in the sessions, not in a table of their own: the newest session of
    /// the device holds the device's, the newest of the user the user's, and each login
    /// carries them on to the session it binds (or resumes). So they cost nothing beyond
    /// the sessions (memory follows live and detached sessions), and a device or user with
    /// no session left starts with a full bucket, which it can reach only by going quiet for
    /// the grace period. Two logins at the same instant may both pass (each read the same
    /// bucket): at most one extra.
    pub(crate) fn take_login(&self, id: &Names) -> Result<Logins, u32> {
        let now = self.clock.elapsed_ms();
        let c = &self.config;
        let mut l = Logins::default();
        {
            let h = self.users.hash(id.user());
            let users = self.users.shard(h).lock();
            if let Some(list) = users.find(h, |l| l[0].user() == id.user()) {
                if let Some(s) = list.last() {
                    l.user = s.logins.user();
                }
                if let Some(s) = list.iter().rev().find(|s| s.device() == id.device()) {
                    l.device = s.logins.device();
                }
            }
        }
        let device = l
            .device
            .take(now, c.login_rate_per_device, c.login_burst_per_device);
        let user = || {
            l.user
                .take(now, c.login_rate_per_user, c.login_burst_per_user)
        };
        match device.or_else(user) {
            Some(ms) => Err(ms),
            None => Ok(l),
        }
    }

    /// A connection from `ip` starts waiting for its login: `Ok(key)` to leave with, or the
    /// limit it would pass.
    pub(crate) fn prelogin_enter(&self, ip: std::net::IpAddr) -> Result<u32, PreloginLimit> {
        let max = self.config.max_prelogin_connections;
        let counted = self
            .prelogin
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                (c < max).then_some(c + 1)
            });
        if counted.is_err() {
            return Err(PreloginLimit::Total);
        }
        // An IPv6 client has a /64 to itself at least: it is one source.
        let h = match ip {
            std::net::IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => {
                self.ip_hasher.hash_one(&a.octets()[..8])
            }
            ip => self.ip_hasher.hash_one(ip.to_canonical()),
        };
        let key = (h as usize % PRELOGIN_SLOTS) as u32;
        let per = self.config.max_prelogin_per_ip;
        let counted = self.prelogin_by_ip[key as usize].fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |c| (per == 0 || c < per).then_some(c + 1),
        );
        if counted.is_err() {
            self.prelogin.fetch_sub(1, Ordering::SeqCst);
            return Err(PreloginLimit::PerIp);
        }
        self.metrics.awaiting_login.inc();
        Ok(key)
    }

    /// A connection that entered with `key` logged in or closed.
    pub(crate) fn prelogin_leave(&self, key: u32) {
        self.prelogin.fetch_sub(1, Ordering::SeqCst);
        self.prelogin_by_ip[key as usize].fetch_sub(1, Ordering::SeqCst);
        self.metrics.awaiting_login.dec();
    }

    /// Connections awaiting login.
    pub fn awaiting_login(&self) -> usize {
        self.prelogin.load(Ordering::SeqCst)
    }

    /// The heartbeat interval for a platform.
    pub fn heartbeat_ms(&self, platform: Platform) -> u32 {
        match platform {
            Platform::Web => self.config.heartbeat_web_ms,
            _ => self.config.heartbeat_mobile_ms,
        }
    }

    /// Runs `f` on a session's core under its lock, keeping the count of buffered bytes in
    /// step with what `f` did to the buffer (one add to this thread's stripe, only when it
    /// changed).
    pub(crate) fn with_core<R>(&self, s: &Session, f: impl FnOnce(&mut SessionCore) -> R) -> R {
        let mut moved = 0;
        let r = Self::with_core_counted(s, &mut moved, f);
        if moved != 0 {
            self.metrics.buffered.add(moved);
        }
        r
    }

    /// [`with_core`](Self::with_core), adding the change in buffered bytes to `moved` for
    /// the caller to count once (a push to many sessions: one atomic add, not one each).
    fn with_core_counted<R>(
        s: &Session,
        moved: &mut i64,
        f: impl FnOnce(&mut SessionCore) -> R,
    ) -> R {
        let mut core = s.state.lock();
        let before = core.downlink_state().1;
        let r = f(&mut core);
        *moved += core.downlink_state().1 as i64 - before as i64;
        r
    }

    /// Body bytes of accepted, unacked downlinks over every live session.
    pub fn buffered_bytes(&self) -> usize {
        self.metrics.buffered.sum().max(0) as usize
    }

    /// Binds an authenticated login on `conn` at `now` to a session: resumes the one it names
    /// if that is allowed (PROTOCOL.md §6.6), or makes a fresh one, replacing older sessions
    /// as the multi-device policy says.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bind(
        &self,
        id: Names,
        logins: Logins,
        login: &pb::Login,
        login_body: &Bytes,
        conn: ConnRef,
        peer: Option<SocketAddr>,
        now: Tick,
    ) -> Bound {
        let platform = Platform::try_from(login.platform).unwrap_or(Platform::Unspecified);
        let accept_gzip = login.compression.contains(&(pb::Compression::Gzip as i32));
        if let Some(r) = &login.resume {
            match self.try_resume(&id, r, conn, accept_gzip, platform, now) {
                Some(b) => {
                    b.session.logins.set(logins);
                    Metrics::inc(&self.metrics.resumes, "outcome", "resumed");
                    let info = b.session.info(&b.session.state.lock(), peer);
                    self.up("session_attached", |u, hub| {
                        u.session_attached(hub, &info, login_body)
                    });
                    return b;
                }
                None => Metrics::inc(&self.metrics.resumes, "outcome", "not_resumed"),
            }
        }
        let mut sid = random_id();
        if let Some(h) = self.handoff.get() {
            // The id names this process, for a resume that lands on a sibling.
            h.siblings.stamp(&mut sid);
        }
        let session = Arc::new(Session {
            id: sid,
            names: id,
            class: platform_class(platform),
            logins: AtomicLogins::new(logins),
            state: Mutex::new(SessionCore::new(conn, accept_gzip, platform, now)),
        });
        self.register(&session, platform, true);
        let info = session.info(&session.state.lock(), peer);
        self.up("session_opened", |u, hub| {
            u.session_opened(hub, &info, login_body)
        });
        Bound {
            session,
            resumed: false,
            gap: None,
        }
    }

    /// Puts a new session in the registry (by id, then in its user's list), ending the
    /// sessions the multi-device policy says it replaces; a replaced session of the same
    /// device hands it its rate bucket and dedup window.
    fn register(&self, session: &Arc<Session>, platform: Platform, inherit: bool) {
        // In the id map before the user's list: a concurrent login that replaces this
        // session finds it in the list and its `end` must find it in the map too.
        let h = self.sessions.hash(&session.id);
        self.sessions
            .shard(h)
            .lock()
            .insert_unique(h, session.clone(), |s| self.sessions.hash(&s.id));
        let mut victims = Vec::new();
        {
            let h = self.users.hash(session.user());
            let mut users = self.users.shard(h).lock();
            let list = match users.find_mut(h, |l| l[0].user() == session.user()) {
                Some(list) => list,
                None => users
                    .insert_unique(h, SmallVec::new(), |l| self.users.hash(l[0].user()))
                    .into_mut(),
            };
            let class = platform_class(platform);
            list.retain(|s| {
                let replace = match self.config.multi_device {
                    MultiDevice::PerDevice => s.device() == session.device(),
                    MultiDevice::PerPlatformClass => {
                        s.device() == session.device() || s.class == class
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
            // The same device logging in again carries on with its rate bucket and its
            // dedup window: a re-login neither refills the bucket nor forwards a resend
            // again.
            let heir = (inherit && victim.device() == session.device()).then_some(session);
            self.end_if(&victim, EndReason::Replaced(reason), heir, |_| true);
        }
    }

    /// Hands a session over to the sibling process that claims it (`--processes`): its
    /// snapshot, and it ends here as `Moved` (its connection, if any, kicked
    /// `RESUMED_ELSEWHERE`; its unacked downlinks go with the snapshot, not to the upstream).
    /// `None` if there is no such session of this user and device.
    pub(crate) fn hand_off(
        &self,
        id: &SessionId,
        user: &str,
        device: &str,
        to: u16,
    ) -> Option<crate::session::core::Snapshot> {
        let session = self.session(id)?;
        if session.user() != user || session.device() != device {
            return None;
        }
        let mut snapshot = None;
        self.end_if(&session, EndReason::Moved, None, |core| {
            let s = core.snapshot();
            if !s.in_flight.is_empty() {
                // Recorded under the session's lock: an answer that finds it ended finds
                // this too.
                let now = self.clock.elapsed_ms();
                let until = now + self.config.upstream_timeout_ms as u64;
                self.moved_to.lock().insert(*id, to, now, until);
            }
            snapshot = Some(s);
            true
        })?;
        snapshot
    }

    /// The upstream's answer to an uplink of a session that moved to a sibling: relayed to
    /// it. False if the session did not move (or its answers are past relaying).
    fn relay(&self, id: &SessionId, msg_id: u64, o: &Outcome) -> bool {
        let now = self.clock.elapsed_ms();
        let Some(to) = self.moved_to.lock().get(id, now).copied() else {
            return false;
        };
        let Some(h) = self.handoff.get() else {
            return false;
        };
        h.relay(crate::handoff::RelayJob {
            to: to as usize,
            session_id: *id,
            msg_id,
            outcome: o.clone(),
        });
        true
    }

    /// A sibling relayed its upstream's answer to an uplink of a session it handed here.
    pub(crate) fn relayed_answer(&self, id: &SessionId, msg_id: u64, o: Outcome) {
        let reply = {
            let mut r = self.relayed.lock();
            let reply = r.replies.remove(&(*id, msg_id));
            if reply.is_none() {
                let now = self.clock.elapsed_ms();
                let until = now + self.config.upstream_timeout_ms as u64;
                r.early.insert((*id, msg_id), o.clone(), now, until);
            }
            reply
        };
        if let Some(reply) = reply {
            reply.send(o)
        }
    }

    /// Takes in a session a sibling process handed over: registered here under its id,
    /// detached, waiting for the resume that claimed it (or for its grace period). Returns the
    /// detach epoch to expire it by, or `None` if a session of that id is here already.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        id: SessionId,
        identity: &Names,
        snapshot: crate::session::core::Snapshot,
        now: Tick,
    ) -> Option<u32> {
        if self.session(&id).is_some() {
            return None;
        }
        let platform = snapshot.platform;
        let in_flight = snapshot.in_flight.clone();
        let core = SessionCore::restore(snapshot, now);
        let rooms: Vec<Arc<str>> = core.rooms().to_vec();
        let session = Arc::new(Session {
            id,
            names: identity.clone(),
            class: platform_class(platform),
            logins: AtomicLogins::default(),
            state: Mutex::new(core),
        });
        let bytes = session.state.lock().downlink_state().1;
        self.metrics.buffered.add(bytes as i64);
        self.register(&session, platform, false);
        for room in rooms {
            self.room_insert_entry(room, &session);
        }
        let mut relays = self.relayed.lock();
        let now_ms = self.clock.elapsed_ms();
        for msg_id in in_flight {
            let key = (id, msg_id);
            if let Some(o) = relays.early.remove(&key, now_ms) {
                // Answered already: the window has it for the resend (the session is not
                // attached yet: no ack to send).
                session.state.lock().uplink_answered(msg_id, o.code);
                continue;
            }
            let (node, s, start) = (Arc::downgrade(self), session.clone(), Instant::now());
            let reply = Reply::new(move |o: Outcome| {
                if let Some(node) = node.upgrade() {
                    let gone = node.relayed.lock().replies.remove(&key);
                    drop(gone);
                    node.uplink_done(&s, msg_id, o, start);
                }
            });
            self.watch(&reply);
            relays.replies.insert(key, reply);
        }
        Some(0)
    }

    fn try_resume(
        &self,
        id: &Names,
        r: &pb::Resume,
        conn: ConnRef,
        accept_gzip: bool,
        platform: Platform,
        now: Tick,
    ) -> Option<Bound> {
        let sid: SessionId = r.session_id.as_ref().try_into().ok()?;
        let session = self.session(&sid)?;
        if session.user() != id.user() || session.device() != id.device() {
            return None;
        }
        let (resumed, info) = self.with_core(&session, |core| {
            let r = core.resume(conn, r.last_seq, accept_gzip, platform, now)?;
            Some((r, session.info(core, None)))
        })?;
        if let Some(old) = resumed.replaced {
            // The client came back before we noticed it had gone, or another instance holds
            // the session: that connection is done, the session goes on here (§6.6).
            self.kick_resumed_elsewhere(old);
        }
        if !resumed.receipts.is_empty() {
            self.up("delivered", |u, hub| {
                u.delivered(hub, &info, &resumed.receipts)
            });
        }
        Some(Bound {
            session,
            resumed: true,
            gap: resumed.gap,
        })
    }

    /// KICK `RESUMED_ELSEWHERE` to a connection whose session went on on another one.
    fn kick_resumed_elsewhere(&self, c: ConnRef) {
        let msg = "resumed on another connection";
        self.send(
            c.worker,
            Cmd::Kick(c, KickReason::ResumedElsewhere, msg.into()),
        );
    }

    /// The connection `conn` of `session` is gone: the session waits for a resume. Returns
    /// the detach epoch to expire it by, or `None` if the session had moved on.
    pub(crate) fn detach(&self, session: &Session, conn: ConnRef) -> Option<u32> {
        let (epoch, info) = {
            let mut core = session.state.lock();
            let epoch = core.detach(conn)?;
            (epoch, session.info(&core, None))
        };
        self.up("session_detached", |u, hub| u.session_detached(hub, &info));
        Some(epoch)
    }

    /// The grace period of the detach `epoch` is over: end the session if it is still
    /// detached since then.
    pub(crate) fn expire(&self, session: &Arc<Session>, epoch: u32) {
        // Checked and ended under one lock: a resume between the two would be undone.
        self.end_if(session, EndReason::Expired, None, |core| {
            core.detached_since(epoch)
        });
    }

    /// Ends a session: out of the registry and its rooms, its buffers released at once, the
    /// upstream told (with everything accepted and never delivered), its connection (if
    /// any) kicked when `reason` is a kick or replacement. False if it had already ended.
    pub fn end(&self, session: &Arc<Session>, reason: EndReason) -> bool {
        self.end_if(session, reason, None, |_| true).is_some()
    }

    /// [`end`](Self::end) if `when` says so, under the same lock. `heir`: the session of
    /// the same device that replaces it, which takes over its rate bucket and dedup window
    /// under both locks, so that an answer to an uplink in flight finds the window either
    /// here (not yet handed on) or there ([`uplink_done`](Self::uplink_done)).
    fn end_if(
        &self,
        session: &Arc<Session>,
        reason: EndReason,
        heir: Option<&Arc<Session>>,
        when: impl FnOnce(&SessionCore) -> bool,
    ) -> Option<()> {
        let (ended, info) = self.with_core(session, |core| {
            if !when(core) {
                return None;
            }
            let mut ended = core.end()?;
            if let Some(heir) = heir {
                // The one place two cores are locked at once (the heir is the newer).
                heir.state.lock().inherit(std::mem::take(&mut ended.carry));
            }
            Some((ended, session.info(core, None)))
        })?;
        {
            let h = self.sessions.hash(&session.id);
            let mut sessions = self.sessions.shard(h).lock();
            if let Ok(e) = sessions.find_entry(h, |s| Arc::ptr_eq(s, session)) {
                e.remove();
            }
        }
        {
            let h = self.users.hash(session.user());
            let mut users = self.users.shard(h).lock();
            if let Ok(mut e) = users.find_entry(h, |l| l[0].user() == session.user()) {
                let list = e.get_mut();
                list.retain(|s| !Arc::ptr_eq(s, session));
                if list.is_empty() {
                    e.remove();
                }
            }
        }
        for room in &ended.rooms {
            self.room_remove_entry(room, &session.id);
        }
        self.session_count.fetch_sub(1, Ordering::Relaxed);
        self.metrics.sessions.dec();
        Metrics::inc(&self.metrics.sessions_ended, "reason", reason.label());
        // A moved session's downlinks went with it: nothing here is undelivered.
        let undelivered: &[crate::upstream::Downlink] = match reason {
            EndReason::Moved => &[],
            _ => &ended.undelivered,
        };
        if !undelivered.is_empty() {
            self.metrics
                .undelivered
                .get_or_create(&[("reason", reason.label())])
                .inc_by(undelivered.len() as u64);
        }
        if let Link::Attached(c) = ended.link {
            match reason {
                EndReason::Moved => self.kick_resumed_elsewhere(c),
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
        self.up("session_ended", |u, hub| {
            u.session_ended(hub, &info, reason, undelivered)
        });
        Some(())
    }

    /// Kicks every session of a user. Returns how many.
    pub fn kick_user(&self, user: &str, reason: KickReason) -> usize {
        self.kick_sessions(&Target::User(user.into()), reason)
    }

    /// Ends every session `target` names with a KICK of `reason`. Returns how many.
    pub fn kick_sessions(&self, target: &Target, reason: KickReason) -> usize {
        let mut n = 0;
        self.each_target(target, |s| {
            if self.end(s, EndReason::Kicked(reason)) {
                n += 1;
            }
        });
        n
    }

    /// Runs `f` on every live session `target` names.
    fn each_target(&self, target: &Target, mut f: impl FnMut(&Arc<Session>)) {
        match target {
            Target::Session(id) => {
                if let Some(s) = self.session(id) {
                    f(&s)
                }
            }
            Target::User(u) => self.user_sessions(u).iter().for_each(f),
            Target::Users(us) => us
                .iter()
                .for_each(|u| self.user_sessions(u).iter().for_each(&mut f)),
            Target::Room(r) => self.room_members(r).iter().for_each(f),
            Target::All => {
                // Shard by shard: a push to everyone never copies the whole registry.
                for shard in self.sessions.shards.iter() {
                    let some: Vec<Arc<Session>> = shard.lock().iter().cloned().collect();
                    some.iter().for_each(&mut f);
                }
            }
        }
    }

    /// Ends every session (at shutdown).
    pub(crate) fn end_all(&self) {
        for s in self.all_sessions() {
            self.end(&s, EndReason::Shutdown);
        }
    }

    fn room_insert_entry(&self, room: Arc<str>, session: &Arc<Session>) {
        self.rooms
            .shard(&*room)
            .lock()
            .entry(room)
            .or_default()
            .insert(session.id, session.clone());
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

    /// Puts a session in a room (the upstream said yes). False if the session has ended or
    /// is in `max_rooms_per_session` rooms already.
    pub fn room_add(&self, room: &str, session: &Arc<Session>) -> bool {
        let room: Arc<str> = Arc::from(room);
        if !session.state.lock().room_add(&room, &self.session_limits) {
            return false;
        }
        self.room_insert_entry(room.clone(), session);
        // An `end` or a LEAVE may have run between the two steps: the registry must not keep
        // a member the session no longer lists.
        let still = {
            let core = session.state.lock();
            !core.is_ended() && core.in_room(&room)
        };
        if !still {
            self.room_remove_entry(&room, &session.id);
        }
        still
    }

    /// Takes a session out of a room. False if it was not in it.
    pub fn room_remove(&self, room: &str, session: &Session) -> bool {
        let was = session.state.lock().room_remove(room);
        self.room_remove_entry(room, &session.id);
        was
    }

    /// Puts a request with the upstream under the upstream timeout.
    fn watch(&self, reply: &Reply) {
        let deadline = self.clock.elapsed_ms() + self.config.upstream_timeout_ms as u64;
        let mut p = self.pending[crate::metrics::stripe()].lock();
        // Drop answered requests from the front as we go, so the queue holds about what is
        // really pending.
        while p.front().is_some_and(|(_, w)| w.strong_count() == 0) {
            p.pop_front();
        }
        p.push_back((deadline, reply.watch()));
    }

    /// Answers UPSTREAM_TIMEOUT for every request this thread watched that is past its
    /// deadline (called by each worker's timer step).
    pub(crate) fn expire_requests(&self) {
        let now = self.clock.elapsed_ms();
        let pending = &self.pending[crate::metrics::stripe()];
        loop {
            let expired = {
                let mut p = pending.lock();
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

    /// The gzip form of a push's body, if it is worth compressing (once, for every session
    /// that takes gzip).
    pub fn compressed(&self, body: &Bytes) -> Option<Bytes> {
        (body.len() >= self.config.compress_threshold)
            .then(|| self.config.compress().compress(body.clone(), &self.limits))
            .and_then(|(b, gz)| gz.then_some(b))
    }

    /// A push's gzip body: the pusher's, or compressed here (once per push).
    fn gzip_of(&self, push: &Push) -> Option<Bytes> {
        match &push.gzip {
            Some(gz) => Some(gz.clone()),
            None => self.compressed(&push.body),
        }
    }

    /// Pushes a downlink to `target`: what became of it, counted over the sessions found.
    pub fn push(&self, target: &Target, push: &Push) -> PushReport {
        self.push_except(target, push, &mut |_| false)
    }

    /// [`push`](Self::push), leaving out the sessions `skip` says to.
    pub fn push_except(
        &self,
        target: &Target,
        push: &Push,
        skip: &mut dyn FnMut(&SessionId) -> bool,
    ) -> PushReport {
        let gz = self.gzip_of(push);
        let now = self.clock.now();
        let mut report = PushReport::default();
        let mut tally = Tally::default();
        self.each_target(target, |s| {
            if !skip(&s.id) {
                let d = self.deliver_counted(s, push, gz.as_ref(), now, &mut tally);
                report.add(&s.id, d)
            }
        });
        self.count(tally);
        report
    }

    /// Whether a DOWNLINK with a body of `len` bytes fits the frame limit.
    pub fn fits_a_frame(&self, len: usize) -> bool {
        len <= self.session_limits.max_body
    }

    /// Whether `session` would take a downlink of `len` body bytes now (a pusher that must
    /// not deliver to some targets and not others checks every target first).
    pub fn has_room(&self, session: &Session, len: usize) -> bool {
        session.state.lock().has_room(len, &self.session_limits)
    }

    /// Queues one downlink on one session (`gz`: its body compressed, for a session that
    /// takes gzip) and asks its worker to write it.
    pub fn deliver(&self, s: &Session, push: &Push, gz: Option<&Bytes>) -> Delivery {
        self.deliver_at(s, push, gz, self.clock.now())
    }

    /// [`deliver`](Self::deliver) at `now` (read once by a pusher with many targets).
    pub fn deliver_at(&self, s: &Session, push: &Push, gz: Option<&Bytes>, now: Tick) -> Delivery {
        let mut tally = Tally::default();
        let d = self.deliver_counted(s, push, gz, now, &mut tally);
        self.count(tally);
        d
    }

    fn count(&self, tally: Tally) {
        if tally.buffered != 0 {
            self.metrics.buffered.add(tally.buffered);
        }
        if tally.downlinks != 0 {
            self.metrics.downlinks.inc_by(tally.downlinks);
        }
    }

    /// [`deliver_at`](Self::deliver_at), counted into `tally` (for the caller to add to
    /// the metrics once per push, not once per session: shared atomics).
    fn deliver_counted(
        &self,
        s: &Session,
        push: &Push,
        gz: Option<&Bytes>,
        now: Tick,
        tally: &mut Tally,
    ) -> Delivery {
        let body = PushBody {
            body_type: push.body_type,
            plain: &push.body,
            gzip: gz,
            receipt: push.receipt,
            transient: push.transient,
        };
        let limits = &self.session_limits;
        let moved = &mut tally.buffered;
        let pushed = Self::with_core_counted(s, moved, |core| core.push(&body, limits, now));
        match pushed.delivery {
            Delivery::Sent | Delivery::Held if !push.transient => tally.downlinks += 1,
            Delivery::Refused(r) => {
                let label = match r {
                    Refusal::Full => "full",
                    Refusal::Ended => "ended",
                    Refusal::NotAttached => "not_attached",
                    Refusal::TooLarge => "too_large",
                };
                Metrics::inc(&self.metrics.pushes_refused, "reason", label);
            }
            _ => {}
        }
        if let Some(c) = pushed.slow {
            // Its buffer has been full, with no ack, for slow_consumer_secs (§6.5).
            self.send(c.worker, Cmd::Close(c, Some(ErrorCode::SlowConsumer)));
        }
        if let Some(c) = pushed.flush {
            self.send(c.worker, Cmd::Flush(c));
        }
        pushed.delivery
    }

    /// An UPLINK from `session`: dedup, the rate bucket, then the upstream. The ack goes to
    /// the session's connection when the upstream answers. Returns an ack to send now, if any.
    pub(crate) fn uplink(
        self: &Arc<Self>,
        session: &Arc<Session>,
        uplink: Uplink,
    ) -> Option<Frame> {
        let now_ms = self.clock.elapsed_ms();
        let (verdict, info) = {
            let mut core = session.state.lock();
            let v = core.handle_uplink(uplink.msg_id, now_ms, &self.session_limits);
            let info = matches!(v, Verdict::Forward).then(|| session.info(&core, None));
            (v, info)
        };
        match verdict {
            Verdict::Wait => {
                self.metrics.uplink_duplicates.inc();
                None
            }
            // Its KICK or close is on the way; the client resends on its next session.
            Verdict::Ended => None,
            Verdict::Ack(code, retry_after_ms) => {
                // A resend answered from the window (rate-limited and msg_id 0 are not).
                if code != ErrorCode::RateLimited && uplink.msg_id != 0 {
                    self.metrics.uplink_duplicates.inc();
                }
                Metrics::inc(&self.metrics.uplink_acks, "code", code.as_str_name());
                let message = match code {
                    ErrorCode::RateLimited => "too many uplinks",
                    ErrorCode::Rejected if uplink.msg_id == 0 => "msg_id 0",
                    _ => "",
                };
                Some(uplink_ack(
                    uplink.msg_id,
                    &Outcome {
                        code,
                        retry_after_ms,
                        message: message.into(),
                        body: Bytes::new(),
                    },
                ))
            }
            Verdict::Forward => {
                self.metrics.uplinks.inc();
                let node = self.clone();
                let s = session.clone();
                let msg_id = uplink.msg_id;
                let start = Instant::now();
                let reply = Reply::new(move |o: Outcome| node.uplink_done(&s, msg_id, o, start));
                self.watch(&reply);
                let info = info.expect("described when forwarded");
                self.up("uplink", |u, hub| u.uplink(hub, &info, uplink, reply));
                None
            }
        }
    }

    fn uplink_done(&self, s: &Session, msg_id: u64, o: Outcome, start: Instant) {
        self.metrics
            .upstream_latency
            .observe(start.elapsed().as_secs_f64());
        Metrics::inc(&self.metrics.uplink_acks, "code", o.code.as_str_name());
        let answer = |core: &mut SessionCore| {
            core.uplink_answered(msg_id, o.code);
            core.link()
        };
        let here = {
            let mut core = s.state.lock();
            (!core.is_ended()).then(|| answer(&mut core))
        };
        let link = match here {
            Some(link) => Some(link),
            // The session ended meanwhile: a login of the same device that replaced it took
            // its window on, this uplink with it, and its client's resend waits for this
            // answer there (a session that ended with no heir took its window with it).
            None => self
                .user_sessions(s.user())
                .iter()
                .filter(|h| !std::ptr::eq(&***h, s) && h.device() == s.device())
                .find_map(|h| {
                    let mut core = h.state.lock();
                    core.uplink_in_flight(msg_id).then(|| answer(&mut core))
                }),
        };
        if link.is_none() && self.relay(&s.id, msg_id, &o) {
            // It moved to a sibling process, which acks it there.
            return;
        }
        if let Some(Link::Attached(c)) = link {
            let o = self.answer_that_fits(o);
            self.send(c.worker, Cmd::Send(c, uplink_ack(msg_id, &o)));
        }
    }

    pub(crate) fn room_request(
        self: &Arc<Self>,
        session: &Arc<Session>,
        join: bool,
        request_id: u64,
        room: String,
        body: Bytes,
    ) -> Option<Frame> {
        let now_ms = self.clock.elapsed_ms();
        let (checked, info) = {
            let mut core = session.state.lock();
            if core.is_ended() {
                // Its KICK or close is on the way: no answer (the client asks again).
                return None;
            }
            let c = core.handle_room_request(join, &room, now_ms, &self.session_limits);
            (c, session.info(&core, None))
        };
        if let Err((code, _retry)) = checked {
            let message = match code {
                ErrorCode::RateLimited => "too many room requests",
                _ => "in too many rooms",
            };
            return Some(room_result(request_id, room, &Outcome::err(code, message)));
        }
        let node = self.clone();
        let s = session.clone();
        let room2 = room.clone();
        let reply = Reply::new(move |o: Outcome| {
            // What the client will hear decides what is done: an OK too large to send is an
            // INTERNAL, and then the room is not joined.
            let mut o = node.answer_that_fits(o);
            if o.code == ErrorCode::Ok {
                let done = if join {
                    node.room_add(&room2, &s)
                } else {
                    node.room_remove(&room2, &s);
                    true
                };
                if !done && !s.state.lock().is_ended() {
                    o = Outcome::err(ErrorCode::RoomForbidden, "in too many rooms");
                }
            }
            let link = s.state.lock().link();
            if let Link::Attached(c) = link {
                let f = room_result(request_id, room2, &o);
                node.send(c.worker, Cmd::Send(c, f));
            }
        });
        self.watch(&reply);
        if join {
            self.up("room_join", |u, hub| {
                u.room_join(hub, &info, &room, body, reply)
            });
        } else {
            self.up("room_leave", |u, hub| {
                u.room_leave(hub, &info, &room, reply)
            });
        }
        None
    }

    /// A cumulative DOWNLINK_ACK: release acked downlinks, report receipts.
    pub(crate) fn downlink_ack(&self, session: &Arc<Session>, seq: u64) {
        self.metrics.downlink_acks.inc();
        let now = self.clock.now();
        let receipted = self.with_core(session, |core| {
            let receipts = core.handle_ack(seq, now);
            (!receipts.is_empty()).then(|| (receipts, session.info(core, None)))
        });
        if let Some((receipts, info)) = receipted {
            self.up("delivered", |u, hub| u.delivered(hub, &info, &receipts));
        }
    }

    /// An upstream's answer as the client can be sent it: a message cut to
    /// [`MAX_ANSWER_MESSAGE`] bytes, and a body too large for a frame replaced by an INTERNAL
    /// answer saying so. (An answer that did not encode was dropped: silence, where the
    /// client is owed an answer.)
    pub(crate) fn answer_that_fits(&self, mut o: Outcome) -> Outcome {
        if o.message.len() > MAX_ANSWER_MESSAGE {
            let mut cut = MAX_ANSWER_MESSAGE;
            while !o.message.is_char_boundary(cut) {
                cut -= 1;
            }
            o.message.truncate(cut);
        }
        if o.body.len() > self.session_limits.max_body {
            Metrics::inc(&self.metrics.answers_too_large, "what", "body");
            return Outcome::err(
                ErrorCode::Internal,
                "the upstream's answer does not fit a frame",
            );
        }
        o
    }

    /// Asks the upstream to admit a login (its answer, or the timeout's, goes to `reply`).
    pub(crate) fn admit(&self, request: &LoginRequest, reply: Reply) {
        self.watch(&reply);
        self.up("login", |u, hub| u.login(hub, request, reply));
    }
}

fn room_result(request_id: u64, room_id: String, o: &Outcome) -> Frame {
    Frame::with_body(
        Header::RoomResult(Box::new(pb::RoomResult {
            request_id,
            room_id,
            code: o.code as i32,
            message: o.message.clone(),
        })),
        o.body.clone(),
    )
}

pub(crate) fn uplink_ack(msg_id: u64, o: &Outcome) -> Frame {
    Frame::with_body(
        Header::UplinkAck(pb::UplinkAck {
            msg_id,
            code: o.code as i32,
            retry_after_ms: o.retry_after_ms,
            message: o.message.clone(),
        }),
        o.body.clone(),
    )
}

impl Hub for Node {
    fn push_except(
        &self,
        target: &Target,
        push: &Push,
        skip: &mut dyn FnMut(&SessionId) -> bool,
    ) -> PushReport {
        Node::push_except(self, target, push, skip)
    }

    fn deliver(&self, session: &SessionId, push: &Push) -> Delivery {
        let Some(s) = self.session(session) else {
            return Delivery::Refused(Refusal::Ended);
        };
        self.deliver_at(&s, push, self.gzip_of(push).as_ref(), self.clock.now())
    }

    fn has_room(&self, session: &SessionId, len: usize) -> bool {
        self.session(session)
            .is_some_and(|s| Node::has_room(self, &s, len))
    }

    fn kick(&self, target: &Target, reason: KickReason) -> usize {
        self.kick_sessions(target, reason)
    }

    fn room_add(&self, session: &SessionId, room: &str) -> bool {
        self.session(session)
            .is_some_and(|s| Node::room_add(self, room, &s))
    }

    fn room_remove(&self, session: &SessionId, room: &str) -> bool {
        self.session(session)
            .is_some_and(|s| Node::room_remove(self, room, &s))
    }

    fn session(&self, id: &SessionId) -> Option<SessionInfo> {
        let s = Node::session(self, id)?;
        let info = s.info(&s.state.lock(), None);
        Some(info)
    }

    fn user_sessions(&self, user: &str) -> Vec<SessionInfo> {
        Node::user_sessions(self, user)
            .iter()
            .map(|s| s.info(&s.state.lock(), None))
            .collect()
    }

    fn room_members(&self, room: &str) -> Vec<SessionId> {
        self.rooms
            .shard(room)
            .lock()
            .get(room)
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    fn room_size(&self, room: &str) -> usize {
        Node::room_size(self, room)
    }

    fn in_room(&self, session: &SessionId, room: &str) -> bool {
        Node::session(self, session).is_some_and(|s| s.in_room(room))
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn fits_a_frame(&self, len: usize) -> bool {
        Node::fits_a_frame(self, len)
    }

    fn compressed(&self, body: &Bytes) -> Option<Bytes> {
        Node::compressed(self, body)
    }

    fn unix_ms(&self) -> u64 {
        self.clock.unix_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::Expiring;

    #[test]
    fn expiring_entries_lapse_at_their_deadline_and_a_renewed_one_keeps_its_new_one() {
        let mut e: Expiring<u32, &str> = Expiring::default();
        e.insert(1, "a", 0, 100);
        e.insert(2, "b", 10, 110);
        assert_eq!(e.get(&1, 99), Some(&"a"));
        assert_eq!(e.get(&1, 100), None, "lapsed at its deadline");
        assert_eq!(e.get(&2, 100), Some(&"b"));
        // Renewed: the old deadline's FIFO entry must not take the new one with it.
        e.insert(2, "c", 105, 205);
        assert_eq!(e.get(&2, 150), Some(&"c"));
        assert_eq!(e.remove(&2, 150), Some("c"));
        assert_eq!(e.remove(&2, 150), None);
        e.insert(3, "d", 150, 250);
        e.prune(1_000);
        assert!(e.map.is_empty() && e.order.is_empty());
    }
}
