//! Replays every input under `fuzz/regressions/<target>/` through the checks of that fuzz
//! target (`fuzz/src/checks.rs`, included here by path so both run the same code), without
//! the fuzzer. A crash the fuzzer found is kept there once fixed.

#[path = "../../fuzz/src/checks.rs"]
mod checks;

use std::{fs, path::PathBuf};

#[test]
fn every_kept_fuzz_input_passes_its_targets_checks() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for dir in fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let target = dir.file_name().unwrap().to_str().unwrap().to_owned();
        if target == "session" {
            continue; // the gateway's session core: gateway/tests/fuzz_session.rs replays these
        }
        let check: fn(&[u8]) = match target.as_str() {
            "decode" => checks::decode,
            "decode_chunked" => checks::decode_chunked,
            "gunzip" => checks::gunzip_bounded,
            "roundtrip" => checks::roundtrip,
            "batch" => checks::batch,
            other => panic!("fuzz/regressions/{other} names no fuzz target"),
        };
        for input in fs::read_dir(&dir).unwrap() {
            let path = input.unwrap().path();
            let data = fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{} fails the {target} checks",
                path.display()
            );
            replayed += 1;
        }
    }
    assert!(replayed >= 10, "only {replayed} regression inputs found");
}
