#!/usr/bin/env python3
"""Echo flood (hardening issue, point 3): N sockets on /echo each send 16 MiB binary messages
in 1 MiB fragments, over and over, never reading. Starts BINARY on a free port with a temporary
data directory and SERVER_ARGS, samples its VmRSS for DURATION seconds, and prints the
baseline and peak RSS and the close codes from /metrics.

Usage: bench/echo-flood.py BINARY N DURATION [SERVER_ARGS...]
  e.g. bench/echo-flood.py target/release/parlor 80 20 --echo
       bench/echo-flood.py target/release/parlor 80 20 --echo --memory-budget 64MiB
"""
import shutil, socket, struct, subprocess, sys, threading, time, tempfile

binary, n, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
extra = sys.argv[4:]
data = tempfile.mkdtemp()
p = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data", data, "--log-level", "warn"] + extra,
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
line = p.stdout.readline().decode()
addr = line.strip().rsplit(" ", 1)[1]
host, port = addr.rsplit(":", 1)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) * 1024
base = rss()
FRAG = 1 << 20
chunk = b"\0" * FRAG
closes = {}
lock = threading.Lock()
def flood(i):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b: return
        head += b
    status = head.split(b" ")[1]
    if status != b"101":
        with lock: closes[b"http " + status] = closes.get(b"http " + status, 0) + 1
        return
    try:
        while True:
            for k in range(16):
                op = 0x2 if k == 0 else 0x0
                fin = 0x80 if k == 15 else 0
                s.sendall(bytes([fin | op, 0xff]) + struct.pack(">Q", FRAG) + b"\0\0\0\0")
                s.sendall(chunk)
    except OSError:
        pass
threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(n)]
t0 = time.time()
for t in threads: t.start()
peak = base
while time.time() - t0 < duration:
    r = rss(); peak = max(peak, r)
    time.sleep(0.1)
m = subprocess.run(["curl", "-s", f"http://{addr}/metrics"], capture_output=True, text=True).stdout
print(f"baseline RSS {base/2**20:.1f} MiB, peak RSS {peak/2**20:.1f} MiB over {duration}s with {n} flooders")
for l in m.splitlines():
    if l.startswith(("parlor_closes_sent_total{", "parlor_memory", "parlor_slow_consumer_drops_total ", "parlor_bytes_in_total ", "parlor_websocket_connections ")):
        print("  ", l)
print("  http refusals:", closes)
p.kill()
shutil.rmtree(data, ignore_errors=True)
