#!/usr/bin/env bash
# CI smoke check for parlor-bench: a fresh release server on a free port with a temporary data
# directory, every mode for ~2 s with small counts. Fails if a mode errors or (chat/broadcast)
# reports anything lost or duplicated. No timing assertions: CI machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bins --quiet
BIN="$CARGO_TARGET_DIR/release"

DATA=$(mktemp -d)
OUT=$(mktemp)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$DATA" "$OUT"
}
trap cleanup EXIT

# /echo is opt-in, and every mode connects from 127.0.0.1 (the connections mode alone opens 200).
extra=(--echo --max-connections-per-ip 0)
has_chat=0
if "$BIN/parlor" --help | grep -q -- '--rate-limit'; then
  extra+=(--rate-limit 0)
  has_chat=1
fi
"$BIN/parlor" --listen 127.0.0.1:0 --data "$DATA" --log-level warn "${extra[@]}" >"$OUT" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'listening on' "$OUT" && break; sleep 0.1; done
ADDR=$(sed -n 's/^parlor listening on //p' "$OUT")
[ -n "$ADDR" ] || { echo "server did not start"; exit 1; }
echo "server $ADDR (pid $SERVER_PID)"

B=("$BIN/parlor-bench")
common=(--duration 2 --warmup 0.5 --pid "$SERVER_PID" --json -q)
fail=0
run() {
  local name=$1; shift
  local line
  if ! line=$("${B[@]}" "$@"); then
    echo "FAIL $name: $line"; fail=1; return
  fi
  echo "ok   $name: $line"
}

run echo-small echo --url "ws://$ADDR/echo" -c 10 --size 20 --inflight 2 "${common[@]}"
run echo-16k echo --url "ws://$ADDR/echo" -c 4 --size 16384 "${common[@]}"
# Parlor has no /broadcast path: on /echo every publisher gets its own messages back, which
# drives the broadcast mode's whole send/receive/lost/duplicate path.
run broadcast broadcast --url "ws://$ADDR/echo" --own-only --subscribers 0 --publishers 4 --rate 0 --drain 2 --strict "${common[@]}"
run broadcast-rate broadcast --url "ws://$ADDR/echo" --own-only --subscribers 0 --publishers 2 --rate 200 --drain 2 --strict "${common[@]}"
if [ "$has_chat" = 1 ]; then
  run chat chat --url "ws://$ADDR/ws" --subscribers 20 --publishers 2 --rate 0 --room smoke --drain 3 --strict "${common[@]}"
  run chat-rate chat --url "ws://$ADDR/ws" --subscribers 20 --publishers 2 --rate 100 --room smoke --drain 3 --strict "${common[@]}"
  # The cluster code paths: connections spread over a URL list (here twice the same server),
  # 3 rooms, each receiver checked against the publishers of its own room.
  run chat-rooms chat --url "ws://$ADDR/ws,ws://$ADDR/ws" --subscribers 10 --publishers 3 --rooms 3 --rate 0 --room smoke --drain 3 --strict "${common[@]}"
else
  echo "skip chat: this server has no chat service yet (no --rate-limit flag)"
fi
run connections connections --url "ws://$ADDR/echo" -c 200 --hold 2 "${common[@]}"

# The bench must fail clearly when the target is down or refuses the upgrade.
if "${B[@]}" echo --url "ws://$ADDR/no-such-path" -c 1 --duration 1 -q >/dev/null 2>&1; then
  echo "FAIL: a refused upgrade did not make parlor-bench fail"; fail=1
else
  echo "ok   refused upgrade -> non-zero exit"
fi
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
if "${B[@]}" echo --url "ws://$ADDR/echo" -c 1 --duration 1 -q >/dev/null 2>&1; then
  echo "FAIL: a stopped server did not make parlor-bench fail"; fail=1
else
  echo "ok   server down -> non-zero exit"
fi

if [ "$fail" = 0 ]; then echo "bench smoke: all modes ran"; else echo "bench smoke: FAILED"; fi
exit "$fail"
