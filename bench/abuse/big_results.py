# Usage: big_results.py JOBHOST_BIN PLUGIN_DIR MIB. 4 clients each submit a tiny job whose result is MIB MiB (faulty's "big"), read the results
# slowly-ish; prints the master's peak RSS (VmHWM).
import os, socket, subprocess, sys, time, struct, threading, tempfile, shutil
binary, plugins, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = tempfile.mkdtemp(); os.makedirs(d + "/plugins"); shutil.copy(plugins + "/libfaulty.so", d + "/plugins/libfaulty.so")
open(d + "/c.toml", "w").write(f'[host]\nplugins_dir = "plugins"\nruntime_dir = "run"\nlog = "{d}/log"\n[server]\nmax_result = "1GiB"\n[[pool]]\nname = "f"\nplugin = "faulty"\nworkers = 4\n')
p = subprocess.Popen([binary, "run", "-c", d + "/c.toml"])
sock = d + "/run/jobs.sock"; t0 = time.time()
while not os.path.exists(sock):
    time.sleep(0.05); assert time.time() - t0 < 20 and p.poll() is None
time.sleep(1)
def hwm():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) // 1024
print("peak RSS before:", hwm(), "MiB")
def job(i):
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    payload = f"big {mib}".encode()
    body = struct.pack(">Q", i) + struct.pack(">H", 1) + b"f" + payload
    s.sendall(struct.pack(">I", 1 + len(body)) + bytes([1]) + body)
    time.sleep(3)  # let all four results reach the master before reading
    got = 0; want = None; buf = b""
    while want is None or got < want:
        b = s.recv(1 << 20)
        if not b: break
        if want is None:
            buf += b
            if len(buf) >= 4: want = 4 + struct.unpack(">I", buf[:4])[0]; got = len(buf)
        else: got += len(b)
    print("job", i, "got", got, "bytes")
ts = [threading.Thread(target=job, args=(i,)) for i in range(4)]
for t in ts: t.start()
for t in ts: t.join()
print(f"peak RSS for 4 results of {mib} MiB:", hwm(), "MiB")
p.terminate(); p.wait()
