"""The status child under a slowloris crowd (issue 18): CROWD connections trickle a request
head they never finish, one byte a second, reconnecting when cut off, while a scraper GETs
/metrics every 0.2 s. Prints how many scrapes were served. Usage:
http_slowloris.py [SECONDS=15] [CROWD=300]   (before the full-house rule: 0 of 58; after: 59 of 59)
"""
import os, socket, sys, threading, time
from common import start

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
crowd = int(sys.argv[2]) if len(sys.argv) > 2 else 300

probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]; probe.close()
token = "slowloris-token-0123456789abcdef"
d0 = os.environ.get("TMPDIR", "/tmp")
token_file = f"{d0}/jobhost-slowloris-{os.getpid()}.token"
with open(token_file, "w") as f:
    f.write(token + "\n")
os.chmod(token_file, 0o600)
master, d, _ = start(f'\n[admin]\nsocket = "admin.sock"\ntoken_file = "{token_file}"\nhttp = "127.0.0.1:{port}"\n',
                     '[[pool]]\nname = "echo"\nplugin = "echo"\n')

def get_metrics():
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
        head = s.recv(64)
        s.close()
        return head.startswith(b"HTTP/1.1 200")
    except OSError:
        return False

# The child takes a moment to start after the master.
t0 = time.time()
while not get_metrics():
    time.sleep(0.1); assert time.time() - t0 < 20, "the http child never answered"

stop = time.time() + secs
def trickle():
    while time.time() < stop:
        try:
            s = socket.create_connection(("127.0.0.1", port)); s.sendall(b"GET / HTTP/1.1\r\n")
            while time.time() < stop:
                s.sendall(b"X"); time.sleep(1)
        except OSError:
            time.sleep(0.01)
for _ in range(crowd):
    threading.Thread(target=trickle, daemon=True).start()
time.sleep(1)
ok = bad = 0
while time.time() < stop - 0.5:
    if get_metrics(): ok += 1
    else: bad += 1
    time.sleep(0.2)
print(f"{ok} of {ok + bad} scrapes served under {crowd} trickling connections")
master.terminate(); master.wait(); os.unlink(token_file)
