//! The `session` fuzz target's check (`fuzz/src/session.rs`, included here by path so both
//! run the same code) under `cargo test`, without the fuzzer: every input kept under
//! `fuzz/regressions/session/`, then 500 inputs from a fixed xorshift seed (short
//! and long ones), so the model and the invariants run on every test run.
//!
//! The inputs named `open-*` reproduce the findings that were open until the session core was
//! fixed (2026-12-02; `fuzz/regressions/session/README.md`): they must pass the strict checks,
//! which are now the default.

mod common;

#[path = "../../fuzz/src/session.rs"]
#[allow(dead_code)] // the fuzz target's entry point (`session`, from the environment)
mod session;

use std::{fs, path::PathBuf};

/// The kept inputs, (name, bytes), the README left out.
fn kept() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/session");
    let mut v: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|e| e != "md"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_kept_session_input_passes_the_checks() {
    let kept = kept();
    assert!(kept.len() >= 3);
    for (name, data) in kept {
        let outcome =
            std::panic::catch_unwind(|| session::session_with(&data, session::Strict::default()));
        assert!(outcome.is_ok(), "{name} fails the session checks");
    }
}

/// Failed while the findings were open (before the session core's fixes).
#[test]
fn the_findings_once_open_pass_the_strict_checks() {
    let mut failed = Vec::new();
    for (name, data) in kept().into_iter().filter(|(n, _)| n.starts_with("open-")) {
        let outcome =
            std::panic::catch_unwind(|| session::session_with(&data, session::Strict::ALL));
        if outcome.is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "still failing: {failed:?}");
}

#[test]
fn seeded_inputs_pass_the_checks() {
    let mut rng = common::xorshift(0x5E55_10C0_4E00_0001);
    for i in 0..500 {
        let len = 12 + (rng.next().unwrap() % if i % 10 == 0 { 1024 } else { 160 }) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next().unwrap() as u8).collect();
        let outcome =
            std::panic::catch_unwind(|| session::session_with(&data, session::Strict::default()));
        assert!(outcome.is_ok(), "input {i} fails: {}", hex(&data));
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
