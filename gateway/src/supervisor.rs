//! `--processes N`: one process starts N gateway processes of the same executable, which
//! share the listen ports through SO_REUSEPORT (the kernel spreads new connections over all
//! their listeners), so that one machine holds more connections than one process's file
//! limit. A session lives in the process its connection landed in, until a resume lands on
//! another, which claims it; each process has its own admin port.
//!
//! A child is told what it is by the environment ([`INDEX_ENV`], [`COUNT_ENV`]), not by
//! flags: it parses the same flags, environment and file as its supervisor, then
//! [`child_config`] makes its own share of them, whatever `processes` says. So a child never
//! supervises.
//!
//! The supervisor forwards the first SIGTERM/SIGINT to every child as SIGTERM (they drain)
//! and a second one as SIGKILL; it exits 0 when every child exited 0. A child that exits
//! outside a shutdown is restarted after a backoff (1 s, doubling up to 30 s, back to 1 s
//! once a child has lived 60 s); its sessions are lost. A session moves between the
//! children when its client resumes on another one ([`crate::handoff`], through Unix sockets
//! in a directory the supervisor makes, mode 0700, and removes at exit). On Linux a child
//! gets SIGTERM (a drain) if its supervisor dies.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::config::{split_port, Config};

/// Set by the supervisor in each child's environment: the child's index, from 0.
pub const INDEX_ENV: &str = "TETHER_PROCESS_INDEX";
/// Set by the supervisor in each child's environment: how many processes it runs.
pub const COUNT_ENV: &str = "TETHER_PROCESS_COUNT";

/// Restart delays of a child that exited outside a shutdown.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A child that lived this long is restarted after [`BACKOFF_MIN`] again.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// The gateway's exit code when it cannot start (bad configuration, a port taken).
const EXIT_CANNOT_START: i32 = 2;

/// This process's place among a supervisor's children, `(index, count)`, from
/// [`INDEX_ENV`] and [`COUNT_ENV`]; `None` when it was not started by a supervisor.
pub fn child_role() -> Result<Option<(usize, usize)>, String> {
    let Some(index) = std::env::var_os(INDEX_ENV) else {
        return Ok(None);
    };
    let parse = |name: &str, v: Option<OsString>| -> Result<usize, String> {
        v.as_ref()
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name}: expected a number, set by the supervisor"))
    };
    let index = parse(INDEX_ENV, Some(index))?;
    let count = parse(COUNT_ENV, std::env::var_os(COUNT_ENV))?;
    if index >= count {
        return Err(format!(
            "{INDEX_ENV} ({index}) must be below {COUNT_ENV} ({count})"
        ));
    }
    Ok(Some((index, count)))
}

/// The configuration of child `index` of `count`: `processes = 1`, server_id
/// `<server_id>-<index>`, the admin port + `index` (0 stays 0, empty stays empty), and
/// max_connections / `count` rounded up.
pub fn child_config(config: &Config, index: usize, count: usize) -> Result<Config, String> {
    let mut c = config.clone();
    c.processes = 1;
    c.server_id = format!("{}-{index}", config.server_id);
    c.max_connections = config.max_connections.div_ceil(count.max(1));
    if !config.admin_listen.is_empty() {
        let (host, port) = split_port(&config.admin_listen)
            .ok_or_else(|| format!("admin_listen {}: expected host:port", config.admin_listen))?;
        if port != 0 {
            let port = u16::try_from(usize::from(port) + index).map_err(|_| {
                format!(
                    "admin_listen {}: port + {index} (process {index}) is past 65535",
                    config.admin_listen
                )
            })?;
            c.admin_listen = format!("{host}:{port}");
        }
    }
    Ok(c)
}

/// One child and its restart state.
struct Slot {
    child: Option<Child>,
    started: Instant,
    /// The delay before the next restart.
    backoff: Duration,
    restart_at: Option<Instant>,
    /// Has been restarted (an exit code 2 of a first start stops everything).
    restarted: bool,
}

fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; the pid is our own unreaped child, so it cannot
    // name another process.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn spawn(exe: &Path, args: &[OsString], index: usize, count: usize) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(INDEX_ENV, index.to_string())
        .env(COUNT_ENV, count.to_string())
        .env(crate::handoff::DIR_ENV, handoff_dir())
        // Not used by a child (its role wins over every `processes`), but keeps what it
        // inherits consistent.
        .env("TETHER_PROCESSES", "1")
        .stdin(Stdio::null());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid) and no allocation between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A supervisor that dies (even by SIGKILL) drains its children.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The supervisor died before the prctl: nobody would stop this child.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
}

/// Runs `config.processes` gateway processes until a signal stops them all; the exit code
/// of the whole. `config` is the supervisor's own (validated here).
pub fn run(config: &Config) -> ExitCode {
    let count = config.processes;
    let children = match config.validate().and_then(|()| {
        (0..count)
            .map(|i| child_config(config, i, count))
            .collect::<Result<Vec<Config>, String>>()
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tether-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tether-gateway: own executable: {e}");
            return ExitCode::from(2);
        }
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether-gateway: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // The children's handoff sockets: a directory only this user may enter.
    let dir = handoff_dir();
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir)
    } {
        eprintln!("tether-gateway: handoff directory {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    let code = rt.block_on(supervise(&exe, &args, &children));
    let _ = std::fs::remove_dir_all(&dir);
    code
}

/// Where this supervisor's children put their handoff sockets.
fn handoff_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tether-handoff-{}", std::process::id()))
}

async fn supervise(exe: &Path, args: &[OsString], children: &[Config]) -> ExitCode {
    use tokio::signal::unix::{signal as hook, SignalKind};
    let count = children.len();
    // Hooked before any child exists, so that no signal finds the default action.
    let (Ok(mut term), Ok(mut int), Ok(mut chld)) = (
        hook(SignalKind::terminate()),
        hook(SignalKind::interrupt()),
        hook(SignalKind::child()),
    ) else {
        eprintln!("tether-gateway: cannot install signal handlers");
        return ExitCode::from(2);
    };
    let mut slots: Vec<Slot> = Vec::with_capacity(count);
    for (i, c) in children.iter().enumerate() {
        match spawn(exe, args, i, count) {
            Ok(child) => {
                tracing::info!(
                    process = i,
                    pid = child.id(),
                    server_id = %c.server_id,
                    admin = %c.admin_listen,
                    max_connections = c.max_connections,
                    "started gateway process"
                );
                slots.push(Slot {
                    child: Some(child),
                    started: Instant::now(),
                    backoff: BACKOFF_MIN,
                    restart_at: None,
                    restarted: false,
                });
            }
            Err(e) => {
                tracing::error!(process = i, "cannot start gateway process: {e}");
                for s in &mut slots {
                    if let Some(c) = &mut s.child {
                        signal(c, libc::SIGTERM);
                        let _ = c.wait();
                    }
                }
                return ExitCode::from(2);
            }
        }
    }
    tracing::info!(processes = count, pid = std::process::id(), "supervising");
    // Set by the first signal (or a child that cannot start); no restarts after it.
    let mut stopping = false;
    let mut killed = false;
    let mut code = ExitCode::SUCCESS;
    loop {
        let now = Instant::now();
        let wake = slots
            .iter()
            .filter_map(|s| s.restart_at)
            .min()
            .map_or(BACKOFF_MIN, |t| t.saturating_duration_since(now))
            .min(BACKOFF_MIN);
        let sig = tokio::select! {
            _ = term.recv() => Some("SIGTERM"),
            _ = int.recv() => Some("SIGINT"),
            _ = chld.recv() => None,
            _ = tokio::time::sleep(wake) => None,
        };
        if let Some(sig) = sig {
            if !stopping {
                tracing::info!("{sig}: draining every gateway process (again to kill them)");
                stopping = true;
                for s in &mut slots {
                    s.restart_at = None;
                    if let Some(c) = &s.child {
                        signal(c, libc::SIGTERM);
                    }
                }
            } else if !killed {
                tracing::warn!("{sig} again: killing every gateway process");
                killed = true;
                code = ExitCode::FAILURE;
                for s in &slots {
                    if let Some(c) = &s.child {
                        signal(c, libc::SIGKILL);
                    }
                }
            }
        }
        // Reap whatever exited (SIGCHLDs may merge: look at every child).
        let mut fatal = false;
        for (i, s) in slots.iter_mut().enumerate() {
            let Some(c) = &mut s.child else { continue };
            let status: ExitStatus = match c.try_wait() {
                Ok(Some(status)) => status,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(process = i, pid = c.id(), "cannot wait for it: {e}");
                    continue;
                }
            };
            let pid = c.id();
            s.child = None;
            if stopping {
                if status.success() {
                    tracing::info!(process = i, pid, "gateway process exited");
                } else {
                    tracing::warn!(process = i, pid, %status, "gateway process exited");
                    code = ExitCode::FAILURE;
                }
                continue;
            }
            let lived = s.started.elapsed();
            if !s.restarted && status.code() == Some(EXIT_CANNOT_START) {
                tracing::error!(
                    process = i,
                    pid,
                    %status,
                    "gateway process could not start; stopping every process"
                );
                fatal = true;
                continue;
            }
            if lived >= BACKOFF_RESET {
                s.backoff = BACKOFF_MIN;
            }
            if status.success() {
                // Drained through its own admin port, most likely.
                tracing::warn!(
                    process = i,
                    pid,
                    %status,
                    lived_secs = lived.as_secs(),
                    restart_in_secs = s.backoff.as_secs(),
                    "gateway process exited; restarting it"
                );
            } else {
                tracing::error!(
                    process = i,
                    pid,
                    %status,
                    lived_secs = lived.as_secs(),
                    restart_in_secs = s.backoff.as_secs(),
                    "gateway process died; its sessions are lost (their clients will start \
                     fresh sessions); restarting it"
                );
            }
            s.restart_at = Some(Instant::now() + s.backoff);
            s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
        }
        if fatal {
            stopping = true;
            code = ExitCode::from(2);
            for s in &mut slots {
                s.restart_at = None;
                if let Some(c) = &s.child {
                    signal(c, libc::SIGTERM);
                }
            }
        }
        if stopping {
            if slots.iter().all(|s| s.child.is_none()) {
                tracing::info!("every gateway process exited; bye");
                return code;
            }
            continue;
        }
        let now = Instant::now();
        for (i, s) in slots.iter_mut().enumerate() {
            if s.restart_at.is_none_or(|t| t > now) {
                continue;
            }
            s.restart_at = None;
            s.restarted = true;
            match spawn(exe, args, i, count) {
                Ok(child) => {
                    tracing::info!(process = i, pid = child.id(), "restarted gateway process");
                    s.child = Some(child);
                    s.started = now;
                }
                Err(e) => {
                    tracing::error!(
                        process = i,
                        retry_in_secs = s.backoff.as_secs(),
                        "cannot restart gateway process: {e}"
                    );
                    s.restart_at = Some(now + s.backoff);
                    s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_child_gets_its_share() {
        let base = Config {
            server_id: "gw".into(),
            admin_listen: "127.0.0.1:14080".into(),
            max_connections: 100_001,
            processes: 4,
            ..Config::default()
        };
        let c: Vec<Config> = (0..4).map(|i| child_config(&base, i, 4).unwrap()).collect();
        let ids: Vec<&str> = c.iter().map(|c| c.server_id.as_str()).collect();
        assert_eq!(ids, ["gw-0", "gw-1", "gw-2", "gw-3"]);
        let admins: Vec<&str> = c.iter().map(|c| c.admin_listen.as_str()).collect();
        assert_eq!(
            admins,
            [
                "127.0.0.1:14080",
                "127.0.0.1:14081",
                "127.0.0.1:14082",
                "127.0.0.1:14083"
            ]
        );
        assert!(c.iter().all(|c| c.max_connections == 25_001));
        assert!(c.iter().all(|c| c.processes == 1));
        // What is not per process is unchanged.
        assert!(c.iter().all(|c| c.listen == base.listen));
    }

    #[test]
    fn admin_port_edge_cases() {
        let with = |admin: &str| Config {
            admin_listen: admin.into(),
            ..Config::default()
        };
        assert_eq!(child_config(&with(""), 3, 4).unwrap().admin_listen, "");
        assert_eq!(
            child_config(&with("0.0.0.0:0"), 3, 4).unwrap().admin_listen,
            "0.0.0.0:0"
        );
        assert_eq!(
            child_config(&with("[::1]:9000"), 2, 4)
                .unwrap()
                .admin_listen,
            "[::1]:9002"
        );
        assert_eq!(
            child_config(&with("localhost:9000"), 1, 4)
                .unwrap()
                .admin_listen,
            "localhost:9001"
        );
        assert!(child_config(&with("127.0.0.1:65535"), 1, 2).is_err());
        assert!(child_config(&with("nonsense"), 1, 2).is_err());
    }

    #[test]
    fn processes_are_validated() {
        let with = |processes: usize, listen: &str| Config {
            processes,
            listen: vec![listen.into()],
            dev_auth: true,
            ..Config::default()
        };
        assert!(with(1, "127.0.0.1:0").validate().is_ok());
        assert!(with(2, "127.0.0.1:14000").validate().is_ok());
        assert!(with(1024, "127.0.0.1:14000").validate().is_ok());
        assert!(with(0, "127.0.0.1:14000").validate().is_err());
        assert!(with(1025, "127.0.0.1:14000").validate().is_err());
        // Port 0 would give each process a port of its own.
        assert!(with(2, "127.0.0.1:0").validate().is_err());
    }

    /// Limits whose zero (or whose largest values) would bound nothing, or overflow.
    #[test]
    fn session_limits_that_bound_nothing_are_refused() {
        let ok = || Config {
            listen: vec!["127.0.0.1:0".into()],
            dev_auth: true,
            ..Config::default()
        };
        assert!(ok().validate().is_ok());
        let refused = [
            Config {
                dedup_window: 0,
                ..ok()
            },
            Config {
                max_unacked_frames: 0,
                ..ok()
            },
            Config {
                max_unacked_bytes: 0,
                ..ok()
            },
            Config {
                uplink_burst: crate::config::MAX_BURST + 1,
                ..ok()
            },
            Config {
                login_burst_per_device: u32::MAX,
                ..ok()
            },
            Config {
                login_burst_per_user: u32::MAX,
                ..ok()
            },
        ];
        for c in refused {
            assert!(c.validate().is_err(), "{c:?}");
        }
        let edge = Config {
            uplink_burst: crate::config::MAX_BURST,
            dedup_window: 1,
            ..ok()
        };
        assert!(edge.validate().is_ok());
    }
}
