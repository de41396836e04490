#!/usr/bin/env bash
# One machine holding N logged-in, heartbeating connections: gateway and load generator
# both on this machine, both spread over processes (20,000 open files per process here).
#
#   bash loadtest/scale-1m.sh            # 1,000,000 connections held 10 minutes (~13 min)
#   bash loadtest/scale-1m.sh small      # 100,000 held 1 minute (~2 min)
#   N=300000 HOLD=120 bash loadtest/scale-1m.sh
#
# Run as root to have the kernel settings applied (each is printed); without root they are
# only checked. Heartbeats at the gateway's interval (30 s for mobile clients). Prints the
# load tester's report: connections held, unexpected disconnects, gateway memory per
# connection (RSS growth / N, and all gateway memory / N with process start-up included),
# kernel slab growth / N, CPU of both sides during the hold, heartbeat RTT percentiles.
# Files: $OUT/report.json, $OUT/chart.svg, $OUT/summary.txt, $OUT/gateway.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

N=${N:-1000000}
HOLD=${HOLD:-600}
if [ "${1:-}" = small ]; then N=${N_SMALL:-100000}; HOLD=${HOLD_SMALL:-60}; fi
PER_GATEWAY=${PER_GATEWAY:-17000}   # connections per gateway process, under the file limit
PER_SOURCE=${PER_SOURCE:-25000}     # connections per source address: under half the port range
PORT=${PORT:-24000}
ADMIN=${ADMIN:-24100}
OUT=${OUT:-/tmp/tether-scale}
mkdir -p "$OUT"

procs=$(( (N + PER_GATEWAY - 1) / PER_GATEWAY ))
sources=$(( (N + PER_SOURCE - 1) / PER_SOURCE ))
if [ "$sources" -gt 250 ]; then echo "too many source addresses needed" >&2; exit 2; fi
echo "== $N connections: $procs gateway processes, $sources source addresses, hold ${HOLD}s"

# ---- kernel settings ----
setting() { # path wanted: raise when below (or, for ranges, set)
  local path=$1 want=$2 have
  have=$(cat "$path" 2>/dev/null || echo "absent")
  if [ "$have" = absent ]; then return; fi
  if [ "$(id -u)" = 0 ] && [ "$have" != "$want" ]; then
    if echo "$want" > "$path" 2>/dev/null; then
      echo "   $path: $have -> $(cat "$path")"; return
    fi
  fi
  echo "   $path: $(cat "$path")"
}
echo "== kernel settings"
files=$(( 2 * N + 200000 ))
[ "$(cat /proc/sys/fs/file-max)" -ge "$files" ] || setting /proc/sys/fs/file-max "$files"
setting /proc/sys/net/ipv4/ip_local_port_range "1024	65535"
[ "$(cat /proc/sys/net/core/somaxconn)" -ge 65535 ] || setting /proc/sys/net/core/somaxconn 65535
[ "$(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)" -ge 65535 ] \
  || setting /proc/sys/net/ipv4/tcp_max_syn_backlog 65535
# TCP memory in 4 KiB pages: up to 8 GiB before pressure, 12 GiB hard.
setting /proc/sys/net/ipv4/tcp_mem "2097152	2097152	3145728"
if [ -e /proc/sys/net/netfilter/nf_conntrack_max ]; then
  [ "$(cat /proc/sys/net/netfilter/nf_conntrack_max)" -ge "$files" ] \
    || setting /proc/sys/net/netfilter/nf_conntrack_max "$files"
fi
ports=$(awk '{print $2 - $1 + 1}' /proc/sys/net/ipv4/ip_local_port_range)
if [ "$ports" -lt "$PER_SOURCE" ]; then
  echo "ip_local_port_range gives $ports ports per source, fewer than PER_SOURCE=$PER_SOURCE:" \
       "run as root or lower PER_SOURCE" >&2
  exit 2
fi

# ---- build ----
cargo build --release -p tether-gateway -p tether-loadtest 2>&1 | tail -1
gw=target/release/tether-gateway
lt=target/release/tether-loadtest

# ---- gateway processes ----
pid=
stop() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap stop EXIT
TETHER_LOG=warn "$gw" --dev-auth --processes "$procs" --workers 1 \
  --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" --admin-metrics-public \
  --max-connections $(( procs * 19500 )) --drain-window-ms 1000 --drain-linger-ms 500 \
  > "$OUT/gateway.log" 2>&1 &
pid=$!
admins=
for i in $(seq 0 $(( procs - 1 ))); do admins+="${admins:+,}127.0.0.1:$(( ADMIN + i ))"; done
for _ in $(seq 1 200); do
  up=0
  for i in $(seq 0 $(( procs - 1 ))); do
    (exec 3<>/dev/tcp/127.0.0.1/$(( ADMIN + i ))) 2>/dev/null && up=$(( up + 1 ))
  done
  [ "$up" = "$procs" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$OUT/gateway.log"; exit 1; }
  sleep 0.1
done
echo "== gateway supervisor pid $pid, $up/$procs processes answering"

# ---- load ----
last=$(( 2 + sources - 1 ))
"$lt" --addr "127.0.0.1:$PORT" --sources "127.0.0.2-127.0.0.$last" \
  --gateway-pid "$pid" --admin "$admins" --no-progress \
  --json "$OUT/report.json" --plot "$OUT/chart.svg" --max-secs $(( HOLD + 1200 )) \
  hold --n "$N" --hold "$HOLD" --inflight 1024 --retries 3 | tee "$OUT/summary.txt"

stop
echo "== report: $OUT/report.json, chart: $OUT/chart.svg"
