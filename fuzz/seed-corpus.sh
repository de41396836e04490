#!/usr/bin/env bash
# Builds fuzz/corpus/<target>/ from the protocol's test vectors (protocol/vectors/*/*.json:
# a "hex" field with a frame or stream, or a transcript's "steps" each with one), shaped as each target reads its input:
#
#   decode, roundtrip  the frame bytes; plus every small valid frame back to back, as one stream
#   decode_chunked     byte 0 = (number of chunk sizes - 1), the sizes, then the frame bytes
#   gunzip             the body of every frame whose gzip flag is set, plus a few gzip members
#                      made here (empty, stored, fixed and dynamic Huffman, a bomb, cut short)
#   batch              count (u32 LE), flags (bit 0 gzip, bit 1 count as is), body of every BATCH
#   session            not from the vectors: a few operation sequences written here (settings,
#                      then ops; see fuzz/src/session.rs)
#
# Idempotent (files are named after the vectors); corpus/ is not committed. With no vectors it
# still seeds every target with a PING, so a fuzz run never starts from nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python3 - "$here" <<'PY'
import gzip, json, pathlib, sys, zlib

here = pathlib.Path(sys.argv[1])
targets = ["decode", "decode_chunked", "roundtrip", "gunzip", "batch", "session"]
for t in targets:
    (here / "corpus" / t).mkdir(parents=True, exist_ok=True)

def put(target, name, data):
    (here / "corpus" / target / name).write_bytes(data)

def chunked(sizes, stream):
    # The decode_chunked input: byte 0 is len(sizes) - 1 (the target reads `byte % 16 + 1` sizes).
    assert 1 <= len(sizes) <= 16
    return bytes([len(sizes) - 1, *sizes]) + stream

def parts(frame):
    """(gzip flag, kind byte, header bytes, body) of one frame's bytes, or None if it is not one."""
    if len(frame) < 10 or frame[4] != 0xF7:
        return None
    length = int.from_bytes(frame[0:4], "big")
    header_len = int.from_bytes(frame[8:10], "big")
    if len(frame) != 4 + length or 6 + header_len > length:
        return None
    return frame[6] & 1, frame[7], frame[10:10 + header_len], frame[10 + header_len:]

def varint(b, i=0):
    n = shift = 0
    while i < len(b):
        n |= (b[i] & 0x7F) << shift
        i += 1
        if b[i - 1] < 0x80:
            return n, i
        shift += 7
    return n, i

PING = bytes.fromhex("00000006f7010003" "0000")
vectors = sorted((here / ".." / "protocol" / "vectors").glob("*/*.json"))
if not vectors:
    print("seed-corpus: no vectors under protocol/vectors; seeding a PING only", file=sys.stderr)

def inputs(p, v):
    """(name, bytes) pairs a vector file gives: its frame or stream, or a transcript's steps
    one by one and all of them as one stream."""
    name = v.get("name") or p.stem
    if "hex" in v:
        return [(name, bytes.fromhex(v["hex"]))]
    steps = [bytes.fromhex(s["hex"]) for s in v.get("steps", []) if "hex" in s]
    out = [(f"{name}-{i}", b) for i, b in enumerate(steps)]
    if len(steps) > 1:
        out.append((name, b"".join(steps)))
    return out


valid = []
for p, name, data in ((p, n, d) for p in vectors for n, d in inputs(p, json.loads(p.read_text()))):
    if p.parent.name == "valid":
        valid.append(data)
    put("decode", name, data)
    put("roundtrip", name, data)
    put("decode_chunked", name, chunked([3, 7], data))
    fp = parts(data)
    if fp is None:
        continue
    gz, kind, header, body = fp
    if gz:
        put("gunzip", name, body)
    if kind == 0x0F:  # BATCH: header is pb.Batch { uint32 count = 1 }
        count = (varint(header, 1)[0] if header[:1] == b"\x08" else 0) & 0xFFFFFFFF
        raw = 2 if count >= 64 else 0  # flags bit 1: the target takes the count as it is
        put("batch", name, count.to_bytes(4, "little") + bytes([gz | raw]) + body)

# Every small valid frame back to back: a stream of many kinds.
stream = b"".join(f for f in valid if len(f) < 2048) or PING * 3
for t in ["decode", "roundtrip"]:
    put(t, "all_small_frames", stream)
put("decode_chunked", "all_small_frames", chunked([1, 2, 3, 5, 8], stream))
put("decode_chunked", "all_small_frames_bytewise", chunked([1], stream))
put("decode", "ping", PING)
put("roundtrip", "ping", PING)

# A BATCH body of a few plain frames (frames without a body or with a short one).
small = [f for f in valid if len(f) < 64 and parts(f) and parts(f)[1] != 0x0F][:5] or [PING]
put("batch", "plain_small_frames", len(small).to_bytes(4, "little") + b"\x00" + b"".join(small))
z = gzip.compress(b"".join(small), mtime=0)
put("batch", "gzip_small_frames", len(small).to_bytes(4, "little") + b"\x01" + z)

# gzip members of each deflate block type, and the shapes the limits must stop.
text = b"hello tether " * 40
def raw_gzip(deflate):
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + deflate
            + zlib.crc32(text).to_bytes(4, "little") + len(text).to_bytes(4, "little"))
def deflate(level, strategy=zlib.Z_DEFAULT_STRATEGY):
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
    return c.compress(text) + c.flush()
put("gunzip", "empty", gzip.compress(b"", mtime=0))
put("gunzip", "stored", raw_gzip(deflate(0)))
put("gunzip", "fixed_huffman", raw_gzip(deflate(9, zlib.Z_FIXED)))
put("gunzip", "dynamic_huffman", raw_gzip(deflate(9)))
put("gunzip", "cut_short", raw_gzip(deflate(9))[:-6])
put("gunzip", "trailing_byte", raw_gzip(deflate(9)) + b"\x00")
put("gunzip", "bomb_1mib", gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0))
put("gunzip", "two_members", gzip.compress(b"a", mtime=0) + gzip.compress(b"b", mtime=0))

# session: 12 bytes of settings (codec limits, max_frames, max_bytes, dedup window, rate, burst,
# max_transient, max_rooms, slow-consumer secs, flags, start time), then operations as
# fuzz/src/session.rs's Harness::step reads them.
settings = bytes([4, 4, 6, 3, 2, 2, 2, 2, 1, 0x02, 0x10, 0x00])
PUSH, PUSH_TRANSIENT, PUSH_GZIP = [0, 0x00, 0, 20], [0, 0x01, 0, 9], [0, 0x04, 100, 200]
SEND, SEND_LOST, ACK, ACK_OLD = [5, 0], [6, 0x83], [3, 0, 0], [3, 2, 1]
CLOSE, RESUME, RESUME_NO_GZIP, RESUME_ALL = [7, 0], [8, 0, 0], [8, 0x20, 0], [8, 4, 0]
UPLINK, UPLINK_AGAIN, ANSWER_OK, ANSWER_TIMEOUT = [9, 2, 3], [9, 2, 3], [11, 0, 0], [11, 0, 3]
JOIN, LEAVE, ROOM_OK, ROOM_ADD = [12, 0x05, 0], [12, 0x04, 0], [13, 0x00], [13, 0x0A]
END, PING, CLOCK_S, CLOCK_HB = [14, 0], [14, 1, 0, 2], [15, 1, 5], [15, 2]
HANDOFF = [14, 4]
seeds = {
    "settings_only": [],
    "push_send_ack": [PUSH, PUSH, PUSH_TRANSIENT, SEND, ACK, PUSH, SEND, ACK, END],
    "detach_resume_replay": [PUSH, PUSH, SEND, CLOSE, PUSH, RESUME, SEND, ACK, END],
    "resume_while_attached": [PUSH, PUSH_GZIP, SEND_LOST, RESUME_NO_GZIP, ACK_OLD, SEND, CLOSE, END],
    "full_buffer_slow": [PUSH] * 6 + [SEND, CLOCK_S, PUSH, ACK, PUSH, END],
    "uplinks": [UPLINK, UPLINK_AGAIN, ANSWER_OK, UPLINK_AGAIN, [9, 2, 4], ANSWER_TIMEOUT,
                [9, 2, 4], END, UPLINK],
    "rooms": [JOIN, ROOM_OK, [12, 0x09, 0], ROOM_OK, LEAVE, ROOM_OK, ROOM_ADD, END, JOIN, ROOM_OK],
    "heartbeat_timeout": [PUSH, SEND, CLOCK_HB, PING, PUSH, RESUME_ALL, SEND, END],
    "handoff": [PUSH, SEND, UPLINK, CLOSE, PUSH, HANDOFF, RESUME, ANSWER_OK, SEND, ACK, END],
}
for name, ops in seeds.items():
    put("session", name, settings + bytes(b for op in ops for b in op))

counts = {t: len(list((here / "corpus" / t).iterdir())) for t in targets}
print(f"seeded from {len(vectors)} vectors: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
PY
