#!/usr/bin/env bash
# Idle footprint of one tandemd: COUNT thin volumes of SIZE created through the node
# API, then the daemon left alone; it prints the resident memory (VmRSS) and threads
# right after the creations, after IDLE seconds, and after a restart that finds every
# volume again on disk. Target (the foundation's): 100 volumes of 10 GiB under 64 MiB.
#
# It stops only the process it started, by PID, and runs a private copy of the binary
# ($BENCH_DIR/tnode-rss) so that nothing else is matched by name.
#
# Environment:
#   COUNT      volumes [100]
#   SIZE       size of each volume, in bytes [10737418240 = 10 GiB]
#   IDLE       seconds left idle before the second measurement [10]
#   BENCH_DIR  work directory, disk-backed (not tmpfs) [/var/tmp/tandem-rss]
#   PORT       API port on 127.0.0.1 [4890]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${COUNT:-100}
SIZE=${SIZE:-10737418240}
IDLE=${IDLE:-10}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-rss}
PORT=${PORT:-4890}
API=127.0.0.1:$PORT

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p tandemd
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
cp "$REPO/target/release/tandemd" "$BENCH_DIR/tnode-rss"

PID=
cleanup() {
    if [[ -n $PID ]]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$BENCH_DIR"
}
trap cleanup EXIT INT TERM

start() {
    "$BENCH_DIR/tnode-rss" --name rss --data-dir "$BENCH_DIR/data" --api-listen "$API" \
        --nbd-listen 127.0.0.1:0 --log-level warn 2>>"$BENCH_DIR/tandemd.log" &
    PID=$!
    for _ in $(seq 100); do curl -sf "http://$API/v1/node" >/dev/null && return; sleep 0.1; done
    echo "idle-rss: tandemd did not answer on $API" >&2
    exit 1
}
stop() {
    kill -TERM "$PID"
    wait "$PID" || { echo "idle-rss: tandemd exited with status $? on SIGTERM" >&2; exit 1; }
    PID=
}
# rss LABEL: one line of VmRSS and threads.
rss() {
    local kib threads
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")
    threads=$(awk '/^Threads:/ {print $2}' "/proc/$PID/status")
    printf '%-34s %6.1f MiB resident, %3d threads\n' "$1" "$(echo "$kib / 1024" | bc -l)" "$threads"
}

start
for i in $(seq "$COUNT"); do
    curl -sf -XPOST "http://$API/v1/node/volumes" -H 'content-type: application/json' \
        -d "{\"name\":\"v$i\",\"size\":$SIZE}" >/dev/null ||
        { echo "idle-rss: creating volume v$i failed" >&2; exit 1; }
done
listed=$(curl -sf "http://$API/v1/node/volumes" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
[[ $listed == "$COUNT" ]] || { echo "idle-rss: $listed volumes listed, $COUNT created" >&2; exit 1; }

echo "tandemd $("$BENCH_DIR/tnode-rss" --version | awk '{print $2}'), $COUNT thin volumes of $SIZE bytes"
rss "after creating them"
sleep "$IDLE"
rss "after ${IDLE} s idle"
stop
start
listed=$(curl -sf "http://$API/v1/node/volumes" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
[[ $listed == "$COUNT" ]] || { echo "idle-rss: $listed volumes found after the restart" >&2; exit 1; }
sleep "$IDLE"
rss "after a restart and ${IDLE} s idle"
echo "data directory: $(du -sh "$BENCH_DIR/data" | cut -f1) on disk"
