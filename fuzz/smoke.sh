#!/usr/bin/env bash
# CI's bounded fuzz run: every target for FUZZ_SECONDS (default 30) under AddressSanitizer,
# seeded from the protocol's test vectors. Fails on any crash, leak or timeout, and prints
# executions per second and total executions per target.
#
#   FUZZ_SECONDS=60 bash fuzz/smoke.sh [target ...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
seconds="${FUZZ_SECONDS:-30}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode decode_chunked gunzip roundtrip batch)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1   # cargo-fuzz needs -Z flags; no nightly toolchain here

./seed-corpus.sh
cargo fuzz build

status=0
printf '%-16s %12s %14s %s\n' target exec/s executions result
for t in "${targets[@]}"; do
  log="$(mktemp)"
  # Run on a copy of the seeds so CI never grows the checked-out tree.
  work="$(mktemp -d)"
  cp -r "corpus/$t/." "$work/"
  if cargo fuzz run "$t" "$work" -- -max_total_time="$seconds" -print_final_stats=1 \
      -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  execs=$(grep -oP 'stat::number_of_executed_units:\s*\K[0-9]+' "$log" | tail -1 || true)
  rate=$(grep -oP 'stat::average_exec_per_sec:\s*\K[0-9]+' "$log" | tail -1 || true)
  printf '%-16s %12s %14s %s\n' "$t" "${rate:-?}" "${execs:-?}" "$result"
  if [ "$result" = FAILED ]; then
    echo "---- $t: last lines of the fuzzer's output"
    tail -40 "$log"
    ls -1 "artifacts/$t" 2>/dev/null | sed 's/^/artifact: /' || true
  fi
  rm -rf "$work" "$log"
done
exit $status
