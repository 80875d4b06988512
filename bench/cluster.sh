#!/usr/bin/env bash
# Cluster mode (issue #12) side by side, one run, one machine: a single node on SQLite
# (`parlor --data DIR`), 1 node on PostgreSQL and 3 nodes on PostgreSQL (`parlor --database
# URL`, each node on its own port; parlor-bench spreads its connections over them).
#
# Scenarios (SCENARIOS), each against freshly started nodes (and a freshly started PostgreSQL):
#   fanout-1000-at-100   1,000 subscribers + 1 publisher, 100 msg/s: deliveries/s, p50/p99, lost, dup
#   fanout-1000-at-1000  the same at 1,000 msg/s
#   accept-1room         ACCEPT_PUBLISHERS (30) publishers, no subscribers, one room, --rate 0:
#                        accepted messages/s (acks in the window). Each publisher keeps at most
#                        ACCEPT_INFLIGHT (32) messages in flight, a message leaving the window
#                        when every member has it and its ack came (in either order), so no
#                        queue (fan-out or commit) grows without bound; 30 × 32 = 960 messages
#                        outstanding give every node a batch per turn
#   accept-100rooms      100 publishers in 100 rooms (--rooms 100; each its own room), --rate 0
# With 3 nodes, connection i goes to node i % 3 (publishers and subscribers alike).
#
# Pinning: all nodes and PostgreSQL share SERVER_CPU (0), parlor-bench runs alone on BENCH_CPU
# (1). On this 2-core machine the bench needs a core of its own (1,000,000 deliveries/s keep it
# busy), and giving every configuration the same one core for the whole server side makes the
# rows comparable: the table says what the cluster machinery costs per message on equal
# hardware, not what more cores would buy (more nodes on one core only add overhead; the
# per-message CPU of nodes and PostgreSQL is what to scale from). Override with SERVER_CPU /
# PG_CPU / BENCH_CPU (taskset CPU lists, e.g. SERVER_CPU=0-1).
#
# PostgreSQL: a throwaway cluster per configuration under a temp dir (initdb as the `postgres`
# OS user via runuser when run as root; trust auth, user postgres), started with
# `-c synchronous_commit=on` (an ack means committed and flushed) plus PG_OPTS, on a free port,
# socket in the temp dir; accounts are created once per configuration (token cache per
# configuration), and each run starts it again on the same data (pg_ctl start/stop), so its CPU
# is measured from a fresh postmaster. Its CPU in the measurement window comes from
# parlor-bench --db-pid (postmaster + backends, exited ones through cutime/cstime). Everything
# is stopped and removed at the end, on error and on Ctrl-C.
#
# Server flags: --rate-limit 0 --max-connections-per-ip 0 --auth-timeout 600 --query-rate 0
# --argon2-memory 64 --argon2-iterations 1 (bench accounts only: cheap hashes).
#
# Environment: ROUNDS (3; configurations interleaved within each round), DURATION (10 s),
# WARMUP (1 s), CONFIGS ("sqlite pg1 pg3"), SCENARIOS (all four), OUT_DIR
# (target/cluster-results: raw JSON, one file per run, and node logs), ACCEPT_PUBLISHERS (30),
# ACCEPT_INFLIGHT (32), PG_BIN (newest /usr/lib/postgresql/*/bin), PG_OPTS (extra postgres
# arguments, e.g. "-c shared_buffers=256MB"), SERVER_CPU (0), PG_CPU (SERVER_CPU), BENCH_CPU (1).
#
#   bench/cluster.sh                                   # the full comparison
#   ROUNDS=1 DURATION=3 CONFIGS=sqlite bench/cluster.sh
#   bench/cluster.sh --pg-check                        # start a throwaway PostgreSQL, select 1, stop
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
CONFIGS=${CONFIGS:-"sqlite pg1 pg3"}
SCENARIOS=${SCENARIOS:-"fanout-1000-at-100 fanout-1000-at-1000 accept-1room accept-100rooms"}
OUT_DIR=${OUT_DIR:-$CARGO_TARGET_DIR/cluster-results}
ACCEPT_PUBLISHERS=${ACCEPT_PUBLISHERS:-30}
ACCEPT_INFLIGHT=${ACCEPT_INFLIGHT:-32}
SERVER_CPU=${SERVER_CPU:-0}
PG_CPU=${PG_CPU:-$SERVER_CPU}
BENCH_CPU=${BENCH_CPU:-1}
PG_OPTS=${PG_OPTS:-}
if [ -z "${PG_BIN:-}" ]; then
  PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi

WORK=$(mktemp -d /tmp/parlor-cluster.XXXXXX)
chmod 755 "$WORK"
NODE_PIDS=()
PG_RUNNING=()   # data directories of started PostgreSQL clusters
stop_nodes() {
  local p
  for p in "${NODE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${NODE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  NODE_PIDS=()
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_nodes
  local d
  for d in "${PG_RUNNING[@]}"; do pg_stop "$d"; done
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# as_pg CMD...: runs CMD as the postgres OS user when we are root (initdb and postgres refuse
# to run as root), as ourselves otherwise.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# pg_init NAME: a new PostgreSQL cluster in $WORK/pg-NAME (not started); sets PG_DIR.
pg_init() {
  [ -x "$PG_BIN/initdb" ] || { echo "no PostgreSQL binaries in '$PG_BIN' (set PG_BIN)" >&2; exit 1; }
  PG_DIR=$WORK/pg-$1
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$PG_DIR"
  as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-sync \
    >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
  free_port >"$PG_DIR/port"
}

# pg_start DIR: starts the cluster in DIR pinned to PG_CPU; sets PG_URL, PG_PID (postmaster).
pg_start() {
  local dir=$1 port
  port=$(cat "$dir/port")
  # shellcheck disable=SC2086
  as_pg taskset -c "$PG_CPU" "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c synchronous_commit=on $PG_OPTS" \
    start >/dev/null || { tail -n 20 "$dir/postgres.log" >&2; exit 1; }
  PG_RUNNING+=("$dir")
  PG_PID=$(head -n 1 "$dir/data/postmaster.pid")
  PG_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

pg_stop() {
  local dir=$1 d keep=()
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" stop -m fast -w >/dev/null 2>&1 || true
  for d in "${PG_RUNNING[@]}"; do [ "$d" = "$dir" ] || keep+=("$d"); done
  PG_RUNNING=("${keep[@]}")
}

pg_sql() {
  local dir=$1; shift
  as_pg "$PG_BIN/psql" -h "$dir" -p "$(cat "$dir/port")" -U postgres -d postgres -XAtq -c "$@"
}

if [ "${1:-}" = "--pg-check" ]; then
  pg_init check
  pg_start "$PG_DIR"
  echo "PostgreSQL up: $PG_URL (postmaster $PG_PID, pinned to $(taskset -pc "$PG_PID" | sed 's/.*: //'))"
  echo "select 1 -> $(pg_sql "$PG_DIR" 'select 1')"
  echo "synchronous_commit -> $(pg_sql "$PG_DIR" 'show synchronous_commit')"
  pg_stop "$PG_DIR"
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then echo "FAIL: still running" >&2; exit 1; fi
  echo "stopped; $WORK is removed on exit"
  exit 0
fi

echo "== build" >&2
cargo build --release --bins --quiet
BIN=$CARGO_TARGET_DIR/release
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json "$OUT_DIR"/*.log

NODE_FLAGS=(--log-level warn --rate-limit 0 --max-connections-per-ip 0 --auth-timeout 600
  --query-rate 0 --argon2-memory 64 --argon2-iterations 1 --max-connections 20000)

nodes_of() {
  case $1 in sqlite|pg1) echo 1 ;; pg3) echo 3 ;; *) echo "unknown configuration $1" >&2; exit 1 ;; esac
}

# start_config CONFIG: PostgreSQL if needed, then the nodes; sets URLS (comma-separated /ws
# URLs), PIDS (comma-separated node PIDs), DB_PID (postmaster or empty).
start_config() {
  local c=$1 i n log store=()
  n=$(nodes_of "$c")
  DB_PID=""
  if [ "$c" != sqlite ]; then
    pg_start "$WORK/pg-$c"
    DB_PID=$PG_PID
  fi
  URLS="" PIDS=""
  for i in $(seq "$n"); do
    log=$WORK/$c-node$i.log
    : >"$log"
    if [ "$c" = sqlite ]; then
      store=(--data "$WORK/$c/data")
    else
      # Each node its own --data directory, though on PostgreSQL it keeps no chat data there.
      store=(--database "$PG_URL" --data "$WORK/$c/node$i")
    fi
    taskset -c "$SERVER_CPU" "$BIN/parlor" --listen 127.0.0.1:0 "${store[@]}" "${NODE_FLAGS[@]}" \
      >"$log" 2>&1 &
    NODE_PIDS+=($!)
    for _ in $(seq 600); do grep -q 'listening on' "$log" && break; kill -0 "${NODE_PIDS[-1]}" 2>/dev/null || break; sleep 0.05; done
    if ! grep -q 'listening on' "$log"; then
      echo "node $i of $c did not start:" >&2; tail -n 20 "$log" >&2; exit 1
    fi
    URLS+="${URLS:+,}ws://$(sed -n 's/^parlor listening on //p' "$log")/ws"
    PIDS+="${PIDS:+,}${NODE_PIDS[-1]}"
  done
  sleep 0.3
}

stop_config() {
  local c=$1
  stop_nodes
  cat "$WORK/$c"-node*.log >>"$OUT_DIR/$c.nodes.log" 2>/dev/null || true
  if [ "$c" != sqlite ]; then pg_stop "$WORK/pg-$c"; fi
}

# args_for SCENARIO CONFIG: sets ARGS (who connects where: URLs, accounts, rooms, CPU
# accounting) and LOAD (the publishing rate and window).
args_for() {
  local s=$1 c=$2
  ARGS=(chat --url "$URLS" --pid "$PIDS" --tokens "$WORK/$c/tokens" --json -q)
  if [ -n "$DB_PID" ]; then ARGS+=(--db-pid "$DB_PID"); fi
  case $s in
    fanout-1000-at-100|fanout-1000-at-1000)
      ARGS+=(--room bench --user-prefix bench --subscribers 1000 --publishers 1)
      LOAD=(--rate "${s##*-at-}") ;;
    accept-1room)
      ARGS+=(--room acc --user-prefix acc --subscribers 0 --publishers "$ACCEPT_PUBLISHERS")
      LOAD=(--rate 0 --max-inflight "$ACCEPT_INFLIGHT") ;;
    accept-100rooms)
      ARGS+=(--room accr --user-prefix accr --subscribers 0 --publishers 100 --rooms 100)
      LOAD=(--rate 0 --max-inflight "$ACCEPT_INFLIGHT") ;;
    *) echo "unknown scenario $s" >&2; exit 1 ;;
  esac
}

# Per configuration: its store (and PostgreSQL cluster), and the bench accounts, created once
# (each scenario's set through the nodes, so the token cache holds them all).
for c in $CONFIGS; do
  echo "== $c: store and bench accounts (once)" >&2
  mkdir -p "$WORK/$c"
  [ "$c" = sqlite ] || pg_init "$c"
  start_config "$c"
  for s in $SCENARIOS; do
    args_for "$s" "$c"
    taskset -c "$BENCH_CPU" "$BIN/parlor-bench" "${ARGS[@]}" --rate 10 --duration 0.5 --warmup 0 \
      --drain 1 >/dev/null || { echo "account setup for $s on $c failed" >&2; exit 1; }
  done
  if [ "$c" != sqlite ]; then
    tables=$(pg_sql "$WORK/pg-$c" "select count(*) from information_schema.tables where table_schema not in ('pg_catalog', 'information_schema')")
    if [ "$tables" = 0 ]; then
      echo "$c: PostgreSQL has no tables after the account setup: this parlor build does not" \
        "use --database yet (PostgreSQL store not merged?)" >&2
      exit 1
    fi
  fi
  stop_config "$c"
done

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SCENARIOS; do
  for r in $(seq "$ROUNDS"); do
    for c in $CONFIGS; do
      start_config "$c"
      args_for "$s" "$c"
      out="$OUT_DIR/$s.$c.$r.json"
      echo "== $s round $r: $c ($URLS)" >&2
      if ! taskset -c "$BENCH_CPU" "$BIN/parlor-bench" "${ARGS[@]}" "${LOAD[@]}" \
        --duration "$DURATION" --warmup "$WARMUP" >"$out"; then
        echo "   FAILED (see $out)" >&2
      fi
      tail -c 300 "$out" >&2 || true
      stop_config "$c"
    done
  done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$OUT_DIR" "$CONFIGS" "$LOAD_START" "$LOAD_END" "$SERVER_CPU" "$PG_CPU" "$BENCH_CPU" <<'PY'
import glob, json, os, statistics, sys
out_dir, configs = sys.argv[1], sys.argv[2].split()
load_start, load_end, server_cpu, pg_cpu, bench_cpu = sys.argv[3:8]
res = {}
for f in glob.glob(os.path.join(out_dir, "*.json")):
    s, c, r, _ = os.path.basename(f).rsplit(".", 3)
    try:
        v = json.loads(open(f).read().strip().splitlines()[-1])
    except Exception:
        continue
    if "error" in v:
        continue
    res.setdefault((s, c), []).append(v)

def pct(key):
    return lambda v: None if v.get(key) is None else 100.0 * v[key] / max(v["seconds"], 1e-9)

# (label, value of one run, format, aggregate)
fan = [
    ("deliveries/s", lambda v: v["deliveries_per_sec"], "{:,.0f}", "median"),
    ("p50 ms", lambda v: v["p50_us"] / 1000, "{:,.2f}", "median"),
    ("p99 ms", lambda v: v["p99_us"] / 1000, "{:,.2f}", "median"),
    ("lost (max)", lambda v: v["lost"], "{:,.0f}", "max"),
    ("duplicated (max)", lambda v: v["duplicated"], "{:,.0f}", "max"),
    ("node CPU % (all nodes)", pct("server_cpu_secs"), "{:,.0f}", "median"),
    ("PostgreSQL CPU %", pct("db_cpu_secs"), "{:,.0f}", "median"),
    ("node ns/delivery", lambda v: v.get("server_ns_per_delivery"), "{:,.0f}", "median"),
    ("PostgreSQL ns/delivery", lambda v: v.get("db_ns_per_delivery"), "{:,.0f}", "median"),
    ("node µs/message", lambda v: v.get("server_ns_per_ack") and v["server_ns_per_ack"] / 1000, "{:,.1f}", "median"),
    ("PostgreSQL µs/message", lambda v: v.get("db_ns_per_ack") and v["db_ns_per_ack"] / 1000, "{:,.1f}", "median"),
]
acc = [
    ("accepted msg/s (acks)", lambda v: v["acked_per_sec"], "{:,.0f}", "median"),
    ("deliveries/s", lambda v: v["deliveries_per_sec"], "{:,.0f}", "median"),
    ("p99 ms (delivery)", lambda v: v["p99_us"] / 1000, "{:,.2f}", "median"),
    ("lost (max)", lambda v: v["lost"], "{:,.0f}", "max"),
    ("duplicated (max)", lambda v: v["duplicated"], "{:,.0f}", "max"),
    ("node CPU % (all nodes)", pct("server_cpu_secs"), "{:,.0f}", "median"),
    ("PostgreSQL CPU %", pct("db_cpu_secs"), "{:,.0f}", "median"),
    ("node µs/accepted", lambda v: v.get("server_ns_per_ack") and v["server_ns_per_ack"] / 1000, "{:,.1f}", "median"),
    ("PostgreSQL µs/accepted", lambda v: v.get("db_ns_per_ack") and v["db_ns_per_ack"] / 1000, "{:,.1f}", "median"),
]
order = ["fanout-1000-at-100", "fanout-1000-at-1000", "accept-1room", "accept-100rooms"]
names = {"sqlite": "1 node, SQLite", "pg1": "1 node, PostgreSQL", "pg3": "3 nodes, PostgreSQL"}
hdr = ["scenario", "metric"] + [names.get(c, c) for c in configs]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
def agg(vals, f, how):
    xs = [x for x in (f(v) for v in vals) if x is not None]
    if not xs:
        return None
    return max(xs) if how == "max" else statistics.median(xs)
for s in order + sorted({s for s, _ in res} - set(order)):
    if not any((s, c) in res for c in configs):
        continue
    for label, f, fmt, how in (fan if s.startswith("fanout") else acc):
        row = [s, label]
        for c in configs:
            vals = res.get((s, c), [])
            x = agg(vals, f, how)
            row.append("–" if x is None else fmt.format(x) + (f" (n={len(vals)})" if len(vals) == 1 and how != "max" else ""))
        print("| " + " | ".join(row) + " |")

def get(s, c, f):
    return agg(res.get((s, c), []), f, "median")
notes = []
p99 = get("fanout-1000-at-100", "pg3", lambda v: v["p99_us"] / 1000)
if p99 is not None:
    notes.append(f"target p99 < 25 ms at 100 msg/s on 3 nodes: {p99:.2f} ms, {'met' if p99 < 25 else 'NOT met'}")
a1 = get("accept-1room", "pg3", lambda v: v["acked_per_sec"])
if a1 is not None:
    notes.append(f"target ≥ 5,000 accepted msg/s into one room on 3 nodes: {a1:,.0f}/s, {'met' if a1 >= 5000 else 'NOT met'}")
bad = [(s, c) for (s, c), vs in res.items() for v in vs if v["lost"] or v["duplicated"] or v.get("publish_errors")]
notes.append("lost/duplicated/publish errors: " + ("none in any run" if not bad else "in " + ", ".join(f"{s} on {c}" for s, c in sorted(set(bad)))))
bench_max = max((v.get("bench_cpu_pct", 0) for vs in res.values() for v in vs), default=0)
rounds = max((len(v) for v in res.values()), default=0)
print()
for n in notes:
    print(f"- {n}")
print(f"\nmedian of {rounds} rounds (lost/duplicated: the worst run); nodes on CPU {server_cpu}, PostgreSQL on CPU {pg_cpu}, "
      f"parlor-bench on CPU {bench_cpu}; CPU % is of one core over the window (node: all nodes summed; PostgreSQL: "
      f"postmaster and backends); per message = per accepted message (ack); highest bench CPU in any run: {bench_max:.0f}% "
      f"of a core; load average at start {load_start}, at end {load_end}.")
PY
