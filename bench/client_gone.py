#!/usr/bin/env python3
"""What a client's disconnect costs the master while many jobs are queued (issue 17).

Starts `target/release/jobhost run` with one stopped `sleep` pool, has one connection queue
QUEUED jobs (and stay connected), then runs CYCLES connect / submit one job / close cycles and
prints the master's CPU seconds (utime + stime from /proc) for the cycles alone. Before the
per-client lanes, every disconnect scanned every job.

    cargo build --release --workspace && python3 bench/client_gone.py [QUEUED] [CYCLES]
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")


def submit_frame(job_id, pool, payload):
    body = struct.pack(">QH", job_id, len(pool)) + pool + payload
    return struct.pack(">IB", 1 + len(body), 1) + body


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def admin(path, line):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        out = b""
        while not (out.endswith(b"OK\n") or b"ERR" in out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out.decode()


def queued(path):
    import json

    doc = json.loads(admin(path, "status json").splitlines()[0])
    return doc["pools"][0]["jobs_queued"]


def main():
    queued_jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 400_000
    cycles = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000
    with tempfile.TemporaryDirectory(prefix="jobhost-client-gone-") as d:
        os.mkdir(os.path.join(d, "plugins"))
        with open(os.path.join(RELEASE, "libsleep.so"), "rb") as src:
            with open(os.path.join(d, "plugins", "libsleep.so"), "wb") as dst:
                dst.write(src.read())
        config = os.path.join(d, "jobhost.toml")
        with open(config, "w") as f:
            f.write(
                '[host]\nplugins_dir = "plugins"\nruntime_dir = "run"\nlog_level = "warn"\n\n'
                f'[[pool]]\nname = "s"\nplugin = "sleep"\nworkers = 1\nmax_queue = {queued_jobs * 2}\n'
            )
        master = subprocess.Popen(
            [os.path.join(RELEASE, "jobhost"), "run", "-c", config],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            jobs = os.path.join(d, "run", "jobs.sock")
            adm = os.path.join(d, "run", "admin.sock")
            while not (os.path.exists(jobs) and os.path.exists(adm)):
                time.sleep(0.05)
            admin(adm, "stop s")
            holder = socket.socket(socket.AF_UNIX)
            holder.connect(jobs)
            frame = submit_frame(0, b"s", b"0")
            holder.sendall(frame * queued_jobs)
            while queued(adm) < queued_jobs:
                time.sleep(0.1)
            before = cpu_seconds(master.pid)
            start = time.monotonic()
            for i in range(cycles):
                with socket.socket(socket.AF_UNIX) as c:
                    c.connect(jobs)
                    c.sendall(submit_frame(i, b"s", b"0"))
            # Done once the master is idle again (a stopped pool: nothing else runs).
            last = cpu_seconds(master.pid)
            while True:
                time.sleep(0.5)
                now = cpu_seconds(master.pid)
                if now == last:
                    break
                last = now
            wall = time.monotonic() - start
            used = last - before
            print(
                f"{cycles} connect/submit/close cycles with {queued_jobs} jobs queued: "
                f"master CPU {used:.2f} s ({wall:.2f} s wall, idle 0.5 s included); "
                f"{queued(adm)} jobs queued after"
            )
            holder.close()
        finally:
            master.kill()
            master.wait()


if __name__ == "__main__":
    main()
