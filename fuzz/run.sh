#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), two at a time.
# cargo-fuzz needs nightly features; on the stable toolchain RUSTC_BOOTSTRAP
# unlocks them. Corpora and crashes stay under fuzz/corpus and fuzz/artifacts.
#   cargo install cargo-fuzz && fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
export RUSTC_BOOTSTRAP=1
targets=(signature_header job_parse rules_parse request_path)
cargo fuzz build -O
run() {
  cargo fuzz run -O "$1" -- -max_total_time="$seconds" -print_final_stats=1 >"fuzz/$1.log" 2>&1 \
    && echo "$1: ok, $(grep -E 'stat::number_of_executed_units' "fuzz/$1.log" | awk '{print $2}') runs" \
    || { echo "$1: FAILED, see fuzz/$1.log and fuzz/artifacts/$1"; return 1; }
}
status=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run "${targets[i]}" & a=$!
  run "${targets[i+1]}" & b=$!
  wait $a || status=1
  wait $b || status=1
done
exit $status
