#!/usr/bin/env bash
# Control-plane benchmark: three tandemd on loopback, the controller on the first,
# driven through the `tandem` CLI. It measures:
#   - creation: COUNT volumes of 2 replicas created one `tandem volume create` after
#     the other, until `tandem volume list` shows every one UpToDate (replicas created,
#     tiebreakers placed, every link connected);
#   - listing: with LIST_COUNT volumes in the cluster, the wall time of
#     `tandem volume list --output json` (ROUNDS runs; median and worst).
# Targets (docs/benchmarks.md): creation of 100 volumes ≤ 60 s, listing of 1000 ≤ 300 ms.
#
# It stops only the processes it started, by PID, and runs a private copy of the
# binary ($BENCH_DIR/tnode-ctl) so that nothing else is matched by name.
#
# Environment:
#   COUNT        volumes in the creation measurement [100]
#   LIST_COUNT   volumes present for the listing measurement [1000]
#   SIZE         size of each volume [64M]
#   ROUNDS       listing runs [20]
#   BENCH_DIR    work directory, disk-backed (not tmpfs) [/var/tmp/tandem-ctl]
#   BASE_PORT    first of the 9 loopback ports used [4870]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib/cluster.sh
source "$REPO/bench/lib/cluster.sh"
COUNT=${COUNT:-100}
LIST_COUNT=${LIST_COUNT:-1000}
SIZE=${SIZE:-64M}
ROUNDS=${ROUNDS:-20}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-ctl}
BASE_PORT=${BASE_PORT:-4870}

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p tandemd -p tandem-cli
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
cp "$REPO/target/release/tandemd" "$BENCH_DIR/tnode-ctl"
TANDEM="$REPO/target/release/tandem"

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$BENCH_DIR"
}
trap cleanup EXIT INT TERM

start_three "$BENCH_DIR/tnode-ctl" "$BENCH_DIR" "$BASE_PORT"

now() { date +%s.%N; }
# Waits until every listed volume is UpToDate; prints how many are not, while waiting.
wait_up_to_date() {
    local want=$1
    while true; do
        local counts
        counts=$("$TANDEM" -o json volume list | python3 -c '
import json, sys
vs = json.load(sys.stdin)
print(len(vs), sum(v["state"] == "UpToDate" for v in vs))')
        read -r total ready <<<"$counts"
        [[ $total == "$want" && $ready == "$want" ]] && return
        sleep 0.2
    done
}

start=$(now)
for i in $(seq "$COUNT"); do
    "$TANDEM" volume create "c$i" --size "$SIZE" >/dev/null
done
created=$(now)
wait_up_to_date "$COUNT"
done_at=$(now)
create_s=$(echo "$created - $start" | bc)
total_s=$(echo "$done_at - $start" | bc)

for i in $(seq "$((COUNT + 1))" "$LIST_COUNT"); do
    "$TANDEM" volume create "c$i" --size "$SIZE" >/dev/null
done
wait_up_to_date "$LIST_COUNT"
times=()
for _ in $(seq "$ROUNDS"); do
    t0=$(now)
    "$TANDEM" -o json volume list >/dev/null
    t1=$(now)
    times+=("$(echo "($t1 - $t0) * 1000" | bc)")
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
median=$(echo "$sorted" | sed -n "$(((ROUNDS + 1) / 2))p")
worst=$(echo "$sorted" | tail -1)
threads=0
for pid in "${PIDS[@]}"; do threads=$((threads + $(ls /proc/"$pid"/task | wc -l))); done
rss=0
for pid in "${PIDS[@]}"; do rss=$((rss + $(awk '/VmRSS/ {print $2}' /proc/"$pid"/status))); done

printf '\nControl plane, 3 nodes on loopback (commit %s)\n\n' "$(git -C "$REPO" rev-parse --short HEAD)"
printf '| measurement | result | target |\n|---|---|---|\n'
printf '| create %d volumes of 2 replicas (%s), CLI calls | %.1f s | |\n' "$COUNT" "$SIZE" "$create_s"
printf '| … until all UpToDate | %.1f s | ≤ 60 s |\n' "$total_s"
printf '| `tandem volume list -o json`, %d volumes, median of %d | %.0f ms | ≤ 300 ms |\n' "$LIST_COUNT" "$ROUNDS" "$median"
printf '| … worst | %.0f ms | |\n' "$worst"
printf '| threads / RSS of the 3 tandemd with %d volumes | %d / %d MiB | |\n' "$LIST_COUNT" "$threads" "$((rss / 1024))"
