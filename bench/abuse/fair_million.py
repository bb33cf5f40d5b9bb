# Client A queues 1,000,000 one-millisecond sleep jobs (2 workers: ~8 minutes of work); then
# client B submits one job: its latency, and how many of A's were answered by then. Then A
# closes: its queued jobs are dropped (status json jobs_dropped), and the master's CPU for it.
import socket, struct, time, json, subprocess
from common import *
p, d, sock = start("", '[[pool]]\nname = "s"\nplugin = "sleep"\nworkers = 2\nmax_queue = 1000000\n', plugins=("sleep",))
N = 1_000_000
a = socket.socket(socket.AF_UNIX); a.connect(sock)
batch = b"".join(submit(i, "s", b"1") for i in range(N))
t0 = time.time(); a.sendall(batch)
def status():
    out = subprocess.run([f"{ROOT}/jobhost", "ctl", "--socket", d + "/run/admin.sock", "status", "json"], capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[0])["pools"][0]
while status()["jobs_queued"] < N - 10000: time.sleep(0.2)
print(f"A: {N} jobs sent in {time.time()-t0:.1f} s; queued {status()['jobs_queued']}")
b = socket.socket(socket.AF_UNIX); b.connect(sock)
t1 = time.time(); b.sendall(submit(7, "s", b"1"))
hdr = b.recv(4096)
lat = time.time() - t1
st = status()
print(f"B: its one job answered in {lat*1000:.0f} ms, with {st['jobs_done']} of A's done and {st['jobs_queued']} queued")
c0 = cpu(p.pid); a.close()
while status()["jobs_queued"] > 0: time.sleep(0.1)
st = status()
print(f"A closed: jobs_dropped {st['jobs_dropped']}, master CPU for the drop {cpu(p.pid)-c0:.2f} s")
p.terminate(); p.wait()
