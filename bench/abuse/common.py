import os, socket, struct, subprocess, tempfile, shutil, time
# The release build to measure: $JOBHOST_TARGET, else this checkout's target/release.
ROOT = os.environ.get(
    "JOBHOST_TARGET",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "release"))
def start(toml_extra, pools, plugins=("echo",)):
    d = tempfile.mkdtemp(prefix="meas-")
    os.makedirs(d + "/plugins")
    for p in plugins:
        shutil.copy(f"{ROOT}/lib{p}.so", f"{d}/plugins/lib{p}.so")
    open(d + "/c.toml", "w").write(f'[host]\nplugins_dir = "plugins"\nruntime_dir = "run"\nlog = "{d}/log"\n{toml_extra}\n{pools}')
    p = subprocess.Popen([f"{ROOT}/jobhost", "run", "-c", d + "/c.toml"])
    sock = d + "/run/jobs.sock"; t0 = time.time()
    while not os.path.exists(sock):
        time.sleep(0.05); assert time.time() - t0 < 20 and p.poll() is None
    time.sleep(1)
    return p, d, sock
def submit(i, pool, payload):
    body = struct.pack(">Q", i) + struct.pack(">H", len(pool)) + pool.encode() + payload
    return struct.pack(">I", 1 + len(body)) + bytes([1]) + body
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
def hwm(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) // 1024
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
