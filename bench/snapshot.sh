#!/usr/bin/env bash
# Snapshot benchmark: three tandemd on loopback (the controller on the first), their
# pools on one xfs file system with reflink on a loop device, 2-replica volumes attached
# on n1 and driven with fio's nbd engine. It measures:
#   - copy on write: 4 KiB random writes at QD32 for RUNTIME s right before and right
#     after a snapshot (every first write to a block after it is a copy on write);
#   - the pause: the same writes for 3 × RUNTIME s with `tandem snapshot create` in the
#     middle: the longest write in the second around the command against the longest
#     in the rest of the run, the time new writes were held back (the answer's
#     paused-us) and the command's own wall time;
#   - incremental backup: a BACKUP_SIZE volume written in full, snapshot s1, 1 % of it
#     rewritten at random in 4 KiB pieces (the worst case: every piece is its own read
#     and write), snapshot s2, 1 % rewritten in 64 KiB pieces, snapshot s3; for each of
#     s2 and s3, a full `nbdcopy --flush` of the snapshot against `tools/tandem-backup
#     incremental` since the one before (into a reflinked copy of that one's full backup,
#     fsynced): bytes copied and time;
#   - many snapshots: MANY snapshots of a 64 MiB volume written once, one command after
#     the other, then `tandem snapshot list` of them (the design asks for 1000 a volume).
# Targets (DESIGN): pause < 50 ms; incremental bytes ≤ 1.1 × changed, time ≤ 5 % of
# the full copy. Figures in docs/benchmarks.md.
#
# It stops only the processes it started, by PID, runs a private copy of the binary
# ($BENCH_DIR/tnode-snap), and unmounts and removes what it made, on failure too.
#
# Environment:
#   RUNTIME      seconds of each random-write job [6]
#   SIZE         size of the volume of the write jobs [1G]
#   BACKUP_SIZE  size of the volume of the backup measurement [4G]
#   MANY         snapshots taken one after the other of a 64 MiB volume [1000]
#   BENCH_DIR    work directory, disk-backed (not tmpfs) [/var/tmp/tandem-snap]
#   BASE_PORT    first of the 9 loopback ports used [4890]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib/cluster.sh
source "$REPO/bench/lib/cluster.sh"
RUNTIME=${RUNTIME:-6}
SIZE=${SIZE:-1G}
BACKUP_SIZE=${BACKUP_SIZE:-4G}
MANY=${MANY:-1000}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-snap}
BASE_PORT=${BASE_PORT:-4890}

die() { echo "snapshot: $*" >&2; exit 1; }
note() { echo "== $(date +%T) $*" >&2; }
((EUID == 0)) || die "needs root (a loop device and a mount)"
for tool in fio nbdcopy mkfs.xfs python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: fio libnbd-bin xfsprogs python3 curl)"
done
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds"
[[ $BENCH_DIR != *tandemd* ]] || die "BENCH_DIR must not contain \"tandemd\""

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p tandemd -p tandem-cli
TANDEM="$REPO/target/release/tandem"
BACKUP="$REPO/tools/tandem-backup"

bench_on_xfs snapshot
mkdir -p "$BENCH_DIR/json"
RUN=$BENCH_DIR
cp "$REPO/target/release/tandemd" "$BENCH_DIR/tnode-snap"
xfs_on_loop "$BENCH_DIR/xfs.img" "$MNT" 40G
start_three "$BENCH_DIR/tnode-snap" "$BENCH_DIR" "$BASE_PORT" "$MNT"

# volume NAME SIZE: a 2-replica volume with replicas on n1 and n2, attached on n1.
"$TANDEM" group create pair --nodes n1,n2 >/dev/null
volume() {
    "$TANDEM" volume create "$1" --size "$2" --group pair >/dev/null
    for _ in $(seq 600); do
        [[ $("$TANDEM" -o json volume show "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])') == UpToDate ]] && break
        sleep 0.1
    done
    "$TANDEM" volume attach "$1" --node n1 >/dev/null
}
uri() { echo "nbd+unix:///$1?socket=$BENCH_DIR/n1.sock"; }
fio_job() { # TAG VOLUME fio-options...
    local tag=$1 vol=$2; shift 2
    fio --name="$tag" --ioengine=nbd --uri="$(uri "$vol")" "$@" \
        --output-format=json --output="$RUN/json/$tag.json" >/dev/null
}
now() { date +%s.%N; }
elapsed() { python3 -c 'import sys; print(f"{float(sys.argv[2]) - float(sys.argv[1]):.3f}")' "$1" "$2"; }

# ---- copy on write and the pause -----------------------------------------------------
note "volume w ($SIZE): prefill"
volume w "$SIZE"
fio_job prefill w --rw=write --bs=4M --iodepth=4
RANDW=(--rw=randwrite --bs=4k --iodepth=32 --norandommap=1 --randrepeat=1 --time_based=1)
note "random writes before a snapshot"
fio_job before w "${RANDW[@]}" --runtime="$RUNTIME"
"$TANDEM" snapshot create w cow >/dev/null
note "random writes right after a snapshot"
fio_job after w "${RANDW[@]}" --runtime="$RUNTIME"
note "random writes for $((3 * RUNTIME)) s, a snapshot after $RUNTIME s"
fio_start=$(now)
fio_job pause w "${RANDW[@]}" --runtime=$((3 * RUNTIME)) --write_lat_log="$RUN/pause" --log_avg_msec=0 &
FIO=$!
sleep "$RUNTIME"
cmd_start=$(now)
"$TANDEM" -o json snapshot create w during >"$RUN/json/during.json"
cmd_end=$(now)
wait "$FIO" || die "fio failed while the snapshot was taken"
python3 -c "import sys; s = float(sys.argv[1]); print(float(sys.argv[2]) - s, float(sys.argv[3]) - s)" \
    "$fio_start" "$cmd_start" "$cmd_end" >"$RUN/pause-times.txt"

# ---- many snapshots ------------------------------------------------------------------
note "volume m (64M): $MANY snapshots, one after the other"
volume m 64M
fio_job mprefill m --rw=write --bs=4M --iodepth=4
k0=$(now)
for i in $(seq "$MANY"); do "$TANDEM" snapshot create m "s$i" >/dev/null; done
k1=$(now)
LISTED=$("$TANDEM" -o json snapshot list m | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
k2=$(now)
echo "$k0 $k1 $k2 $LISTED" >"$RUN/many-times.txt"

# ---- incremental backup --------------------------------------------------------------
BYTES=$(numfmt --from=iec "$BACKUP_SIZE")
CHANGED=$((BYTES / 100 / 65536 * 65536))
note "volume b ($BACKUP_SIZE): prefill, s1, 1 % rewritten in 4 KiB pieces, s2, 1 % in 64 KiB pieces, s3"
volume b "$BACKUP_SIZE"
fio_job bprefill b --rw=write --bs=4M --iodepth=4
"$TANDEM" snapshot create b s1 >/dev/null
fio_job change4k b --rw=randwrite --bs=4k --iodepth=32 --io_size="$CHANGED" --randrepeat=0
"$TANDEM" snapshot create b s2 >/dev/null
fio_job change64k b --rw=randwrite --bs=64k --iodepth=32 --io_size="$CHANGED" --randrepeat=0
"$TANDEM" snapshot create b s3 >/dev/null
# full SNAPSHOT: nbdcopy of it into $MNT/SNAPSHOT.raw, durable; prints its seconds.
full() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    local t0 t1
    t0=$(now)
    nbdcopy --flush "$(uri "b@$1")" "$MNT/$1.raw"
    t1=$(now)
    elapsed "$t0" "$t1"
}
# incremental SNAPSHOT OLDER: the backup of OLDER brought up to SNAPSHOT, compared with
# the full backup of SNAPSHOT; prints its seconds and the bytes it copied.
incremental() {
    cp --reflink=always "$MNT/$2.raw" "$MNT/inc-$1.raw"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    local t0 t1
    t0=$(now)
    "$BACKUP" incremental "$(uri "b@$1")" --since "$2" "$MNT/inc-$1.raw" >"$RUN/incremental-$1.txt"
    t1=$(now)
    cmp "$MNT/$1.raw" "$MNT/inc-$1.raw" || die "the incremental backup of $1 differs from its full one"
    echo "$(elapsed "$t0" "$t1") $(sed 's/.*copied \([0-9]*\) of.*/\1/' "$RUN/incremental-$1.txt")"
}
note "full backups of b@s1, b@s2 and b@s3 (nbdcopy --flush)"
full s1 >/dev/null
FULL2=$(full s2)
FULL3=$(full s3)
note "incremental backups: s2 since s1, s3 since s2 (tools/tandem-backup)"
INC2=$(incremental s2 s1)
INC3=$(incremental s3 s2)
note "the changes alone (nbdinfo --map=qemu:dirty-bitmap:s1)"
m0=$(now)
nbdinfo --map=qemu:dirty-bitmap:s1 "$(uri b@s2)" >"$RUN/map.txt"
m1=$(now)
# What the 4 KiB case is bound by: reading 4 KiB pieces at random.
note "4 KiB random reads of b@s2 at QD32, for reference"
fio_job randread b@s2 --rw=randread --bs=4k --iodepth=32 --time_based=1 --runtime=3 --readonly
echo "$CHANGED $FULL2 $INC2 $FULL3 $INC3 $m0 $m1" >"$RUN/backup-times.txt"

# ---- the tables ----------------------------------------------------------------------
{
    echo "date:        $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel:      $(uname -srm)"
    echo "cpus:        $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "pools:       xfs (reflink) on a loop device (direct I/O) over $(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ') ($BENCH_DIR)"
    echo "tandemd:     $("$BENCH_DIR/tnode-snap" --version), --cache none; repo HEAD $(git -C "$REPO" rev-parse --short HEAD)"
    echo "volumes:     w $SIZE, b $BACKUP_SIZE, 2 replicas (n1, n2) + tiebreaker (n3), on loopback; fio $(fio --version | sed 's/^fio-//')"
} >"$RUN/machine.txt"
cat "$RUN/machine.txt"
echo
python3 - "$RUN" <<'EOF' | tee "$RUN/results.md"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
job = lambda tag: json.loads((run / "json" / f"{tag}.json").read_text())["jobs"][0]["write"]
before, after = job("before")["iops"], job("after")["iops"]
cmd_start, cmd_end = (float(x) for x in (run / "pause-times.txt").read_text().split())
around, elsewhere = 0, 0
for path in run.glob("pause_clat.*.log"):
    for line in path.read_text().splitlines():
        ms, ns = (int(x) for x in line.split(",")[:2])
        t = ms / 1000
        if cmd_start - 0.5 <= t <= cmd_end + 0.5:
            around = max(around, ns)
        else:
            elsewhere = max(elsewhere, ns)
taken = json.loads((run / "json" / "during.json").read_text())
paused_ms = taken["paused-us"] / 1000
print(f"4 KiB random writes at QD32: {before:,.0f} IOPS before a snapshot, {after:,.0f} right after it "
      f"(copy on write: {after / before:.2f} of the rate)")
print(f"Snapshot under that load: writes held back {paused_ms:.1f} ms (replicas: {', '.join(taken['replicas'])}); "
      f"`tandem snapshot create` took {(cmd_end - cmd_start) * 1000:.0f} ms (the replicas fill the snapshot "
      f"meanwhile, writes going on); longest write from 0.5 s before the command to 0.5 s after it "
      f"{around / 1e6:.1f} ms, elsewhere in the run {elsewhere / 1e6:.1f} ms")
changed, full2, inc2, copied2, full3, inc3, copied3, m0, m1 = (
    float(x) for x in (run / "backup-times.txt").read_text().split())
randread = json.loads((run / "json" / "randread.json").read_text())["jobs"][0]["read"]["iops"]
print(f"Backups of a {changed * 100 / (1 << 30):.0f} GiB volume with 1 % of it ({changed / (1 << 20):.1f} MiB) "
      f"changed, each durable when done: in 4 KiB pieces, full nbdcopy {full2:.2f} s, incremental {inc2:.2f} s "
      f"copying {copied2 / (1 << 20):.1f} MiB ({copied2 / 4096 / inc2:,.0f} pieces a second; fio reads "
      f"{randread:,.0f} 4 KiB pieces a second at random from the same export at QD32); in 64 KiB pieces, "
      f"full {full3:.2f} s, incremental {inc3:.2f} s copying {copied3 / (1 << 20):.1f} MiB; the map of the "
      f"4 KiB changes alone (nbdinfo) {m1 - m0:.2f} s")
k0, k1, k2, listed = (float(x) for x in (run / "many-times.txt").read_text().split())
print(f"{listed:,.0f} snapshots of a 64 MiB volume, one command after the other: {k1 - k0:.1f} s "
      f"({(k1 - k0) / listed * 1000:.0f} ms each); `tandem snapshot list` of them in {k2 - k1:.2f} s")
print()
print("| target | measured | reference | ratio | target | met |")
print("|---|---:|---:|---:|:---:|:---:|")
for name, a, b, unit, op, limit in [
    ("writes held back by a snapshot / 50 ms", paused_ms, 50.0, "ms", "<=", 1.0),
    ("incremental bytes / changed bytes, 4 KiB pieces", copied2 / (1 << 20), changed / (1 << 20), "MiB", "<=", 1.1),
    ("incremental time / full copy time, 4 KiB pieces", inc2, full2, "s", "<=", 0.05),
    ("incremental bytes / changed bytes, 64 KiB pieces", copied3 / (1 << 20), changed / (1 << 20), "MiB", "<=", 1.1),
    ("incremental time / full copy time, 64 KiB pieces", inc3, full3, "s", "<=", 0.05),
]:
    r = a / b
    met = r >= limit if op == ">=" else r <= limit
    print(f"| {name} | {a:,.2f} {unit} | {b:,.2f} {unit} | {r:.3f} | {'≥' if op == '>=' else '≤'} {limit:.2f} | {'yes' if met else '**no**'} |")
EOF
