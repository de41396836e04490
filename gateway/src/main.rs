//! `tether-gateway`: runs a gateway until SIGTERM or SIGINT, then drains it; with
//! `--processes N`, supervises N gateway processes instead (`supervisor`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use tether_gateway::config::{Config, Overrides};
use tether_gateway::{supervisor, Gateway, Options};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Each worker's housekeeping: mimalloc gives this thread's freed pages back to the system
/// now (after their purge delay), not at the thread's next allocations (W1: ~10 B less per
/// idle connection right after a login burst; BENCHMARKS.md, issue 10, session 6).
fn return_freed_memory() {
    // SAFETY: mi_collect only walks the calling thread's own heap; it has no preconditions.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// The Tether IM gateway. Settings come from the TOML file, then `TETHER_*` environment
/// variables, then flags (each overriding the one before).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, short, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    overrides: Overrides,
}

/// Log timestamps followed by the process index, in a supervisor's child.
struct ChildTimer(usize);

impl tracing_subscriber::fmt::time::FormatTime for ChildTimer {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        tracing_subscriber::fmt::time::SystemTime.format_time(w)?;
        write!(w, " process={}", self.0)
    }
}

/// What `--print-config` shows instead of a secret that is set, and of one that is not.
const REDACTED: &str = "<redacted>";
const UNSET: &str = "<unset>";

/// `config` with its secrets replaced by [`REDACTED`] or [`UNSET`], for printing.
fn redacted(config: &Config) -> Config {
    let hide = |s: &str| if s.is_empty() { UNSET } else { REDACTED }.to_string();
    Config {
        auth_secret: hide(&config.auth_secret),
        ..config.clone()
    }
}

fn main() -> std::process::ExitCode {
    // Set by a supervisor: this process is its child `index` of `count`.
    let role = supervisor::child_role();
    let logs = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    match role {
        Ok(Some((index, _))) => logs.with_timer(ChildTimer(index)).init(),
        _ => logs.init(),
    }
    let role = match role {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(p) => match Config::from_toml_file(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tether-gateway: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    config.apply(cli.overrides);
    if let Some((index, count)) = role {
        // A child's share of the settings, whatever `processes` says: a child never
        // supervises.
        config = match supervisor::child_config(&config, index, count) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tether-gateway: {e}");
                return std::process::ExitCode::from(2);
            }
        };
        tracing::info!(
            process = index,
            of = count,
            server_id = %config.server_id,
            "gateway process of a supervisor"
        );
    }
    if cli.print_config {
        println!("{:#?}", redacted(&config));
        // The admin token is no setting (it is never a flag); say whether there is one.
        let token = match tether_gateway::admin::load_token(&config) {
            Ok(Some(_)) => REDACTED.to_string(),
            Ok(None) => UNSET.to_string(),
            Err(e) => format!("<error: {e}>"),
        };
        println!("admin token: {token}");
        return std::process::ExitCode::SUCCESS;
    }
    if config.processes > 1 {
        return supervisor::run(&config);
    }
    // Signals are hooked before anything listens, so that a SIGTERM can never find the
    // default action (exit without a drain) in place.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a signal runtime");
    let signals = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    });
    let (Ok(mut term), Ok(mut int)) = signals else {
        eprintln!("tether-gateway: cannot install signal handlers");
        return std::process::ExitCode::from(2);
    };
    // A supervisor's children hand sessions to each other on resume.
    let siblings = role.and_then(|(index, count)| {
        let dir = std::env::var_os(tether_gateway::handoff::DIR_ENV)?;
        Some(tether_gateway::handoff::Siblings {
            index,
            count,
            dir: dir.into(),
        })
    });
    let options = Options {
        siblings,
        housekeeping: Some(return_freed_memory),
        ..Options::default()
    };
    let gateway = match Gateway::start(config, options) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tether-gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let node = gateway.node().clone();
    // The first SIGTERM/SIGINT drains; a second one exits at once. In a supervisor's child,
    // a second one within a second of the first is the same signal twice (a terminal's
    // Ctrl-C or systemd reach the children too, and the supervisor forwards its own).
    std::thread::spawn(move || {
        rt.block_on(async move {
            let mut draining: Option<Instant> = None;
            loop {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                match draining {
                    None => {
                        tracing::info!("signal: draining (again to exit now)");
                        draining = Some(Instant::now());
                        node.drain();
                    }
                    Some(t) if role.is_some() && t.elapsed() < Duration::from_secs(1) => {}
                    Some(_) => std::process::exit(1),
                }
            }
        })
    });
    gateway.wait();
    tracing::info!("drained; bye");
    std::process::ExitCode::SUCCESS
}
