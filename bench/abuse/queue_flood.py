import socket, threading, time, json, subprocess
from common import *
p, d, sock = start("", '[[pool]]\nname = "s"\nplugin = "sleep"\nworkers = 1\nmax_queue = 1000\n', plugins=("sleep",))
stop = time.time() + 20
def flood(k):
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    job = b"".join(submit(k * 10**6 + i, "s", b"1000" + b" " * 65532) for i in range(16))
    while time.time() < stop:
        try: s.send(job)
        except OSError: break
    s.close()
ts = [threading.Thread(target=flood, args=(k,)) for k in range(20)]
for t in ts: t.start()
for t in ts: t.join()
print("peak", hwm(p.pid), "now", rss(p.pid))
for i in range(4):
    time.sleep(2)
    out = subprocess.run([f"{ROOT}/jobhost", "ctl", "--socket", d + "/run/admin.sock", "status", "json"], capture_output=True, text=True).stdout
    st = json.loads(out.splitlines()[0])
    print("t+%d" % (2*i+2), "rss", rss(p.pid), {k: v for k, v in st["pools"][0].items() if k.startswith("jobs")}, "clients?", st.get("clients"))
print(subprocess.run(["grep", "-c", "rejected\\|queue full", d + "/log"], capture_output=True, text=True).stdout)
p.terminate(); p.wait()
