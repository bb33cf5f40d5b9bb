# 500 connections each send one byte a second of a frame; how many are open after 40 s.
import socket, time, sys
from common import *
p, d, sock = start("", '[[pool]]\nname = "e"\nplugin = "echo"\n')
frame = submit(1, "e", b"x" * 100)
conns = [socket.socket(socket.AF_UNIX) for _ in range(500)]
for c in conns: c.connect(sock); c.setblocking(False)
t0 = time.time(); pos = 0; closed = set()
while time.time() - t0 < 40:
    for i, c in enumerate(conns):
        if i in closed: continue
        try:
            if c.recv(1) == b"": closed.add(i); continue
        except BlockingIOError: pass
        except OSError: closed.add(i); continue
        try: c.send(frame[pos % len(frame):pos % len(frame) + 1])
        except OSError: closed.add(i)
    pos += 1; time.sleep(1)
print(f"slowloris: {len(closed)} of 500 closed after 40 s; master RSS {rss(p.pid)} MiB")
print(open(d + "/log").read().count("read_timeout"), "log lines about read_timeout:")
print("\n".join(l for l in open(d + "/log").read().splitlines() if "read_timeout" in l))
p.terminate(); p.wait()
