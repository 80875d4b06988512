#!/usr/bin/env bash
# Runs the Autobahn TestSuite cases 1.* to 10.* (kosoku runner) against Parlor's /echo and
# compares every verdict with expected-results.json. Cases 12-13 (permessage-deflate) are out.
# Usage: tests/autobahn/run.sh [--tls] [--write-expected]
#   --tls: the same cases over wss://. kosoku is built without TLS, so it talks to
#          tls_bridge.py, which forwards every byte over TLS to a Parlor started with a
#          certificate made here (openssl); the verdicts must be the same as over ws://.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
tls=0
write=()
for a in "$@"; do
  case "$a" in
    --tls) tls=1 ;;
    --write-expected) write=(--write) ;;
    *) echo "unknown argument $a"; exit 2 ;;
  esac
done
venv="$root/.venv-ab"
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kosoku==0.1.0
fi
cargo build --release --quiet
out="$(mktemp -d)"
data="$(mktemp -d)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$data"' EXIT
tls_args=()
if [ $tls = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -keyout "$data/key.pem" -out "$data/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost 2>/dev/null
  tls_args=(--tls-cert "$data/cert.pem" --tls-key "$data/key.pem")
fi
target/release/parlor --listen 127.0.0.1:0 --data "$data/chat" --log-level warn --echo \
  "${tls_args[@]}" >"$out/server.out" 2>"$out/server.err" &
pid=$!
pids+=($pid)
wait_line() { # FILE PREFIX: prints what follows PREFIX once the line appears
  for _ in $(seq 100); do
    grep -q "^$2" "$1" 2>/dev/null && break
    sleep 0.1
  done
  sed -n "s/^$2//p" "$1"
}
addr="$(wait_line "$out/server.out" 'parlor listening on ')"
[ -n "$addr" ] || { echo "server did not start"; cat "$out/server.err"; exit 1; }
scheme=ws
if [ $tls = 1 ]; then
  python3 tests/autobahn/tls_bridge.py "$addr" "$data/cert.pem" >"$out/bridge.out" 2>"$out/bridge.err" &
  pids+=($!)
  bridge="$(wait_line "$out/bridge.out" 'bridge listening on ')"
  [ -n "$bridge" ] || { echo "bridge did not start"; cat "$out/bridge.err"; exit 1; }
  echo "autobahn: over TLS, kosoku -> ws://$bridge (bridge) -> wss://$addr"
  addr="$bridge"
  scheme="wss via bridge"
fi
echo "autobahn: running cases 1-10 against $scheme $addr/echo (reports in $out/reports)"
set +e
timeout 900 "$venv/bin/kosoku" -p 1 -x '12.*' -x '13.*' -o "$out/reports" "ws://$addr/echo" >"$out/kosoku.log" 2>&1
rc=$?
set -e
tail -n 3 "$out/kosoku.log"
kill -0 $pid 2>/dev/null || { echo "server died during the run"; cat "$out/server.err"; exit 1; }
python3 tests/autobahn/check.py "$out/reports/index.json" tests/autobahn/expected-results.json "${write[@]}"
[ $rc -eq 0 ] || { echo "kosoku exited $rc"; exit $rc; }
