#!/usr/bin/env bash
# Parlor vs the reference peers (uWebSockets, tokio-tungstenite, Node ws), same machine, same run.
#
# Builds everything (release), then for every scenario runs ROUNDS rounds, each round running
# Parlor and both peers one after the other (interleaved), each on a freshly started server
# pinned to core 0 while parlor-bench runs pinned to core 1. Prints a markdown table of medians
# and ratios; raw JSON results are kept in $OUT_DIR.
#
# Environment: ROUNDS (3), DURATION (10 s per run), WARMUP (1 s), IDLE_CONNS (10000),
# TARGETS ("parlor tokio-tungstenite node-ws"), SCENARIOS (all), OUT_DIR (target/bench-results),
# SERVER_CPU (0), BENCH_CPU (1), OLD_BIN (a second parlor binary, the target `parlor-old`, for
# A/B runs of a change: e.g. TARGETS="parlor parlor-old" OLD_BIN=/path/to/old/parlor), and the
# target `parlor-tls` (Parlor with --tls-cert on a certificate made here, over wss://: e.g.
# TARGETS="parlor parlor-tls" SCENARIOS="echo-100x20B fanout-1000-max"), and the target `uws`: an
# external uWebSockets peer named by UWS_BIN (built outside the repository, never by this script;
# docs/BENCHMARKS.md says what it does and how it was built), run as `$UWS_BIN PORT`, serving
# /broadcast (publish to one topic every connection subscribes to) and echo on every other path:
# e.g. TARGETS="parlor uws tokio-tungstenite" UWS_BIN=/work/peer-uws/peer; `uws-170` is the same
# peer with 170-byte message texts in the fan-out scenarios (a chat frame's size). PARLOR_BIN runs another
# parlor binary as the target `parlor` (parlor-bench is still this tree's); SKIP_BUILD=1 skips
# the build (for A/B runs of saved binaries while the tree changes).
# See docs/BENCHMARKS.md for the method.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
TARGETS=${TARGETS:-"parlor tokio-tungstenite node-ws"}
SCENARIOS=${SCENARIOS:-"echo-100x20B echo-100x16KiB echo-10x16inflight fanout-1000-max fanout-1000-max-w128 fanout-100x10-max fanout-1000-at-100 fanout-1000-at-500 fanout-1000-at-1000 idle-memory"}
OUT_DIR=${OUT_DIR:-$CARGO_TARGET_DIR/bench-results}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
PEERS_SRC=${PEERS_SRC:-$ROOT/../shared/peers}
PEERS=$CARGO_TARGET_DIR/peers

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "== build" >&2
  cargo build --release --bins --quiet
fi
BIN=$CARGO_TARGET_DIR/release
if [[ " $TARGETS " == *" tokio-tungstenite "* ]]; then
  cargo build --release --locked --quiet --manifest-path "$PEERS_SRC/tokio-tungstenite/Cargo.toml" --target-dir "$PEERS"
fi
if [[ " $TARGETS " == *" node-ws "* ]]; then
  mkdir -p "$PEERS"
  if [ ! -d "$PEERS/node-ws/node_modules" ]; then
    cp -r "$PEERS_SRC/node-ws" "$PEERS/"
    (cd "$PEERS/node-ws" && npm install --silent >&2)
  fi
fi

if [[ " $TARGETS " == *" uws "* || " $TARGETS " == *" uws-170 "* ]]; then
  : "${UWS_BIN:?the target uws needs UWS_BIN, the path of a uWebSockets peer binary built outside the repository (see docs/BENCHMARKS.md)}"
  [ -x "$UWS_BIN" ] || { echo "UWS_BIN=$UWS_BIN is not an executable file" >&2; exit 1; }
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json
DATA=$(mktemp -d)
SERVER_PID=""
SERVER_LOG=$(mktemp)
cleanup() {
  stop_server
  rm -rf "$DATA" "$SERVER_LOG"
}
trap cleanup EXIT

HAS_CHAT=0
if "${PARLOR_BIN:-$BIN/parlor}" --help | grep -q -- '--rate-limit'; then HAS_CHAT=1; fi

stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}

# start_server TARGET: starts it pinned, sets SERVER_PID and BASE (ws://host:port).
start_server() {
  local t=$1 port
  : >"$SERVER_LOG"
  case $t in
    parlor|parlor-old|parlor-tls)
      # /echo is opt-in; every client is 127.0.0.1 (idle-memory opens $IDLE_CONNS). Creating
      # the 1001 bench accounts keeps sockets waiting for argon2 (one hash at a time, ~20 s in
      # all) longer than --auth-timeout lets a real client wait.
      local extra=(--echo --max-connections-per-ip 0) exe=${PARLOR_BIN:-$BIN/parlor}
      if "$exe" --help | grep -q -- '--auth-timeout'; then extra+=(--auth-timeout 600); fi
      [ "$t" = parlor-old ] && exe=${OLD_BIN:?OLD_BIN must name the other parlor binary}
      [ "$HAS_CHAT" = 1 ] && extra+=(--rate-limit 0)
      [ "$t" = parlor-tls ] && extra+=(--tls-cert "$DATA/cert.pem" --tls-key "$DATA/key.pem")
      taskset -c "$SERVER_CPU" "$exe" --listen 127.0.0.1:0 --data "${DATA_OVERRIDE:-$(data_of "$t")}" \
        --log-level warn --max-connections $((IDLE_CONNS + 1000)) "${extra[@]}" >"$SERVER_LOG" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 300); do grep -q 'listening on' "$SERVER_LOG" && break; sleep 0.05; done
      BASE="ws://$(sed -n 's/^parlor listening on //p' "$SERVER_LOG")"
      # The certificate names localhost; the bench checks it against --tls-ca.
      [ "$t" = parlor-tls ] && BASE="wss://localhost:${BASE##*:}"
      ;;
    tokio-tungstenite)
      port=19101
      taskset -c "$SERVER_CPU" "$PEERS/release/peer-tokio-tungstenite" $port >"$SERVER_LOG" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 300); do grep -q 'listening' "$SERVER_LOG" && break; sleep 0.05; done
      BASE="ws://127.0.0.1:$port"
      ;;
    uws|uws-170)
      port=19103
      taskset -c "$SERVER_CPU" "$UWS_BIN" $port >"$SERVER_LOG" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 300); do grep -q 'listening' "$SERVER_LOG" && break; sleep 0.05; done
      BASE="ws://127.0.0.1:$port"
      ;;
    node-ws)
      port=19102
      taskset -c "$SERVER_CPU" node "$PEERS/node-ws/server.js" $port >"$SERVER_LOG" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 300); do grep -q 'listening' "$SERVER_LOG" && break; sleep 0.05; done
      BASE="ws://127.0.0.1:$port"
      ;;
  esac
  sleep 0.3
}

# data_of TARGET: a parlor target's data directory. parlor-old gets its own: an older binary
# refuses a store the newer one migrated. parlor-tls shares parlor's (same binary).
data_of() {
  case $1 in
    parlor-old) echo "$DATA/parlor-old" ;;
    *) echo "$DATA/parlor" ;;
  esac
}

# args_for SCENARIO TARGET: prints the parlor-bench arguments, or nothing if not applicable.
args_for() {
  local s=$1 t=$2 fan
  local common="--duration $DURATION --warmup $WARMUP --pid $SERVER_PID --json -q"
  [ "$t" = parlor-tls ] && common="$common --tls-ca $DATA/cert.pem"
  if [ "$t" = uws-170 ]; then
    # uWebSockets with message texts padded to 170 bytes, about the size of a chat `message`
    # frame, so the bytes per delivery match Parlor's; fan-out scenarios only.
    [[ $s == fanout-* ]] || return 0
    common="$common --size 170"
  fi
  if [[ $t == parlor* ]]; then
    [ "$HAS_CHAT" = 1 ] || fan=""
    [ "$HAS_CHAT" = 1 ] && fan="chat --url $BASE/ws --room bench --tokens $(data_of "$t")/bench-tokens.txt"
  else
    fan="broadcast --url $BASE/broadcast"
  fi
  case $s in
    echo-100x20B) echo "echo --url $BASE/echo -c 100 --size 20 --inflight 1 $common" ;;
    echo-100x16KiB) echo "echo --url $BASE/echo -c 100 --size 16384 --inflight 1 $common" ;;
    echo-10x16inflight) echo "echo --url $BASE/echo -c 10 --size 20 --inflight 16 $common" ;;
    fanout-1000-max) [ -n "$fan" ] && echo "$fan --subscribers 1000 --publishers 1 --rate 0 $common" ;;
    # The same with 128 messages in flight: tokio-tungstenite's best window in our runs.
    fanout-1000-max-w128) [ -n "$fan" ] && echo "$fan --subscribers 1000 --publishers 1 --rate 0 --max-inflight 128 $common" ;;
    fanout-100x10-max) [ -n "$fan" ] && echo "$fan --subscribers 100 --publishers 10 --rate 0 $common" ;;
    fanout-1000-at-100) [ -n "$fan" ] && echo "$fan --subscribers 1000 --publishers 1 --rate 100 $common" ;;
    # Half the rate of the row below, to see where a server's core saturates: on the 2-core
    # machine of 2026-12-01 every server already ran its core at 100 % here (BENCHMARKS.md).
    fanout-1000-at-500) [ -n "$fan" ] && echo "$fan --subscribers 1000 --publishers 1 --rate 500 $common" ;;
    fanout-1000-at-1000) [ -n "$fan" ] && echo "$fan --subscribers 1000 --publishers 1 --rate 1000 $common" ;;
    idle-memory) echo "connections --url $BASE/echo -c $IDLE_CONNS --hold 5 --pid $SERVER_PID --json -q" ;;
  esac
  return 0
}

for t in parlor parlor-old; do
  if [ "$HAS_CHAT" = 1 ] && [[ " $TARGETS " == *" $t "* ]] && [[ " $SCENARIOS " == *" fanout-"* ]]; then
    # Create the 1001 bench accounts once (argon2 per account), so measured runs resume sessions.
    echo "== $t: creating bench accounts (once)" >&2
    start_server "$t"
    taskset -c "$BENCH_CPU" "$BIN/parlor-bench" chat --url "$BASE/ws" --room bench \
      --tokens "$(data_of "$t")/bench-tokens.txt" \
      --subscribers 1000 --publishers 10 --rate 10 --duration 1 --warmup 0 -q >/dev/null
    stop_server
  fi
done

if [[ " $TARGETS " == *" parlor-tls "* ]]; then
  # P-256, not a CA (webpki refuses a CA certificate as the server's own).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$DATA/key.pem" -out "$DATA/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE 2>/dev/null
fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SCENARIOS; do
  for r in $(seq "$ROUNDS"); do
    for t in $TARGETS; do
      # Idle memory is measured on a fresh store: after the fan-out runs the shared one holds
      # hundreds of thousands of messages, and the heap that loading them freed would absorb
      # the connections (0.00 KiB per connection).
      DATA_OVERRIDE=""
      [ "$s" = idle-memory ] && DATA_OVERRIDE=$(mktemp -d -p "$DATA")
      start_server "$t"
      args=$(args_for "$s" "$t")
      if [ -z "$args" ]; then stop_server; continue; fi
      out="$OUT_DIR/$s.$t.$r.json"
      echo "== $s round $r: $t" >&2
      # shellcheck disable=SC2086
      if ! taskset -c "$BENCH_CPU" "$BIN/parlor-bench" $args >"$out"; then
        echo "   FAILED (see $out)" >&2
      fi
      tail -c 400 "$out" >&2 || true
      stop_server
    done
  done
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$OUT_DIR" "$TARGETS" "$LOAD_START" "$LOAD_END" <<'PY'
import glob, json, os, statistics, sys
out_dir, targets = sys.argv[1], sys.argv[2].split()
load_start, load_end = sys.argv[3], sys.argv[4]
res = {}
for f in glob.glob(os.path.join(out_dir, "*.json")):
    s, t, r, _ = os.path.basename(f).rsplit(".", 3)
    try:
        line = open(f).read().strip().splitlines()[-1]
        v = json.loads(line)
    except Exception:
        continue
    if "error" in v:
        continue
    if v.get("server_cpu_secs") is not None and v.get("seconds"):
        v["server_cpu_pct"] = 100.0 * v["server_cpu_secs"] / v["seconds"]
    res.setdefault((s, t), []).append(v)

metrics = {
    "echo": [("msgs_per_sec", "msg/s", "{:,.0f}", True), ("p99_us", "p99 µs", "{:,.0f}", False),
             ("server_ns_per_msg", "server ns/msg", "{:,.0f}", False),
             ("server_cpu_pct", "server CPU %", "{:,.0f}", False), ("bench_cpu_pct", "bench CPU %", "{:,.0f}", False)],
    "fanout": [("deliveries_per_sec", "deliveries/s", "{:,.0f}", True), ("p50_us", "p50 µs", "{:,.0f}", False), ("p99_us", "p99 µs", "{:,.0f}", False),
               ("server_ns_per_delivery", "server ns/delivery", "{:,.0f}", False),
               ("server_cpu_pct", "server CPU %", "{:,.0f}", False), ("bench_cpu_pct", "bench CPU %", "{:,.0f}", False),
               ("lost", "lost (max)", "{:,.0f}", False)],
    "idle": [("kib_per_conn", "KiB/conn", "{:,.2f}", False), ("still_open", "still open (min)", "{:,.0f}", True)],
}
order = ["echo-100x20B", "echo-100x16KiB", "echo-10x16inflight", "fanout-1000-max", "fanout-1000-max-w128", "fanout-100x10-max", "fanout-1000-at-100",
         "fanout-1000-at-500", "fanout-1000-at-1000", "idle-memory"]
names = {"parlor": "Parlor", "parlor-old": "Parlor (old)", "parlor-tls": "Parlor TLS", "uws": "uWebSockets", "uws-170": "uWebSockets 170 B", "tokio-tungstenite": "tokio-tungstenite", "node-ws": "Node ws"}
peers = [t for t in targets if t != "parlor"]
hdr = ["scenario", "metric"] + [names.get(t, t) for t in targets]
if "parlor" in targets:
    hdr += [f"Parlor ÷ {names.get(p, p)}" for p in peers]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
def agg(vals, key):
    xs = [v.get(key) for v in vals if v.get(key) is not None]
    if not xs:
        return None
    if key == "lost":
        return max(xs)
    if key == "still_open":
        return min(xs)
    return statistics.median(xs)
for s in order:
    kind = "echo" if s.startswith("echo") else "fanout" if s.startswith("fanout") else "idle"
    if not any((s, t) in res for t in targets):
        continue
    for key, label, fmt, _higher in metrics[kind]:
        row = [s, label]
        vals = {t: agg(res.get((s, t), []), key) for t in targets}
        for t in targets:
            n = len(res.get((s, t), []))
            row.append("–" if vals[t] is None else fmt.format(vals[t]) + ("" if n > 1 or key in ("lost", "still_open") else f" (n={n})"))
        if "parlor" in targets:
            for p in peers:
                a, b = vals.get("parlor"), vals.get(p)
                row.append(f"{a / b:.3g}×" if a is not None and b and key not in ("lost", "still_open") else "–")
        print("| " + " | ".join(row) + " |")
bench_max = max((v.get("bench_cpu_pct", 0) for vs in res.values() for v in vs), default=0)
print(f"\nmedian of {max((len(v) for v in res.values()), default=0)} rounds; fan-out rows: Parlor runs `chat` on /ws "
      f"(real chat work), peers run raw `broadcast`; highest bench CPU in any run: {bench_max:.0f}% of a core; "
      f"load average at start {load_start}, at end {load_end} (above ~2 on 2 cores: other work shared the machine).")
PY
