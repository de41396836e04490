#!/usr/bin/env bash
# Tether beside mosquitto, nats-server and rumqttd: the four workloads of
# ../shared/peers/README.md, same shapes, one sitting, one table (BENCHMARKS.md's peer table).
#
#   bash loadtest/compare-peers.sh                 # everything (~25 minutes)
#   PEERS="nats" bash loadtest/compare-peers.sh    # fewer peers
#   TABLE_ONLY=1 OUT=... bash loadtest/compare-peers.sh   # the table from earlier results
#   TETHER="w1 w4" PEERS="" OUT=... bash loadtest/compare-peers.sh   # some of Tether's only
#
# Tether: a fresh release gateway per workload (one process, 2 workers, --dev-auth), driven by
# tether-loadtest; reports in $OUT/tether-<w>.json. Peers: ../shared/peers/run.sh, results in
# $OUT/peers/<server>.txt. Like the peers' harness, everything runs in its own scheduler
# autogroup at nice -19 unless PRIO=0. The table goes to stdout and $OUT/table.md; its last
# column is Tether against the best peer on that row (> 1: Tether is better).
#
#   W1  18,000 logged-in connections, heartbeat every 5 s, held 60 s (logins spread over the
#       first 5 s so that heartbeats are spread, as flood spreads them)
#   W2  18,000 connect + login, 512 in flight, no retries
#   W3  10,000 room members, 1,000 x 128 B messages to the room
#   W4  1,000 clients, 20 msg/s each for 30 s (20,000 msg/s), own-topic round trip; W4sat
#       doubles the rate in 10 s steps while nothing is lost and p99 <= 50 ms
set -uo pipefail
if [ "${PRIO:-1}" = 1 ] && [ -z "${TETHER_CMP_IN_SESSION:-}" ]; then
  export TETHER_CMP_IN_SESSION=1
  exec setsid --wait bash "$0" "$@"
fi
if [ "${PRIO:-1}" = 1 ]; then
  echo -19 > /proc/self/autogroup 2>/dev/null
  renice -n -19 $$ >/dev/null 2>&1
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/tether-compare}"
PEERS="${PEERS-mosquitto nats rumqttd}"
TETHER="${TETHER-w1 w2 w3 w4 w4sat}"
N="${N:-18000}"
HOLD="${HOLD:-60}"
mkdir -p "$OUT/peers"
ulimit -n 20000 2>/dev/null || true
echo "1024 65535" > /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true

if [ -z "${TABLE_ONLY:-}" ]; then
  cargo build --release -q -p tether-gateway -p tether-loadtest || exit 1
  GW=target/release/tether-gateway
  LT=target/release/tether-loadtest
  PORT=14600
  ADMIN=14680
  tether() { # tether <name> <gateway args...> -- <loadtest args...>
    local name=$1; shift
    local gw_args=()
    while [ "$1" != "--" ]; do gw_args+=("$1"); shift; done; shift
    TETHER_LOG=warn "$GW" --dev-auth --workers 2 --listen "127.0.0.1:$PORT" \
      --admin-listen "127.0.0.1:$ADMIN" --admin-metrics-public "${gw_args[@]}" \
      > "$OUT/gateway-$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$ADMIN) 2>/dev/null && break; sleep 0.05; done
    "$LT" --addr "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" --gateway-pid "$pid" \
      --sources 127.0.0.2-127.0.0.9 --no-progress --json "$OUT/tether-$name.json" \
      --plot "$OUT/tether-$name.svg" "$@" | tee "$OUT/tether-$name.txt"
    kill -TERM "$pid" 2>/dev/null; sleep 0.3; kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  }
  for w in $TETHER; do
    case $w in
      w1) tether w1 -- hold --n "$N" --hold "$HOLD" --heartbeat 5 --rate $(( N / 5 )) ;;
      w2) tether w2 -- storm --n "$N" --inflight 512 ;;
      w3) tether w3 --uplink-rate 0 -- fanout --members 10000 --messages 1000 --size 128 ;;
      w4) tether w4 --uplink-rate 0 -- rtt --clients 1000 --rate 20000 --secs 30 ;;
      w4sat) tether w4sat --uplink-rate 0 -- rtt --clients 1000 --rate 20000 --secs 10 \
        --find-max --p99-limit-ms 50 ;;
      *) echo "unknown workload $w" >&2 ;;
    esac
  done
  for p in $PEERS; do
    OUT="$OUT/peers" N="$N" HOLD="$HOLD" bash ../shared/peers/run.sh "$p" w1 w2 w3 w4
  done
fi

python3 - "$OUT" $PEERS <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out, peers = sys.argv[1], sys.argv[2:]

def tether(w):
    try:
        return json.load(open(f"{out}/tether-{w}.json"))
    except OSError:
        return None

def fig(r, name):
    for k, v in (r or {}).get("figures", []):
        if k == name:
            return v
    return None

def lat(r, name, q):
    return ((r or {}).get("latencies", {}).get(name) or {}).get(q)

def srv(r, name):
    return (r or {}).get("server", {}).get(name)

def peer_lines(p):
    """The newest line of each workload in the peer's results file."""
    lines = {}
    try:
        for line in open(f"{out}/peers/{p}.txt"):
            if line.startswith("W"):
                w, *kv = line.split()
                d = dict(x.split("=", 1) for x in kv if "=" in x)
                if w == "W4" and d.get("step", "0") != "0":
                    continue
                lines[w] = d
    except OSError:
        pass
    return lines

P = {p: peer_lines(p) for p in peers}

def num(x):
    try:
        return float(str(x).split("(")[0])
    except (TypeError, ValueError):
        return None

# (label, higher is better, Tether's value, peer value from its W-line, unit, target)
w1, w2, w3, w4, w4s = (tether(w) for w in ("w1", "w2", "w3", "w4", "w4sat"))
def cpu_per_delivery(d):
    c, n = num(d.get("srv_cpu_s")), num(d.get("received"))
    return c * 1e6 / n if c is not None and n else None
rows = [
    ("W1 server memory per idle connection", False,
     srv(w1, "gateway rss growth per connection (B)"), lambda p: num(P[p].get("W1", {}).get("rss_per_conn_B")),
     "B", "<= 512 B"),
    ("W1 server CPU over the hold", False,
     srv(w1, "gateway cpu_secs connected->held"), lambda p: num(P[p].get("W1", {}).get("srv_cpu_s")), "s", ""),
    ("W1 heartbeat RTT p99", False,
     (lat(w1, "heartbeat", "p99_us") or 0) / 1e3 if w1 else None,
     lambda p: (num(P[p].get("W1", {}).get("hb_p99_us")) or 0) / 1e3 or None, "ms", ""),
    ("W1 kernel slab per connection", False,
     srv(w1, "kernel slab growth per connection (B)"), lambda p: num(P[p].get("W1", {}).get("slab_per_conn_B")), "B", "(floor)"),
    ("W2 connect + login rate", True,
     fig(w2, "connections/s"), lambda p: num(P[p].get("W2", {}).get("conn_per_s")), "conn/s", ">= 2x best"),
    ("W2 connect latency p99", False,
     (lat(w2, "connect", "p99_us") or 0) / 1e3 if w2 else None,
     lambda p: (num(P[p].get("W2", {}).get("connect_p99_us")) or 0) / 1e3 or None, "ms", ""),
    ("W3 fan-out deliveries/s", True,
     fig(w3, "deliveries/s"), lambda p: num(P[p].get("W3", {}).get("deliveries_per_s")), "/s", ">= 1.5x best"),
    ("W3 server CPU per delivery", False,
     srv(w3, "gateway cpu µs per delivery"), lambda p: cpu_per_delivery(P[p].get("W3", {})), "µs", ""),
    ("W3 lost", False, fig(w3, "lost"), lambda p: num(P[p].get("W3", {}).get("lost")), "", "0"),
    # From the actual send, as flood measures it (its sender lag is apart).
    ("W4 RTT p50 at 20,000 msg/s", False,
     (lat(w4, "echo from send", "p50_us") or 0) / 1e3 if w4 else None,
     lambda p: (num(P[p].get("W4", {}).get("rtt_p50_us")) or 0) / 1e3 or None, "ms", ""),
    ("W4 RTT p99 at 20,000 msg/s", False,
     (lat(w4, "echo from send", "p99_us") or 0) / 1e3 if w4 else None,
     lambda p: (num(P[p].get("W4", {}).get("rtt_p99_us")) or 0) / 1e3 or None, "ms", "<= 5 ms"),
    ("W4 RTT p99 from the intended send time (open loop)", False,
     (lat(w4, "echo", "p99_us") or 0) / 1e3 if w4 else None,
     lambda p: None, "ms", "<= 5 ms"),
    ("W4 sender lag p99 (actual - intended send time)", False,
     (lat(w4, "send lag", "p99_us") or 0) / 1e3 if w4 else None,
     lambda p: (num(P[p].get("W4", {}).get("lag_p99_us")) or 0) / 1e3 or None, "ms", ""),
    ("W4 lost", False, fig(w4, "lost"), lambda p: num(P[p].get("W4", {}).get("lost")), "", "0"),
    ("W4sat highest rate with p99 <= 50 ms, no loss", True,
     fig(w4s, "highest rate held (msg/s)"),
     lambda p: num(P[p].get("W4sat", {}).get("p99_ok_msg_s") or P[p].get("W4sat", {}).get("sustained_msg_s")),
     "msg/s", ""),
]

def show(v):
    if v is None:
        return "–"
    v = float(v)
    if v >= 100 or v == int(v):
        return f"{v:,.0f}"
    return f"{v:.2f}"

print(f"| workload | Tether | " + " | ".join(peers) + " | Tether vs best peer | target |")
print("|---|---|" + "---|" * len(peers) + "---|---|")
for label, higher, t, pf, unit, target in rows:
    vals = {p: pf(p) for p in peers}
    known = [v for v in vals.values() if v is not None]
    best = (max(known) if higher else min(known)) if known else None
    ratio = "–"
    if t is not None and best is not None and float(t) > 0 and best > 0:
        r = float(t) / best if higher else best / float(t)
        ratio = f"{r:.2f}x"
    elif t is not None and best is not None and float(t) == 0 and best == 0:
        ratio = "equal"
    u = f" {unit}" if unit else ""
    print(f"| {label} | {show(t)}{u} | " + " | ".join(show(vals[p]) for p in peers)
          + f" | {ratio} | {target} |")
EOF
