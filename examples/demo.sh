#!/usr/bin/env bash
# The README's first command: start a master on the embedded default config, push real jobs
# through it with `jobhost submit`, show the results, stop it gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
jobhost=target/release/jobhost
config=examples/jobhost.toml
socket=examples/run/jobs.sock

"$jobhost" check -c "$config"
"$jobhost" run -c "$config" 2> examples/run.log &
master=$!
trap 'kill -TERM $master 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { cat examples/run.log; echo "demo: the master did not start" >&2; exit 1; }

echo "== one job: hash 'hello world'"
"$jobhost" submit -c "$config" hash "hello world"
echo "== five jobs from stdin to the lookup pool (a 64 MiB table built once, shared by both workers)"
seq 1 5 | "$jobhost" submit -c "$config" lookup
echo "== 100000 echo jobs, results streamed in input order (last two shown)"
time (seq 1 100000 | "$jobhost" submit -c "$config" echo | tail -n 2)
echo "== a job to a pool that does not exist is rejected, exit status 1"
"$jobhost" submit -c "$config" nosuchpool x || echo "exit status $?"

kill -TERM "$master"
wait "$master"
trap - EXIT
echo "== the master stopped cleanly; its log:"
cat examples/run.log
