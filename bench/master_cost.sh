#!/bin/bash
# The master's cost per job, build against build (issue 18 measured its bookkeeping this way
# against the build before it). Not part of CI. Usage:
#   bench/master_cost.sh OLD_TARGET_RELEASE NEW_TARGET_RELEASE [PAIRS=3]
# Each target/release must hold `jobhost` and `libecho.so` (cargo build --release -p jobhost
# -p jobhost-plugin-echo). Prints, for each build:
#   - master CPU per job (/proc/PID/stat utime+stime over 2,000,000 echo jobs through
#     `jobhost submit`, 2 workers), in ABBA order, PAIRS times;
#   - with valgrind installed: the master's exact user-space instructions per job
#     (callgrind, the run of 300,000 jobs minus the run of 100,000, so start-up cancels out).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); pairs=${3:-3}

# setup BIN_DIR -> a temp dir with the config and the plugin
setup() {
    local d; d=$(mktemp -d "${TMPDIR:-/tmp}/jobhost-cost.XXXX")
    mkdir -p "$d/plugins" "$d/run"; cp "$1/libecho.so" "$d/plugins/"
    printf '[host]\nplugins_dir = "plugins"\nruntime_dir = "run"\nlog_level = "warn"\n\n[server]\nsocket = "jobs.sock"\n\n[[pool]]\nname = "echo"\nplugin = "echo"\nworkers = 2\n' > "$d/cfg.toml"
    echo "$d"
}
wait_socket() { for _ in $(seq 600); do [ -S "$1/run/jobs.sock" ] && return; sleep 0.1; done; echo "no master" >&2; exit 1; }

cpu_per_job() { # BIN_DIR
    local d pid t0 t1 jobs=2000000; d=$(setup "$1")
    (cd "$d" && exec "$1/jobhost" run -c cfg.toml > master.log 2>&1) & pid=$!
    wait_socket "$d"; sleep 1
    t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
    seq $jobs | "$1/jobhost" submit --socket "$d/run/jobs.sock" echo > /dev/null
    t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
    kill $pid; wait $pid 2>/dev/null || true; rm -rf "$d"
    echo "scale=3; ($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / $jobs" | bc
}

instructions() { # BIN_DIR JOBS -> the master's instructions
    local d pid f; d=$(setup "$1")
    (cd "$d" && exec valgrind --tool=callgrind --callgrind-out-file="$d/cg.%p" "$1/jobhost" run -c cfg.toml > master.log 2>&1) & pid=$!
    wait_socket "$d"; sleep 2
    seq "$2" | "$1/jobhost" submit --socket "$d/run/jobs.sock" echo > /dev/null
    kill $pid; wait $pid 2>/dev/null || true; sleep 1
    f="$d/cg.$pid"
    grep -E '^(summary|totals):' "$f" | head -1 | awk '{print $2}'; rm -rf "$d"
}

declare -A sum=([old]=0 [new]=0)
for i in $(seq "$pairs"); do
    for who in old new new old; do
        bin=$old; [ $who = new ] && bin=$new
        c=$(cpu_per_job "$bin"); sum[$who]=$(echo "${sum[$who]} + $c" | bc)
        echo "pair $i $who: $c µs master CPU per job"
    done
done
for who in old new; do echo "$who: mean $(echo "scale=3; ${sum[$who]} / (2 * $pairs)" | bc) µs master CPU per job"; done

if command -v valgrind > /dev/null; then
    for who in old new; do
        bin=$old; [ $who = new ] && bin=$new
        a=$(instructions "$bin" 100000); b=$(instructions "$bin" 300000)
        echo "$who: $(( (b - a) / 200000 )) instructions per job in the master (user space, callgrind)"
    done
fi
