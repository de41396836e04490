//! The admin port as an operator meets it (gateway/ADMIN.md), and the secrets
//! `--print-config` must not show.

mod common;

use std::process::Command;

use common::*;
use tether_gateway::config::Config;
use tether_gateway::{Gateway, Options};

fn start_err(f: impl FnOnce(&mut Config)) -> String {
    let mut c = config();
    f(&mut c);
    Gateway::start(c, Options::default())
        .expect_err("the gateway must refuse to start")
        .to_string()
}

#[test]
fn a_short_auth_secret_is_refused() {
    let e = start_err(|c| c.auth_secret = "x".into());
    assert!(
        e.contains("auth_secret") && e.contains("at least 32"),
        "{e}"
    );
    let e = start_err(|c| c.auth_secret = "a".repeat(31));
    assert!(e.contains("31 bytes"), "{e}");
    let mut c = config();
    c.auth_secret = "a".repeat(32);
    c.validate().unwrap();
    // Development mode may leave it empty.
    c.auth_secret = String::new();
    c.dev_auth = true;
    c.validate().unwrap();
    // The binary says so and exits 2.
    let out = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args(["--auth-secret", "short", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", ""])
        .env("TETHER_LOG", "error")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth_secret is 5 bytes"), "{err}");
}

#[test]
fn print_config_shows_no_secret() {
    let secret = "a-long-and-secret-hmac-key-0123456789";
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
            .args(args)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let out = run(&["--auth-secret", secret]);
    assert!(!out.contains(secret), "{out}");
    assert!(out.contains("auth_secret: \"<redacted>\""), "{out}");
    // Given through the environment, the same.
    let out = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .arg("--print-config")
        .env("TETHER_AUTH_SECRET", secret)
        .output()
        .unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(!out.contains(secret) && out.contains("<redacted>"), "{out}");
    // Nothing set: said so.
    let out = run(&["--dev-auth"]);
    assert!(out.contains("auth_secret: \"<unset>\""), "{out}");
}
