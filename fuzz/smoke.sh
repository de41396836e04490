#!/usr/bin/env bash
# CI's bounded fuzz run: every target for FUZZ_SECONDS (default 30) under AddressSanitizer,
# seeded from the protocol's test vectors. Fails on any crash, timeout or oversized
# allocation, and prints executions per second and total executions per target.
#
#   FUZZ_SECONDS=60 bash fuzz/smoke.sh [target ...]
#
# One fuzzer at a time (the CI machine has 2 cores). With FUZZ_SECONDS=30: a few minutes to
# build from clean (the session target builds the gateway), then 6 x 30 s.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
seconds="${FUZZ_SECONDS:-30}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode decode_chunked gunzip roundtrip batch session)
start=$(date +%s)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1   # cargo-fuzz passes -Z flags; this lets the stable toolchain take them

./seed-corpus.sh
cargo fuzz build
echo "built in $(( $(date +%s) - start )) s"

status=0
results=()
for t in "${targets[@]}"; do
  log="$(mktemp)"
  since="$(mktemp)"   # older than anything this run writes to artifacts/
  # Run on a copy of the seeds so CI never grows the checked-out tree.
  work="$(mktemp -d)"
  cp -r "corpus/$t/." "$work/"
  # -malloc_limit_mb: one allocation past 64 MiB is a crash (the codec's limits allow ~1 MiB).
  if cargo fuzz run "$t" "$work" -- -max_total_time="$seconds" -print_final_stats=1 \
      -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=64 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  execs=$(grep -oP 'stat::number_of_executed_units:\s*\K[0-9]+' "$log" | tail -1 || true)
  rate=$(grep -oP 'stat::average_exec_per_sec:\s*\K[0-9]+' "$log" | tail -1 || true)
  results+=("$(printf '%-16s %10s %14s  %s' "$t" "${rate:-?}" "${execs:-?}" "$result")")
  echo "${results[-1]}"
  if [ "$result" = FAILED ]; then
    echo "---- $t: what went wrong"
    grep -m1 -B2 -A14 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)|==ERROR" "$log" ||
      tail -40 "$log"
    find "artifacts/$t" -type f -newer "$since" 2>/dev/null | while read -r a; do
      echo "artifact $a ($(wc -c <"$a") bytes), first 512 as hex:"
      head -c 512 "$a" | od -An -tx1 -v | tr -d ' \n' | fold -w 64
      echo
    done
  fi
  rm -rf "$work" "$log" "$since"
done

echo
printf '%-16s %10s %14s  %s\n' target exec/s executions result
printf '%s\n' "${results[@]}"
echo "fuzz smoke run: $(( $(date +%s) - start )) s in all"
exit $status
