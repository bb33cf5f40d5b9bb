#!/usr/bin/env bash
# fuzz/run.sh: runs every cargo-fuzz target for RUNS executions (default 1,000,000) each and
# reports, per target, the executions done and the findings (crash-, leak-, timeout- and
# oom- files in fuzz/artifacts/TARGET/). Exits 1 if any target found something. Not part of
# CI. Usage: fuzz/run.sh [TARGET...]   (default: all of them)
#
#   RUNS=N        executions per target (libFuzzer's -runs=)
#   SANITIZER=S   address (default) or none (faster, finds only panics and assertion failures)
#   JOBS=N        build jobs for cargo
#
# Toolchain: cargo-fuzz (`cargo install cargo-fuzz --locked`) wants a nightly rustc, for
# `-Zsanitizer=address` and the `-Z` flags it passes cargo. Only a stable toolchain is on the
# build machines, so this script (and only this script: never a build of the project itself)
# sets RUSTC_BOOTSTRAP=1, which makes the stable compiler accept those unstable flags. That
# works with the stable 1.95 toolchain: the ASan runtime ships with the x86_64 Linux std, and
# libfuzzer-sys builds libFuzzer itself with the C++ compiler (g++). With SANITIZER=none the
# build needs no sanitizer flag (`cargo fuzz run -s none`); it still needs RUSTC_BOOTSTRAP
# for cargo-fuzz's other flags. Corpora grow in fuzz/corpus/TARGET (not committed); the
# seeds in fuzz/seeds/TARGET are read, never written.
set -uo pipefail
cd "$(dirname "$0")"

export RUSTC_BOOTSTRAP=1
RUNS=${RUNS:-1000000}
SANITIZER=${SANITIZER:-address}
ALL=(frame_stream frame_encode admin_line config_text gearman_packet)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 2; }

build_args=(--release -s "$SANITIZER")
[ -n "${JOBS:-}" ] && build_args+=(--jobs "$JOBS")
for t in "${TARGETS[@]}"; do
    cargo fuzz build "${build_args[@]}" "$t" || { echo "build of $t failed" >&2; exit 2; }
done

mkdir -p logs
failed=0
summary=()
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    extra=()
    [ "$t" = config_text ] && extra+=(-dict=dict/config.dict -max_len=2048)
    [ "$t" = frame_encode ] && extra+=(-max_len=8192)
    before=$(find "artifacts/$t" -type f | wc -l)
    start=$(date +%s)
    cargo fuzz run "${build_args[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -runs="$RUNS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"logs/$t.log" 2>&1
    status=$?
    secs=$(( $(date +%s) - start ))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' | tail -1)
    [ -z "$execs" ] && execs=$(grep -oE '^(Done|#)[0-9]+ ' "logs/$t.log" | grep -o '[0-9]*' | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "logs/$t.log" | tail -1)
    found=$(( $(find "artifacts/$t" -type f | wc -l) - before ))
    line="$t: ${execs:-?} executions in ${secs}s, ${cov:-cov: ?}, corpus $(find "corpus/$t" -type f | wc -l) inputs, $found new findings (exit $status)"
    summary+=("$line")
    echo "$line"
    if [ "$status" -ne 0 ] || [ "$found" -ne 0 ]; then
        failed=1
        grep -E 'panicked at|ERROR: |SUMMARY' "logs/$t.log" | head -5
        ls -t "artifacts/$t" | head -5 | sed "s|^|  artifacts/$t/|"
    fi
done
echo
echo "== summary (RUNS=$RUNS, SANITIZER=$SANITIZER; logs in fuzz/logs/) =="
printf '%s\n' "${summary[@]}"
exit $failed
