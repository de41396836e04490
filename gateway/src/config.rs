//! Every setting of the gateway, in one list: a TOML file (`--config`), environment variables
//! (`TETHER_*`) and command-line flags, later ones overriding earlier ones. `tether-gateway
//! --help` prints this list with the defaults.

use std::path::Path;

use serde::Deserialize;
use tether_codec::Limits;

use crate::conn::ConnConfig;
use crate::session::downlink::DownlinkLimits;

/// Which earlier sessions a new login replaces (PROTOCOL.md §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MultiDevice {
    /// One session per (user, device): a second login on the same device kicks the first.
    PerDevice,
    /// One session per (user, platform class: mobile, desktop, web, iot): a phone login kicks
    /// the user's other phone.
    PerPlatformClass,
    /// One session per user.
    Single,
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $env:literal $([$($extra:meta),*])?; )*) => {
        /// The gateway's configuration. Defaults are the named constants of each module.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $name: $default, )* }
            }
        }

        /// Settings given on the command line or in the environment; each overrides the
        /// config file.
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct Overrides {
            $( $(#[doc = $doc])* #[arg(long, env = $env $($(, $extra)*)?)] pub $name: Option<$ty>, )*
        }

        impl Config {
            /// Applies the settings that were given.
            pub fn apply(&mut self, o: Overrides) {
                $( if let Some(v) = o.$name { self.$name = v; } )*
            }
        }
    };
}

settings! {
    /// Plain TCP listen addresses, comma-separated [default: 127.0.0.1:14000].
    listen: Vec<String> = vec!["127.0.0.1:14000".into()], "TETHER_LISTEN" [value_delimiter = ','];
    /// TLS listen addresses (need --tls-cert and --tls-key) [default: none].
    tls_listen: Vec<String> = Vec::new(), "TETHER_TLS_LISTEN" [value_delimiter = ','];
    /// PEM certificate chain for the TLS listeners.
    tls_cert: String = String::new(), "TETHER_TLS_CERT";
    /// PEM private key for the TLS listeners.
    tls_key: String = String::new(), "TETHER_TLS_KEY";
    /// Seconds a TLS handshake may take [default: 10].
    tls_handshake_timeout_secs: u32 = 10, "TETHER_TLS_HANDSHAKE_TIMEOUT_SECS";
    /// Admin and metrics HTTP address; empty disables it; with --processes N, process i listens on its port + i (port 0 stays 0) [default: 127.0.0.1:14080].
    admin_listen: String = "127.0.0.1:14080".into(), "TETHER_ADMIN_LISTEN";
    /// File holding the admin bearer token (its content trimmed of whitespace, at least 16 bytes); when empty, the environment variable TETHER_ADMIN_TOKEN (never a flag) holds it. Without a token only /healthz, /readyz and /metrics are served, on loopback only (gateway/ADMIN.md) [default: none].
    admin_token_file: String = String::new(), "TETHER_ADMIN_TOKEN_FILE";
    /// Serve GET /metrics on the admin port without the admin token [default: false].
    admin_metrics_public: bool = false, "TETHER_ADMIN_METRICS_PUBLIC" [num_args = 0..=1, default_missing_value = "true"];
    /// Ms an admin connection has to send a request's headers, counted from when it is accepted or its previous response was sent; then it is closed [default: 5000].
    admin_header_timeout_ms: u32 = 5_000, "TETHER_ADMIN_HEADER_TIMEOUT_MS";
    /// Ms an admin request has to send its whole body after its headers; then it gets 408 and is closed [default: 10000].
    admin_body_timeout_ms: u32 = 10_000, "TETHER_ADMIN_BODY_TIMEOUT_MS";
    /// Most admin connections open at once; past it a new one is closed at once [default: 64].
    admin_max_connections: usize = 64, "TETHER_ADMIN_MAX_CONNECTIONS";
    /// Worker threads (each with its own SO_REUSEPORT listeners); 0: one per core [default: 0].
    workers: usize = 0, "TETHER_WORKERS";
    /// Gateway processes sharing the listen ports via SO_REUSEPORT, started and supervised by this one (to hold more connections than one process's file limit); sessions are per process. Process i (from 0) gets server_id `<server_id>-<i>`, admin port + i and max_connections / processes (rounded up) [default: 1].
    processes: usize = 1, "TETHER_PROCESSES";
    /// This instance's id, sent in LOGIN_RESULT [default: tether-1].
    server_id: String = "tether-1".into(), "TETHER_SERVER_ID";
    /// Most connections held at once; past it a connection gets ERROR SERVER_BUSY; 0: the process's descriptor limit (RLIMIT_NOFILE) less a reserve of FD_RESERVE, so that a flood gets SERVER_BUSY rather than EMFILE [default: 0].
    max_connections: usize = 0, "TETHER_MAX_CONNECTIONS";
    /// With --processes: ms a process waits for a sibling to hand over a session a resume asks for (each way); past it the login gets a fresh session [default: 2000].
    handoff_timeout_ms: u32 = 2_000, "TETHER_HANDOFF_TIMEOUT_MS";
    /// retry_after_ms told to connections refused as busy [default: 5000].
    busy_retry_after_ms: u32 = 5_000, "TETHER_BUSY_RETRY_AFTER_MS";
    /// Most connections awaiting login at once (accepted, no session bound yet); past it a new connection gets ERROR SERVER_BUSY; 0: a quarter of max_connections [default: 0].
    max_prelogin_connections: usize = 0, "TETHER_MAX_PRELOGIN_CONNECTIONS";
    /// Most connections awaiting login at once from one source address (IPv4 address, or IPv6 /64); past it a new one gets ERROR SERVER_BUSY; 0: no limit [default: 128].
    max_prelogin_per_ip: u32 = DEFAULT_MAX_PRELOGIN_PER_IP, "TETHER_MAX_PRELOGIN_PER_IP";
    /// Largest frame accepted before login (the LOGIN with its body), so the most a connection awaiting login makes the gateway buffer; a larger length gets ERROR FRAME_TOO_LARGE [default: 8192].
    max_prelogin_bytes: u32 = DEFAULT_MAX_PRELOGIN_BYTES, "TETHER_MAX_PRELOGIN_BYTES";
    /// Bytes read from one connection in one turn of its worker's loop; the rest waits for the next turn, after the other connections have had theirs [default: 262144].
    read_budget_bytes: usize = DEFAULT_READ_BUDGET_BYTES, "TETHER_READ_BUDGET_BYTES";
    /// Logins one device (user and device id) may make per second on average, resumes included; past it LOGIN_RESULT RATE_LIMITED; 0: no limit [default: 1].
    login_rate_per_device: u32 = 1, "TETHER_LOGIN_RATE_PER_DEVICE";
    /// Logins one device may make in a burst above its rate [default: 10].
    login_burst_per_device: u32 = 10, "TETHER_LOGIN_BURST_PER_DEVICE";
    /// Logins one user may make per second on average, over all devices; past it LOGIN_RESULT RATE_LIMITED; 0: no limit [default: 10].
    login_rate_per_user: u32 = 10, "TETHER_LOGIN_RATE_PER_USER";
    /// Logins one user may make in a burst above its rate [default: 50].
    login_burst_per_user: u32 = 50, "TETHER_LOGIN_BURST_PER_USER";
    /// Listen backlog [default: 65535].
    backlog: i32 = 65_535, "TETHER_BACKLOG";
    /// TCP keepalive idle seconds, a backstop under heartbeats; 0 disables [default: 300].
    tcp_keepalive_secs: u32 = 300, "TETHER_TCP_KEEPALIVE_SECS";
    /// TCP_USER_TIMEOUT in ms: unacknowledged sent data for this long drops the connection; 0 disables [default: 60000].
    tcp_user_timeout_ms: u32 = 60_000, "TETHER_TCP_USER_TIMEOUT_MS";
    /// Longest pause of accepting after EMFILE/ENFILE/ENOBUFS (doubles from 10 ms) [default: 1000].
    accept_backoff_max_ms: u32 = 1_000, "TETHER_ACCEPT_BACKOFF_MAX_MS";
    /// HMAC-SHA256 secret of the default token authenticator, at least 32 bytes.
    auth_secret: String = String::new(), "TETHER_AUTH_SECRET";
    /// Accept any token (user and device as the LOGIN claims). For development only; logs a warning [default: false].
    dev_auth: bool = false, "TETHER_DEV_AUTH" [num_args = 0..=1, default_missing_value = "true"];
    /// Seconds a client has to send LOGIN [default: 10].
    login_timeout_secs: u32 = crate::conn::DEFAULT_LOGIN_TIMEOUT_SECS, "TETHER_LOGIN_TIMEOUT_SECS";
    /// Heartbeat interval told to mobile, desktop and IoT clients, ms [default: 30000].
    heartbeat_mobile_ms: u32 = 30_000, "TETHER_HEARTBEAT_MOBILE_MS";
    /// Heartbeat interval told to web clients, ms [default: 15000].
    heartbeat_web_ms: u32 = 15_000, "TETHER_HEARTBEAT_WEB_MS";
    /// Silent intervals before a connection is closed [default: 3].
    heartbeat_misses: u32 = crate::conn::DEFAULT_HEARTBEAT_MISSES, "TETHER_HEARTBEAT_MISSES";
    /// Seconds a session outlives its connection, waiting for a resume [default: 120].
    resume_grace_secs: u32 = 120, "TETHER_RESUME_GRACE_SECS";
    /// Unacked downlinks kept per session [default: 1024].
    max_unacked_frames: usize = crate::session::downlink::DEFAULT_MAX_UNACKED_FRAMES, "TETHER_MAX_UNACKED_FRAMES";
    /// Body bytes of unacked downlinks kept per session [default: 262144].
    max_unacked_bytes: usize = crate::session::downlink::DEFAULT_MAX_UNACKED_BYTES, "TETHER_MAX_UNACKED_BYTES";
    /// Bytes queued for a connection's socket before it is closed as a slow consumer; keep it above max_unacked_bytes, which a resume replay may write at once [default: 1048576].
    max_outbound_bytes: usize = 1024 * 1024, "TETHER_MAX_OUTBOUND_BYTES";
    /// Seconds a session's unacked buffer may stay full with no ack before a push that does not fit closes the connection as a slow consumer (a push to a full buffer is refused to the pusher, retriable, either way) [default: 30].
    slow_consumer_secs: u32 = crate::session::core::DEFAULT_SLOW_CONSUMER_SECS, "TETHER_SLOW_CONSUMER_SECS";
    /// Transient (seq 0) downlinks queued per connection between two writes; past it they are refused [default: 64].
    max_transient: usize = crate::session::core::DEFAULT_MAX_TRANSIENT, "TETHER_MAX_TRANSIENT";
    /// Rooms one session may be in; a ROOM_JOIN past it gets ROOM_FORBIDDEN before the upstream sees it [default: 256].
    max_rooms_per_session: usize = crate::session::core::DEFAULT_MAX_ROOMS, "TETHER_MAX_ROOMS_PER_SESSION";
    /// Recent uplink ids remembered per session for dedup; also the most uplinks a session may have with the upstream at once; 1 to 65536 [default: 128].
    dedup_window: usize = crate::session::dedup::DEFAULT_DEDUP_WINDOW, "TETHER_DEDUP_WINDOW";
    /// Which earlier sessions a login replaces [default: per-device].
    multi_device: MultiDevice = MultiDevice::PerDevice, "TETHER_MULTI_DEVICE";
    /// Most sessions per user; a login past it ends the oldest (KICK SESSION_LIMIT) [default: 16].
    max_sessions_per_user: usize = 16, "TETHER_MAX_SESSIONS_PER_USER";
    /// Largest frame `length` accepted [default: 65536].
    max_frame_len: u32 = tether_codec::DEFAULT_MAX_FRAME_LEN, "TETHER_MAX_FRAME_LEN";
    /// Largest protobuf header [default: 4096].
    max_header_len: u16 = tether_codec::DEFAULT_MAX_HEADER_LEN, "TETHER_MAX_HEADER_LEN";
    /// Largest inflated gzip body [default: 1048576].
    max_decompressed_len: usize = tether_codec::DEFAULT_MAX_DECOMPRESSED_LEN, "TETHER_MAX_DECOMPRESSED_LEN";
    /// Largest inflated/compressed ratio [default: 100].
    max_expansion_ratio: u32 = tether_codec::DEFAULT_MAX_EXPANSION_RATIO, "TETHER_MAX_EXPANSION_RATIO";
    /// Most frames in one BATCH [default: 1024].
    max_batch_frames: u32 = tether_codec::DEFAULT_MAX_BATCH_FRAMES, "TETHER_MAX_BATCH_FRAMES";
    /// Smallest pushed body that is gzip-compressed for clients that accept it [default: 512].
    compress_threshold: usize = tether_codec::DEFAULT_COMPRESS_THRESHOLD, "TETHER_COMPRESS_THRESHOLD";
    /// gzip level [default: 4].
    compress_level: u32 = tether_codec::DEFAULT_COMPRESS_LEVEL, "TETHER_COMPRESS_LEVEL";
    /// A resume replay of at least this many frames travels as BATCH frames (gzip clients) [default: 16].
    replay_batch_min: usize = 16, "TETHER_REPLAY_BATCH_MIN";
    /// Drain: GOAWAYs are spread over this many ms [default: 10000].
    drain_window_ms: u32 = 10_000, "TETHER_DRAIN_WINDOW_MS";
    /// Drain: reconnect_delay_ms hint; each client gets this plus a random share of it [default: 5000].
    drain_reconnect_delay_ms: u32 = 5_000, "TETHER_DRAIN_RECONNECT_DELAY_MS";
    /// Drain: ms after the window before remaining connections are closed and the process exits [default: 5000].
    drain_linger_ms: u32 = 5_000, "TETHER_DRAIN_LINGER_MS";
    /// An UPLINK or room request the upstream has not answered in this many ms gets UPSTREAM_TIMEOUT [default: 10000].
    upstream_timeout_ms: u32 = 10_000, "TETHER_UPSTREAM_TIMEOUT_MS";
    /// UPLINKs (and ROOM_JOIN/ROOM_LEAVE) a session may send per second on average; past it they are answered RATE_LIMITED; the bucket carries over to a new login of the same device; 0: no limit [default: 50].
    uplink_rate: u32 = 50, "TETHER_UPLINK_RATE";
    /// UPLINKs a session may send in a burst above the rate; at most 1000000 [default: 100].
    uplink_burst: u32 = 100, "TETHER_UPLINK_BURST";
    /// Embedded upstream: messages kept per offline user, or waiting for one live session's acks [default: 1000].
    offline_max_messages: usize = 1_000, "TETHER_OFFLINE_MAX_MESSAGES";
    /// Embedded upstream: body bytes kept per offline user, or waiting for one live session's acks [default: 1048576].
    offline_max_user_bytes: usize = 1 << 20, "TETHER_OFFLINE_MAX_USER_BYTES";
    /// Embedded upstream: body bytes kept in all offline queues and backlogs together [default: 268435456].
    offline_max_total_bytes: usize = 256 << 20, "TETHER_OFFLINE_MAX_TOTAL_BYTES";
    /// Embedded upstream: most users with an offline queue [default: 100000].
    offline_max_users: usize = 100_000, "TETHER_OFFLINE_MAX_USERS";
    /// Embedded upstream: seconds an offline message is kept [default: 259200 = 72 h].
    offline_max_age_secs: u64 = 72 * 3600, "TETHER_OFFLINE_MAX_AGE_SECS";
    /// Embedded upstream: most members of a room [default: 100000].
    room_max_members: usize = 100_000, "TETHER_ROOM_MAX_MEMBERS";
    /// Embedded upstream: devices whose accepted uplink ids it remembers (the most recent dedup_window ids of each), so that a resend after the session ended (kicked, expired) is not delivered twice; past it the device longest idle is forgotten; 0: none kept [default: 100000].
    accepted_max_devices: usize = 100_000, "TETHER_ACCEPTED_MAX_DEVICES";
    /// One-second slots of each worker's timing wheel [default: 512].
    timer_wheel_slots: usize = crate::timer::DEFAULT_WHEEL_SLOTS, "TETHER_TIMER_WHEEL_SLOTS";
}

/// Default of `max_prelogin_per_ip`.
pub const DEFAULT_MAX_PRELOGIN_PER_IP: u32 = 128;
/// Default of `max_prelogin_bytes`: a LOGIN is a token of a few hundred bytes.
pub const DEFAULT_MAX_PRELOGIN_BYTES: u32 = 8 * 1024;
/// Smallest `max_prelogin_bytes` accepted.
pub const MIN_PRELOGIN_BYTES: u32 = 1024;
/// Default of `read_budget_bytes`: four reads of the worker's buffer.
pub const DEFAULT_READ_BUDGET_BYTES: usize = 4 * crate::worker::READ_CHUNK;

/// Largest burst a token bucket takes (`uplink_burst`, the login bursts).
pub const MAX_BURST: u32 = 1_000_000;

/// Descriptors kept back from `max_connections` when it is derived from the process's limit:
/// listeners, epoll and eventfd per worker, the admin server's connections, log files.
pub const FD_RESERVE: usize = 256;

/// The connection limit to run with: `max_connections`, or when it is 0 the descriptor limit
/// less [`FD_RESERVE`] (at least 1). A limit set above the descriptors the process may open
/// is kept, with a warning: past them accepts fail with EMFILE (and back off) rather than
/// answer SERVER_BUSY.
pub fn effective_max_connections(configured: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        usize::MAX
    };
    let fit = fds.saturating_sub(FD_RESERVE).max(1);
    match configured {
        0 => fit,
        n if n > fit => {
            tracing::warn!(
                max_connections = n,
                descriptors = fds,
                "max_connections is above the descriptor limit less {FD_RESERVE} ({fit}): \
                 a flood will meet EMFILE before SERVER_BUSY"
            );
            n
        }
        n => n,
    }
}

/// Most gateway processes one supervisor starts (`processes`).
pub const MAX_PROCESSES: usize = 1024;

/// Shortest `auth_secret` accepted, bytes: an HMAC-SHA256 key shorter than this is open to
/// guessing.
pub const MIN_AUTH_SECRET_LEN: usize = 32;

/// `host:port` (also `[v6]:port`) → (`host`, port).
pub fn split_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

impl Config {
    /// Reads a TOML file (keys as the settings above, snake_case).
    pub fn from_toml_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_len: self.max_frame_len,
            max_header_len: self.max_header_len,
            max_decompressed_len: self.max_decompressed_len,
            max_expansion_ratio: self.max_expansion_ratio,
            max_batch_frames: self.max_batch_frames,
        }
    }

    pub fn conn(&self) -> ConnConfig {
        ConnConfig {
            login_timeout_secs: self.login_timeout_secs,
            heartbeat_misses: self.heartbeat_misses,
        }
    }

    pub fn downlink_limits(&self) -> DownlinkLimits {
        DownlinkLimits {
            max_frames: self.max_unacked_frames,
            max_bytes: self.max_unacked_bytes,
        }
    }

    /// The codec's limits for frames that arrive before login: no frame past
    /// `max_prelogin_bytes`, no body inflated past it either.
    pub fn prelogin_limits(&self) -> Limits {
        let full = self.limits();
        let cap = self.max_prelogin_bytes.min(full.max_frame_len);
        Limits {
            max_frame_len: cap,
            max_decompressed_len: full.max_decompressed_len.min(cap as usize),
            ..full
        }
    }

    pub fn session_limits(&self) -> crate::session::core::SessionLimits {
        crate::session::core::SessionLimits {
            downlink: self.downlink_limits(),
            max_body: crate::session::core::SessionLimits::max_body_for(&self.limits()),
            dedup_window: self.dedup_window,
            uplink_rate: self.uplink_rate,
            uplink_burst: self.uplink_burst,
            max_transient: self.max_transient,
            max_rooms: self.max_rooms_per_session,
            slow_consumer_secs: self.slow_consumer_secs,
        }
    }

    pub fn compress(&self) -> tether_codec::CompressOptions {
        tether_codec::CompressOptions {
            threshold: self.compress_threshold,
            level: self.compress_level,
        }
    }

    /// Checks what a bad value would only reveal later.
    pub fn validate(&self) -> Result<(), String> {
        let given = |v: &Vec<String>| v.iter().any(|a| !a.is_empty());
        if !given(&self.listen) && !given(&self.tls_listen) {
            return Err("no listen address (--listen or --tls-listen)".into());
        }
        if given(&self.tls_listen) && (self.tls_cert.is_empty() || self.tls_key.is_empty()) {
            return Err("--tls-listen needs --tls-cert and --tls-key".into());
        }
        if self.auth_secret.is_empty() && !self.dev_auth {
            return Err(
                "no --auth-secret: set one, or --dev-auth to accept any token (development only)"
                    .into(),
            );
        }
        // Deadlines must fall inside one lap of the timing wheel (a connection keeps one
        // entry, and an entry seen before its deadline is taken as stale).
        let longest = [
            self.login_timeout_secs,
            self.tls_handshake_timeout_secs,
            self.heartbeat_mobile_ms
                .max(self.heartbeat_web_ms)
                .div_ceil(1000)
                .saturating_mul(self.heartbeat_misses),
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as usize;
        if self.timer_wheel_slots <= longest {
            return Err(format!(
                "timer_wheel_slots ({}) must exceed the longest deadline in seconds ({longest})",
                self.timer_wheel_slots
            ));
        }
        if self.max_frame_len > tether_codec::ABSOLUTE_MAX_FRAME_LEN {
            return Err(format!(
                "max_frame_len over the hard ceiling {}",
                tether_codec::ABSOLUTE_MAX_FRAME_LEN
            ));
        }
        if !(1..=crate::session::dedup::MAX_DEDUP_WINDOW).contains(&self.dedup_window) {
            // 0 would remember nothing, and so bound nothing: uplinks in flight per session
            // would be limited by the rate bucket alone.
            return Err(format!(
                "dedup_window must be 1 to {} (it also bounds a session's uplinks in flight)",
                crate::session::dedup::MAX_DEDUP_WINDOW
            ));
        }
        if self.max_unacked_frames == 0 || self.max_unacked_bytes == 0 {
            return Err("max_unacked_frames and max_unacked_bytes must be positive".into());
        }
        let bursts = [
            ("uplink_burst", self.uplink_burst),
            ("login_burst_per_device", self.login_burst_per_device),
            ("login_burst_per_user", self.login_burst_per_user),
        ];
        if let Some((name, _)) = bursts.iter().find(|(_, b)| *b > MAX_BURST) {
            // A bucket counts thousandths of a token in 32 bits.
            return Err(format!("{name} must be at most {MAX_BURST}"));
        }
        if !(1..=MAX_PROCESSES).contains(&self.processes) {
            return Err(format!("processes must be 1 to {MAX_PROCESSES}"));
        }
        if self.processes > 1 {
            // Port 0 would give every process a port of its own: nothing shared.
            let fixed = |a: &String| a.is_empty() || split_port(a).is_some_and(|(_, p)| p != 0);
            if let Some(a) = self
                .listen
                .iter()
                .chain(&self.tls_listen)
                .find(|a| !fixed(a))
            {
                return Err(format!(
                    "--processes {}: listen address {a} needs a fixed port for the processes to share",
                    self.processes
                ));
            }
        }
        if self.max_prelogin_bytes < MIN_PRELOGIN_BYTES {
            return Err(format!(
                "max_prelogin_bytes must be at least {MIN_PRELOGIN_BYTES}"
            ));
        }
        if self.read_budget_bytes == 0 {
            return Err("read_budget_bytes must be positive".into());
        }
        if self.heartbeat_misses == 0 || self.heartbeat_mobile_ms == 0 || self.heartbeat_web_ms == 0
        {
            return Err("heartbeat intervals and misses must be positive".into());
        }
        // Secrets and the admin port (gateway/ADMIN.md).
        if !self.auth_secret.is_empty() && self.auth_secret.len() < MIN_AUTH_SECRET_LEN {
            return Err(format!(
                "auth_secret is {} bytes; it must be at least {MIN_AUTH_SECRET_LEN} \
                 (e.g. `head -c 32 /dev/urandom | base64`)",
                self.auth_secret.len()
            ));
        }
        crate::admin::validate(self)?;
        Ok(())
    }
}
