//! The readable form of a frame: JSON with the header in the canonical protobuf JSON
//! mapping (proto field names, enum names, 64-bit integers as strings, bytes as base64),
//! so that any protobuf library can parse it (Java `JsonFormat`, `SwiftProtobuf`,
//! `google.golang.org/protobuf/encoding/protojson`). Used by the test vectors and by
//! `tether-frame`.
//!
//! ```json
//! { "version": 1, "kind": "DOWNLINK", "gzip": false,
//!   "header": { "seq": "42" }, "body": "0a0568656c6c6f" }
//! ```
//!
//! Derived fields, written for people and ignored when parsing: `body_plain` (the
//! inflated body of a gzip frame, hex) and `frames` (the readable frames of a BATCH).

use std::sync::OnceLock;

use bytes::BytesMut;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::{json, Map, Value};
use tether_protocol::{Kind, DESCRIPTOR_SET, VERSION};

use crate::{decode_batch, Frame, Header, Limits};

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTOR_SET).expect("built-in descriptor set"))
}

fn descriptor(kind: Kind) -> MessageDescriptor {
    pool()
        .get_message_by_name(kind.header_message())
        .expect("every kind's header message is in the schema")
}

/// The readable form of `frame`.
pub fn to_json(frame: &Frame, limits: &Limits) -> Value {
    let kind = frame.kind();
    let mut raw = BytesMut::with_capacity(frame.header.encoded_len());
    frame.header.encode_raw(&mut raw);
    let dynamic = DynamicMessage::decode(descriptor(kind), raw.freeze())
        .expect("a header we encoded decodes");
    let options = SerializeOptions::new().use_proto_field_name(true);
    let header = dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .expect("protobuf JSON of a valid message");
    let mut out = Map::new();
    out.insert("version".into(), json!(VERSION));
    out.insert("kind".into(), json!(kind.name()));
    out.insert("gzip".into(), json!(frame.gzip));
    out.insert("header".into(), header);
    out.insert("body".into(), json!(hex::encode(&frame.body)));
    if frame.gzip {
        if let Ok(plain) = frame.decompressed_body(limits) {
            out.insert("body_plain".into(), json!(hex::encode(plain)));
        }
    }
    if kind == Kind::Batch {
        if let Ok(inner) = decode_batch(frame, limits) {
            let frames = inner.iter().map(|f| to_json(f, limits)).collect();
            out.insert("frames".into(), Value::Array(frames));
        }
    }
    Value::Object(out)
}

/// Parses the readable form back into a frame (derived fields are ignored).
pub fn from_json(value: &Value) -> Result<Frame, String> {
    let obj = value.as_object().ok_or("a frame is a JSON object")?;
    match obj.get("version") {
        None => {}
        Some(v) if v.as_u64() == Some(VERSION.into()) => {}
        Some(v) => return Err(format!("version {v} is not {VERSION}")),
    }
    let kind_name = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("missing \"kind\"")?;
    let kind = Kind::from_name(kind_name).ok_or_else(|| format!("unknown kind {kind_name:?}"))?;
    let gzip = match obj.get("gzip") {
        None => false,
        Some(v) => v.as_bool().ok_or("\"gzip\" is a boolean")?,
    };
    let header_json = obj.get("header").cloned().unwrap_or_else(|| json!({}));
    let dynamic = DynamicMessage::deserialize(descriptor(kind), header_json)
        .map_err(|e| format!("header: {e}"))?;
    let header = Header::decode(kind, &prost::Message::encode_to_vec(&dynamic))
        .map_err(|e| e.to_string())?;
    let body = match obj.get("body") {
        None => Vec::new(),
        Some(b) => hex::decode(b.as_str().ok_or("\"body\" is a hex string")?)
            .map_err(|e| format!("body: {e}"))?,
    };
    Ok(Frame {
        header,
        gzip,
        body: body.into(),
    })
}
