# 40 clients announce a (16 MiB + 1035)-byte SUBMIT and send all but its last byte; prints the
# master's RSS before, during, and after they close. Usage: partial_frames.py JOBHOST_BIN PLUGIN_DIR [server lines]
import os, socket, subprocess, sys, time, struct, threading, tempfile
binary, plugins = sys.argv[1], sys.argv[2]
server = sys.argv[3] if len(sys.argv) > 3 else ""
d = tempfile.mkdtemp()
os.makedirs(d + "/plugins"); import shutil; shutil.copy(plugins + "/libecho.so", d + "/plugins/libecho.so")
open(d + "/c.toml", "w").write(f'[host]\nplugins_dir = "plugins"\nruntime_dir = "run"\nlog = "{d}/log"\n[server]\n{server}\n[[pool]]\nname = "e"\nplugin = "echo"\nworkers = 1\n')
p = subprocess.Popen([binary, "run", "-c", d + "/c.toml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sock = d + "/run/jobs.sock"
t0 = time.time()
while not os.path.exists(sock):
    time.sleep(0.05)
    assert time.time() - t0 < 20 and p.poll() is None, "no master"
time.sleep(0.5)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
print("RSS before:", rss(), "MiB")
n = (16 << 20) + 1035
conns = []
def send(s):
    s.settimeout(3)
    try:
        s.sendall(struct.pack(">I", n) + bytes([1]) + b"\0" * (n - 2))
    except Exception: pass
ts = []
for _ in range(40):
    s = socket.socket(socket.AF_UNIX); s.connect(sock); conns.append(s)
    t = threading.Thread(target=send, args=(s,)); t.start(); ts.append(t)
for t in ts: t.join()
time.sleep(1)
print("RSS with 40 partial frames:", rss(), "MiB")
for s in conns: s.close()
time.sleep(2)
print("RSS after they closed:", rss(), "MiB")
p.terminate(); p.wait()
