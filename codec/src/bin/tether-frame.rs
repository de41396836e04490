//! `tether-frame`: turns frame bytes into the readable form the test vectors use, and back,
//! so an SDK developer can check their bytes against ours.
//!
//! ```text
//! echo 00000006f70100030000 | tether-frame decode          # hex in, JSON out
//! tether-frame decode --binary < capture.bin               # raw bytes in (a stream of frames)
//! echo '{"kind":"PING"}' | tether-frame encode             # JSON in, hex out
//! ```

use std::{
    io::{self, Read, Write},
    process::ExitCode,
};

use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use tether_codec::{json, Decoder, Limits};

#[derive(Parser)]
#[command(
    version,
    about = "Convert Tether frames between bytes and their readable JSON form"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Maximum value of the length prefix (the decoder's frame-size cap).
    #[arg(long, global = true, default_value_t = tether_codec::DEFAULT_MAX_FRAME_LEN)]
    max_frame_len: u32,
    /// Maximum size of a decompressed body.
    #[arg(long, global = true, default_value_t = tether_codec::DEFAULT_MAX_DECOMPRESSED_LEN)]
    max_decompressed_len: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read frames (hex on stdin, whitespace ignored; or raw bytes with --binary) and print
    /// one JSON object per frame. Exits 1 with the error's name and code on bad input.
    Decode {
        /// stdin is raw bytes, not hex.
        #[arg(long)]
        binary: bool,
    },
    /// Read JSON frames (one object, or an array) on stdin and print their bytes as hex,
    /// one frame per line (or raw bytes with --binary).
    Encode {
        #[arg(long)]
        binary: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let limits = Limits {
        max_frame_len: args.max_frame_len,
        max_decompressed_len: args.max_decompressed_len,
        ..Limits::default()
    };
    let mut input = Vec::new();
    if let Err(e) = io::stdin().read_to_end(&mut input) {
        eprintln!("tether-frame: reading stdin: {e}");
        return ExitCode::from(2);
    }
    let result = match args.cmd {
        Cmd::Decode { binary } => decode(input, binary, &limits),
        Cmd::Encode { binary } => encode(&input, binary, &limits),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-frame: {e}");
            ExitCode::from(1)
        }
    }
}

fn decode(input: Vec<u8>, binary: bool, limits: &Limits) -> Result<(), String> {
    let bytes = if binary {
        input
    } else {
        let text: String = String::from_utf8_lossy(&input)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        hex::decode(text).map_err(|e| format!("input is not hex: {e}"))?
    };
    let decoder = Decoder::new(*limits);
    let mut buf = BytesMut::from(Bytes::from(bytes));
    let mut out = io::stdout().lock();
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                let line = serde_json::to_string_pretty(&json::to_json(&frame, limits))
                    .expect("JSON values serialize");
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
            }
            Ok(None) if buf.is_empty() => return Ok(()),
            Ok(None) => {
                return Err(format!(
                    "truncated: {} bytes at the end are not a whole frame (code MALFORMED_FRAME)",
                    buf.len()
                ))
            }
            Err(e) => return Err(format!("{}: {e} (code {:?})", e.name(), e.code())),
        }
    }
}

fn encode(input: &[u8], binary: bool, limits: &Limits) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_slice(input).map_err(|e| format!("input is not JSON: {e}"))?;
    let frames = match value {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    let mut out = io::stdout().lock();
    for v in &frames {
        let frame = json::from_json(v)?;
        let bytes = frame.to_bytes(limits).map_err(|e| e.to_string())?;
        if binary {
            out.write_all(&bytes).map_err(|e| e.to_string())?;
        } else {
            writeln!(out, "{}", hex::encode(&bytes)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
