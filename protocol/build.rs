//! Generates the prost types from `proto/*.proto` with protox (pure Rust), so building
//! needs no system `protoc`. The encoded descriptor set is written next to them for
//! reflection (the readable JSON form of frames in `tether-codec`).

use std::{env, fs, path::PathBuf};

fn main() {
    let protos = ["proto/tether.proto", "proto/chat.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"]).expect("proto/*.proto must compile");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptor set");
    prost_build::Config::new()
        // `bytes` fields decode as `Bytes`: a slice of the frame, not a copy.
        .bytes(["."])
        .compile_fds(fds)
        .expect("prost-build");
}
