#!/usr/bin/env bash
# Single-node NBD benchmark: tandemd against qemu-nbd and nbdkit, all serving the same
# fully written 1 GiB raw file over a Unix socket, driven by fio's nbd engine, in two
# sections, each comparing servers in the same cache mode:
#   direct I/O (no host page cache):  tandemd --cache none      vs qemu-nbd --cache=none --aio=io_uring
#   host page cache:                  tandemd --cache writeback vs qemu-nbd --cache=writeback --aio=threads
#                                     vs nbdkit file (its default cache mode)
# (nbdkit 1.32's file plugin has no direct I/O, so it is only in the second section.)
# Each round runs all five server configurations, one at a time, in rotating order,
# backwards in even rounds.
# See docs/benchmarks.md for the method and for how to read the tables.
#
# Other people may run tandemd on the same machine. This script stops only the processes
# it started, by PID, and never by name. It also runs a private copy of the tandemd
# binary, $BENCH_DIR/tnode-bench, whose name does not contain "tandemd", so that nobody
# else's `pkill tandemd` or `killall tandemd` can hit the server under test (keep
# "tandemd" out of BENCH_DIR too, or `pkill -f tandemd` would match its command line).
#
# Environment:
#   TANDEMD    tandemd binary [target/release/tandemd under the repo; built if missing]
#   RUNTIME    seconds measured per job [10]
#   RAMP       seconds of warm-up per job, not measured [1]
#   ROUNDS     times the five server configurations are alternated [2]
#   PICK       how a cell is chosen from the rounds: best or median [best]
#   BENCH_DIR  work directory; must support O_DIRECT (not tmpfs) [/var/tmp/tandem-bench]
#   FRESH=1    rewrite the 1 GiB test file even if a complete one is there
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
ROUNDS=${ROUNDS:-2}
PICK=${PICK:-best}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-bench}
FRESH=${FRESH:-0}
SIZE=$((1 << 30))
EXPORT=bench
# Server configurations: id server cache-mode. The ids name the fio JSON files.
CONFIGS=(
    "tandemd-none tandemd none"
    "qemu-nbd-none qemu-nbd none"
    "tandemd-wb tandemd writeback"
    "qemu-nbd-wb qemu-nbd writeback"
    "nbdkit nbdkit default"
)

die() { echo "nbd-single: $*" >&2; exit 1; }
note() { echo "== $*" >&2; }

[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds"
[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a number of seconds"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $PICK == best || $PICK == median ]] || die "PICK must be best or median"

# ---- tools ---------------------------------------------------------------------------
for tool in fio qemu-nbd nbdkit python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install fio qemu-utils nbdkit python3 curl)"
done
fio --enghelp 2>/dev/null | grep -qw nbd ||
    die "this fio has no nbd engine (fio --enghelp does not list it); install a fio built with libnbd (Debian's fio package is)"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit has no file plugin (Debian: apt-get install nbdkit)"

if [[ -z ${TANDEMD:-} ]]; then
    TANDEMD=$REPO/target/release/tandemd
    if [[ ! -x $TANDEMD ]]; then
        note "building tandemd (cargo build --release -p tandemd)"
        (cd "$REPO" && cargo build --release -p tandemd) >&2
    fi
fi
[[ -x $TANDEMD ]] || die "TANDEMD=$TANDEMD is not an executable file"
TANDEMD=$(cd "$(dirname "$TANDEMD")" && pwd)/$(basename "$TANDEMD")
TANDEMD_SRC=$TANDEMD

# ---- work directory ------------------------------------------------------------------
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
FSTYPE=$(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ')
FSDEV=$(df --output=source "$BENCH_DIR" | tail -1 | tr -d ' ')
[[ $FSTYPE != tmpfs ]] || die "$BENCH_DIR is on tmpfs, which has no O_DIRECT; set BENCH_DIR to a disk-backed directory"
dd if=/dev/zero of="$BENCH_DIR/.odirect-probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
    { rm -f "$BENCH_DIR/.odirect-probe"; die "$BENCH_DIR ($FSTYPE) refuses O_DIRECT; set BENCH_DIR elsewhere"; }
rm -f "$BENCH_DIR/.odirect-probe"

# The private copy of tandemd (see the top of the file). Copied then renamed, so a copy
# still running from an earlier, interrupted run does not make cp fail ("text file busy").
TANDEMD=$BENCH_DIR/tnode-bench
cp "$TANDEMD_SRC" "$TANDEMD.tmp"
mv -f "$TANDEMD.tmp" "$TANDEMD"

DATA=$BENCH_DIR/node-data                # tandemd's data dir; the volume lives in its pool
FILE=$DATA/pools/default/$EXPORT.raw     # the one file every server serves
RUN=$BENCH_DIR/last-run                  # sockets, logs, fio JSON of this run
rm -rf "$RUN"
mkdir -p "$RUN/json"

# ---- process handling ----------------------------------------------------------------
# Only ever $SERVER_PID, the one server this script started, is signalled.
SERVER_PID=
SERVER_NAME=
cleanup() {
    local rc=$?
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if ((rc != 0)); then
        echo "nbd-single: failed (exit $rc); logs are in $RUN" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until the server at socket $1 completes an NBD greeting (then aborts cleanly
# with NBD_OPT_ABORT, so no server logs a broken handshake). Fails if the server died.
wait_ready() {
    local sock=$1 log=$2
    for _ in $(seq 100); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "nbd-single: $SERVER_NAME exited at start; its log ($log):" >&2
            tail -5 "$log" >&2
            return 1
        fi
        if [[ -S $sock ]] && python3 - "$sock" <<'EOF' 2>/dev/null; then return 0; fi
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
hello = b""
while len(hello) < 18:
    more = s.recv(18 - len(hello))
    if not more:
        sys.exit(1)
    hello += more
if hello[:8] != b"NBDMAGIC" or hello[8:16] != b"IHAVEOPT":
    sys.exit(1)
s.sendall(struct.pack(">I", 3))                          # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(b"IHAVEOPT" + struct.pack(">II", 2, 0))        # NBD_OPT_ABORT
try:
    s.recv(20)
except OSError:
    pass
s.close()
EOF
        sleep 0.1
    done
    echo "nbd-single: server did not answer on $sock; its log ($log):" >&2
    tail -20 "$log" >&2
    return 1
}

stop_server() {
    local rc=0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 400); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "nbd-single: $SERVER_NAME did not stop within 40 s of SIGTERM; killing it" >&2
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    wait "$SERVER_PID" 2>/dev/null || rc=$?
    # qemu-nbd and nbdkit exit with 143/0 on SIGTERM; tandemd must exit 0.
    if [[ $SERVER_NAME == tandemd && $rc != 0 ]]; then
        echo "nbd-single: tandemd exited with status $rc after SIGTERM (see $RUN/tandemd.log)" >&2
        TANDEMD_BAD_EXITS=$((TANDEMD_BAD_EXITS + 1))
    fi
    SERVER_PID=
}
TANDEMD_BAD_EXITS=0

start_tandemd() {
    local mode=$1 log=$RUN/tandemd.log
    SERVER_NAME=tandemd
    SOCK=$DATA/nbd.sock
    TANDEMD_API=127.0.0.1:$(free_port)
    echo "---- start $(date +%T) cache=$mode" >>"$log"
    NO_COLOR=1 "$TANDEMD" --name n1 --data-dir "$DATA" --cache "$mode" \
        --nbd-listen "127.0.0.1:$(free_port)" --api-listen "$TANDEMD_API" 2>>"$log" &
    SERVER_PID=$!
    wait_ready "$SOCK" "$log" || die "tandemd did not start"
}

# Direct I/O: io_uring, or native if this qemu-nbd refuses io_uring. Page cache: threads
# (qemu-nbd's default; native needs O_DIRECT).
QEMU_AIO=io_uring
start_qemu() {
    local mode=$1 log=$RUN/qemu-nbd.log aio
    if [[ $mode == none ]]; then aio=$QEMU_AIO; else aio=threads; fi
    SERVER_NAME=qemu-nbd
    SOCK=$RUN/qemu-nbd.sock
    rm -f "$SOCK"
    echo "---- start $(date +%T) cache=$mode aio=$aio" >>"$log"
    qemu-nbd -f raw --cache="$mode" --aio="$aio" -k "$SOCK" -x "$EXPORT" \
        --persistent --shared=8 "$FILE" 2>>"$log" &
    SERVER_PID=$!
    if ! wait_ready "$SOCK" "$log"; then
        if [[ $aio == io_uring ]]; then
            wait "$SERVER_PID" 2>/dev/null || true
            SERVER_PID=
            note "qemu-nbd refused --aio=io_uring; falling back to --aio=native"
            QEMU_AIO=native
            start_qemu "$mode"
            return
        fi
        die "qemu-nbd did not start"
    fi
}

# nbdkit's file plugin in its default cache mode (page cache). Its cache=none is not
# direct I/O (buffered I/O plus eviction), so nbdkit has no place in the direct section.
start_nbdkit() {
    local log=$RUN/nbdkit.log
    SERVER_NAME=nbdkit
    SOCK=$RUN/nbdkit.sock
    rm -f "$SOCK" # nbdkit leaves its socket behind when stopped
    echo "---- start $(date +%T)" >>"$log"
    nbdkit --unix "$SOCK" --foreground --exportname "$EXPORT" file "$FILE" 2>>"$log" &
    SERVER_PID=$!
    wait_ready "$SOCK" "$log" || die "nbdkit did not start"
}

start_server() {
    case $1 in
        tandemd) start_tandemd "$2" ;;
        qemu-nbd) start_qemu "$2" ;;
        nbdkit) start_nbdkit ;;
    esac
}

# Empties the page cache before each server, so none starts with a cache left warm by
# another: first the test file's dirty pages are written back and its pages dropped
# (dd: fdatasync, then fadvise DONTNEED), so no earlier server's writeback runs during
# the next one's jobs; then, as root, the whole page cache, dentries and inodes
# (drop_caches 3, which drops only clean pages, hence the sync before it).
if [[ -w /proc/sys/vm/drop_caches ]]; then
    DROP_CACHES=1
else
    DROP_CACHES=0
    note "not root: /proc/sys/vm/drop_caches is not writable; only the test file's pages are dropped before each server"
fi
evict_cache() {
    dd of="$FILE" oflag=nocache conv=notrunc,fdatasync count=0 status=none
    if ((DROP_CACHES)); then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# ---- the test file -------------------------------------------------------------------
allocated() { echo $(($(stat -c '%b * %B' "$FILE"))); }
if [[ $FRESH == 1 || ! -f $DATA/pools/default/$EXPORT.meta || ! -f $FILE ]] ||
    (($(allocated) < SIZE)); then
    note "creating volume $EXPORT ($SIZE bytes) in $DATA and writing it in full"
    rm -rf "$DATA"
    start_tandemd none
    for _ in $(seq 50); do curl -sf "http://$TANDEMD_API/v1/node" >/dev/null && break; sleep 0.1; done
    curl -sf -XPOST "http://$TANDEMD_API/v1/node/volumes" -H 'content-type: application/json' \
        -d "{\"name\":\"$EXPORT\",\"size\":$SIZE}" >"$RUN/create.json" ||
        die "creating the volume through the tandemd API failed (see $RUN/tandemd.log)"
    stop_server
    # Written directly (tandemd is stopped), with O_DIRECT and fio's random buffers.
    fio --name=prefill --filename="$FILE" --rw=write --bs=4M --size="$SIZE" \
        --ioengine=psync --direct=1 --end_fsync=1 --output="$RUN/prefill.txt" >/dev/null
    (($(allocated) >= SIZE)) || die "$FILE is not fully allocated after the prefill"
else
    note "reusing the fully written $FILE (FRESH=1 rewrites it)"
fi
[[ $(stat -c %s "$FILE") == "$SIZE" ]] || die "$FILE is not $SIZE bytes"

# ---- machine info --------------------------------------------------------------------
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
{
    echo "date:        $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel:      $(uname -srm)"
    echo "cpus:        $(nproc) x ${CPU_MODEL:-unknown}"
    echo "memory:      $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "bench dir:   $BENCH_DIR ($FSTYPE on $FSDEV)"
    echo "load avg:    $(cut -d' ' -f1-3 /proc/loadavg) (at start)"
    echo "tandemd:     $("$TANDEMD" --version 2>/dev/null), --cache none | --cache writeback ($TANDEMD_SRC, built $(date -u -r "$TANDEMD_SRC" '+%Y-%m-%d %H:%M UTC'), run as $TANDEMD; repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo "qemu-nbd:    $(qemu-nbd --version | head -1 | awk '{print $2}'), --cache=none --aio=AIO_MODE | --cache=writeback --aio=threads"
    echo "nbdkit:      $(nbdkit --version | awk '{print $2}'), file plugin, default cache mode"
    echo "page cache:  dropped before each server ($( ((DROP_CACHES)) && echo 'test file, then sync; echo 3 > /proc/sys/vm/drop_caches' || echo 'test file only: not root'))"
    echo "fio:         $(fio --version), ioengine=nbd, runtime ${RUNTIME}s + ramp ${RAMP}s per job, $ROUNDS round(s), $PICK of rounds"
} >"$RUN/machine.txt"

# ---- the runs ------------------------------------------------------------------------
# tag rw bs iodepth
JOBS=(
    "seq-write write 4M 4"
    "seq-read read 4M 4"
    "rand-write-qd1 randwrite 4k 1"
    "rand-read-qd1 randread 4k 1"
    "rand-write-qd32 randwrite 4k 32"
    "rand-read-qd32 randread 4k 32"
)

run_job() {
    local round=$1 server=$2 tag=$3 rw=$4 bs=$5 qd=$6
    fio --name="$tag" --ioengine=nbd --uri="nbd+unix:///$EXPORT?socket=$SOCK" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" \
        --time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --norandommap=1 --randrepeat=1 \
        --output-format=json --output="$RUN/json/$round.$server.$tag.json" >/dev/null && return
    sleep 0.5
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "nbd-single: $server exited during fio $tag; the end of its log ($RUN/$SERVER_NAME.log):" >&2
        tail -8 "$RUN/$SERVER_NAME.log" >&2
    fi
    die "fio $tag against $server failed (see $RUN/json/$round.$server.$tag.json and $RUN/$SERVER_NAME.log)"
}

n=${#CONFIGS[@]}
for ((round = 1; round <= ROUNDS; round++)); do
    for ((i = 0; i < n; i++)); do
        # The starting configuration rotates from round to round, so none always goes
        # first, and even rounds run the list backwards, so none always follows the same
        # one (what ran before can still weigh on the disk and the page cache).
        if ((round % 2)); then k=$i; else k=$((n - 1 - i)); fi
        read -r id server mode <<<"${CONFIGS[$(((k + round - 1) % n))]}"
        note "round $round/$ROUNDS: $server, cache $mode"
        evict_cache
        start_server "$server" "$mode"
        for job in "${JOBS[@]}"; do
            # shellcheck disable=SC2086
            run_job "$round" "$id" $job
        done
        stop_server
    done
done
sed -i "s/AIO_MODE/$QEMU_AIO/" "$RUN/machine.txt"

# ---- the table -----------------------------------------------------------------------
echo
cat "$RUN/machine.txt"
echo
python3 - "$RUN" "$PICK" "$ROUNDS" <<'EOF' | tee "$RUN/results.md"
import json, statistics, sys
from pathlib import Path

run, pick, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# title, [(column, config id)]: the first column is tandemd, the ratio's numerator.
sections = [
    ("direct I/O (no host page cache)",
     [("tandemd --cache none", "tandemd-none"),
      ("qemu-nbd --cache=none", "qemu-nbd-none")]),
    ("host page cache",
     [("tandemd --cache writeback", "tandemd-wb"),
      ("qemu-nbd --cache=writeback", "qemu-nbd-wb"),
      ("nbdkit file", "nbdkit")]),
]
MiB = 1 << 20
# label, unit, job tag, direction, value from the job's read or write section
rows = [
    ("4 MiB seq write, QD4", "MiB/s", "seq-write", "write", "high", lambda s: s["bw_bytes"] / MiB),
    ("4 MiB seq read, QD4", "MiB/s", "seq-read", "read", "high", lambda s: s["bw_bytes"] / MiB),
    ("4 KiB rand write, QD1, mean", "µs", "rand-write-qd1", "write", "low", lambda s: s["clat_ns"]["mean"] / 1e3),
    ("4 KiB rand write, QD1, p99", "µs", "rand-write-qd1", "write", "low", lambda s: s["clat_ns"]["percentile"]["99.000000"] / 1e3),
    ("4 KiB rand read, QD1, mean", "µs", "rand-read-qd1", "read", "low", lambda s: s["clat_ns"]["mean"] / 1e3),
    ("4 KiB rand read, QD1, p99", "µs", "rand-read-qd1", "read", "low", lambda s: s["clat_ns"]["percentile"]["99.000000"] / 1e3),
    ("4 KiB rand write, QD32", "IOPS", "rand-write-qd32", "write", "high", lambda s: s["iops"]),
    ("4 KiB rand read, QD32", "IOPS", "rand-read-qd32", "read", "high", lambda s: s["iops"]),
]

def values(cid, tag, ddir, get):
    out = []
    for r in range(1, rounds + 1):
        job = json.loads((run / "json" / f"{r}.{cid}.{tag}.json").read_text())["jobs"][0]
        if job["error"]:
            sys.exit(f"{cid} {tag} round {r}: fio error {job['error']}")
        out.append(get(job[ddir]))
    return out

def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

def fmt_ratio(r):
    # Two decimals, unless rounding would print 1.00 for a ratio on the wrong side of 1.
    text = f"{r:.2f}"
    return f"{r:.3f}" if text == "1.00" and r != 1 else text

raw = []
for title, cols in sections:
    others = [c for c, _ in cols[1:]]
    ref_name = others[0].split()[0] if len(others) == 1 else "best other"
    print(f"### {title}")
    print()
    head = ("measurement", *[c for c, _ in cols], f"tandemd / {ref_name}", "target met")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 2) + [":---:"]) + "|")
    for label, unit, tag, ddir, better, get in rows:
        cells = {}
        for col, cid in cols:
            vs = values(cid, tag, ddir, get)
            if pick == "median":
                cells[col] = statistics.median(vs)
            else:
                cells[col] = max(vs) if better == "high" else min(vs)
            raw.append((title, label, col, vs))
        refs = [cells[c] for c in others]
        ref = max(refs) if better == "high" else min(refs)
        ratio = cells[cols[0][0]] / ref if ref else float("nan")
        met = ratio >= 1 if better == "high" else ratio <= 1
        print("| " + " | ".join((f"{label} ({unit})", *[fmt(cells[c]) for c, _ in cols],
                                 fmt_ratio(ratio), "yes" if met else "**no**")) + " |")
    print()
    if len(others) == 1:
        print(f"Ratio: tandemd / {ref_name}. Throughput and IOPS rows: ≥ 1.00 meets the "
              "target (tandemd at least as fast); latency rows (µs): ≤ 1.00 meets it "
              "(tandemd at least as quick).")
    else:
        print("Ratio: tandemd / best other. Throughput and IOPS rows: tandemd divided by the "
              "faster of the others, ≥ 1.00 meets the target; latency rows (µs): tandemd "
              "divided by the quicker of the others, ≤ 1.00 meets it.")
    print()
if rounds > 1:
    print(f"Every round ({pick} shown above):")
    for title, label, col, vs in raw:
        print(f"  {label:28} {col:27} " + "  ".join(fmt(v) for v in vs))
EOF

# ---- server health -------------------------------------------------------------------
echo
problems=$(grep -cE '\b(WARN|ERROR)\b' "$RUN/tandemd.log" || true)
if ((problems > 0 || TANDEMD_BAD_EXITS > 0)); then
    echo "tandemd: $problems warning/error line(s) in its log, $TANDEMD_BAD_EXITS unclean exit(s):"
    grep -E '\b(WARN|ERROR)\b' "$RUN/tandemd.log" | head -20
else
    echo "tandemd: no warnings or errors in its log; every stop was clean."
fi
for s in qemu-nbd nbdkit; do
    if [[ -f $RUN/$s.log ]] && grep -qv '^---- start' "$RUN/$s.log"; then
        echo "$s wrote to stderr (see $RUN/$s.log):"
        grep -v '^---- start' "$RUN/$s.log" | head -5
    fi
done
echo "load avg:    $(cut -d' ' -f1-3 /proc/loadavg) (at end)"
echo "Logs and fio JSON: $RUN"
