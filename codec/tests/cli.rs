//! `tether-frame` turns vector bytes into the vector's readable form and back.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-frame"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn vector(path: &str) -> serde_json::Value {
    let p = format!("{}/../protocol/vectors/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn decode_prints_the_readable_form_and_encode_gives_the_bytes_back() {
    let v = vector("valid/login_resume.json");
    let hex = v["hex"].as_str().unwrap();
    let out = run(&["decode"], hex.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed, v["frame"]);

    let out = run(&["encode"], &out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), hex);
}

#[test]
fn a_stream_of_binary_frames_decodes_frame_by_frame() {
    let a = hex::decode(vector("valid/ping.json")["hex"].as_str().unwrap()).unwrap();
    let b = hex::decode(vector("valid/downlink_ack.json")["hex"].as_str().unwrap()).unwrap();
    let out = run(&["decode", "--binary"], &[a, b].concat());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let kinds: Vec<_> = serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(|v| v.unwrap()["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["PING", "DOWNLINK_ACK"]);
}

#[test]
fn invalid_bytes_exit_1_with_the_error_name_and_code() {
    let v = vector("invalid/length_over_cap.json");
    let out = run(&["decode"], v["hex"].as_str().unwrap().as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("frame_too_large") && err.contains("FrameTooLarge"),
        "{err}"
    );
}
