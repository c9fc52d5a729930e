"""TCP throughput between two cluster nodes, for tests/test_cluster.py: `srv ADDR PORT` receives
until the sender closes and prints Mbit/s; `cli ADDR PORT SECONDS` sends for that long."""
import socket
import sys
import time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "srv":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(1)
    s.settimeout(30)
    c, _ = s.accept()
    c.settimeout(30)
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        t0 = t0 or time.time()
        n += len(b)
    print(f"{n * 8 / (time.time() - t0) / 1e6:.1f}", flush=True)
else:
    c = socket.create_connection((host, port), timeout=10)
    buf, end = b"x" * (1 << 20), time.time() + float(sys.argv[4])
    while time.time() < end:
        c.sendall(buf)
    c.close()
