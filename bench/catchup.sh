#!/usr/bin/env bash
# `catchup` over 10,000 events: starts a fresh server pinned to core 0 (SERVER_CPU), runs
# examples/catchup_bench.rs pinned to core 1 (BENCH_CPU), prints its figures, stops the server.
# Environment: EVENTS (10000), ROUNDS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin parlor --example catchup_bench
data=$(mktemp -d)
log=$(mktemp)
taskset -c "${SERVER_CPU:-0}" target/release/parlor --listen 127.0.0.1:0 --data "$data" \
  --log-level warn --rate-limit 0 --query-rate 0 --max-edits 100000 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data" "$log"' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$log" && break; sleep 0.05; done
addr=$(sed -n 's/^parlor listening on //p' "$log")
taskset -c "${BENCH_CPU:-1}" target/release/examples/catchup_bench "$addr" "${EVENTS:-10000}" "${ROUNDS:-5}"
