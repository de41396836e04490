#!/usr/bin/env bash
# Builds fuzz/corpus/<target>/ from the protocol's test vectors (one file per vector's bytes),
# plus the gzip bodies of the vectors for `gunzip`. Idempotent; corpus/ is not committed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python3 - "$here" <<'PY'
import json, pathlib, sys, hashlib
here = pathlib.Path(sys.argv[1])
vectors = sorted((here / ".." / "protocol" / "vectors").glob("*/*.json"))
if not vectors:
    sys.exit("no vectors found under protocol/vectors")
targets = ["decode", "decode_chunked", "roundtrip", "gunzip", "batch"]
for t in targets:
    (here / "corpus" / t).mkdir(parents=True, exist_ok=True)
def put(target, name, data):
    (here / "corpus" / target / name).write_bytes(data)
frames = []
for p in vectors:
    v = json.loads(p.read_text())
    data = bytes.fromhex(v["hex"])
    frames.append(data)
    for t in ["decode", "roundtrip"]:
        put(t, v["name"], data)
    # decode_chunked: byte 0 = number of chunk sizes, then the sizes, then the stream.
    put("decode_chunked", v["name"], bytes([2, 3, 7]) + data)
    frame = v.get("frame")
    if frame and frame.get("gzip"):
        put("gunzip", v["name"], bytes.fromhex(frame["body"]))
    if frame and frame.get("kind") == "BATCH":
        body = bytes.fromhex(frame["body"])
        count = int(frame["header"].get("count", 0))
        put("batch", v["name"], count.to_bytes(4, "little") + bytes([1 if frame["gzip"] else 0]) + body)
# A stream of every valid frame back to back, and a batch of a few plain frames.
stream = b"".join(f for f in frames if len(f) < 2048)
put("decode", "all_small_frames", stream)
put("decode_chunked", "all_small_frames", bytes([5, 1, 2, 3, 5, 8]) + stream)
small = [f for f in frames if len(f) < 64][:5]
put("batch", "plain_small_frames", len(small).to_bytes(4, "little") + b"\x00" + b"".join(small))
print(f"seeded {len(vectors)} vectors into {len(targets)} targets")
PY
