//! `tether-gateway`: runs a gateway until SIGTERM or SIGINT, then drains it.

use std::path::PathBuf;

use clap::Parser;
use tether_gateway::config::{Config, Overrides};
use tether_gateway::{Gateway, Options};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
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
    if cli.print_config {
        println!("{config:#?}");
        return std::process::ExitCode::SUCCESS;
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
    let gateway = match Gateway::start(config, Options::default()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tether-gateway: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let node = gateway.node().clone();
    // The first SIGTERM/SIGINT drains; a second one exits at once.
    std::thread::spawn(move || {
        rt.block_on(async move {
            for n in 0.. {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                if n == 0 {
                    tracing::info!("signal: draining (again to exit now)");
                    node.drain();
                } else {
                    std::process::exit(1);
                }
            }
        })
    });
    gateway.wait();
    tracing::info!("drained; bye");
    std::process::ExitCode::SUCCESS
}
