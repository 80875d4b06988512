#!/usr/bin/env bash
# Runs the Autobahn TestSuite cases 1.* to 10.* (kosoku runner) against Parlor's /echo and
# compares every verdict with expected-results.json. Cases 12-13 (permessage-deflate) are out.
# Usage: tests/autobahn/run.sh [--write-expected]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="$root/.venv-ab"
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kosoku==0.1.0
fi
cargo build --release --quiet
out="$(mktemp -d)"
data="$(mktemp -d)"
target/release/parlor --listen 127.0.0.1:0 --data "$data" --www "$root/www" --log-level warn --echo >"$out/server.out" 2>"$out/server.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  grep -q 'parlor listening on' "$out/server.out" 2>/dev/null && break
  sleep 0.1
done
addr="$(sed -n 's/^parlor listening on //p' "$out/server.out")"
[ -n "$addr" ] || { echo "server did not start"; cat "$out/server.err"; exit 1; }
echo "autobahn: running cases 1-10 against ws://$addr/echo (reports in $out/reports)"
set +e
timeout 900 "$venv/bin/kosoku" -p 1 -x '12.*' -x '13.*' -o "$out/reports" "ws://$addr/echo" >"$out/kosoku.log" 2>&1
rc=$?
set -e
tail -n 3 "$out/kosoku.log"
kill -0 $pid 2>/dev/null || { echo "server died during the run"; cat "$out/server.err"; exit 1; }
write=()
[ "${1:-}" = "--write-expected" ] && write=(--write)
python3 tests/autobahn/check.py "$out/reports/index.json" tests/autobahn/expected-results.json "${write[@]}"
[ $rc -eq 0 ] || { echo "kosoku exited $rc"; exit $rc; }
