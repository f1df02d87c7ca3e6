#!/usr/bin/env bash
# XCP-ng plugin benchmark: three tandemd on loopback (the controller on the first), their
# pools on one xfs file system (reflink) on a loop device, the plugins installed for each
# node (`tandem xapi install`), and an SR of 2 replicas. ROUNDS times, a VDI's life is
# run through the entry points exactly as xapi-storage-script runs them (a process per
# call, JSON on stdin): Volume.create (SIZE), Volume.set, Volume.snapshot, Volume.clone,
# Datapath.attach + activate on a node without a replica of it, deactivate + detach,
# Volume.stat, SR.stat, SR.ls, Volume.resize, Volume.destroy of the clone, the snapshot
# and the volume. Each call's wall time is recorded; the table gives median and p99 per
# method. Target (the plugin issue): < 200 ms for each but Volume.resize.
#
# Environment:
#   ROUNDS     VDI lives [20]
#   SIZE       VDI size in bytes [1073741824]
#   BENCH_DIR  work directory, disk-backed [/var/tmp/tandem-xapi]
#   BASE_PORT  first of the 9 loopback ports used [4910]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib/cluster.sh
source "$REPO/bench/lib/cluster.sh"
ROUNDS=${ROUNDS:-20}
SIZE=${SIZE:-1073741824}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-xapi}
BASE_PORT=${BASE_PORT:-4910}

die() { echo "xapi: $*" >&2; exit 1; }
((EUID == 0)) || die "needs root (a loop device and a mount)"
for tool in mkfs.xfs python3 curl; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: xfsprogs python3 curl)"
done
[[ $BENCH_DIR != *tandemd* ]] || die "BENCH_DIR must not contain \"tandemd\""

cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p tandemd -p tandem-cli
TANDEM="$REPO/target/release/tandem"

bench_on_xfs xapi
cp "$REPO/target/release/tandemd" "$BENCH_DIR/tnode-xapi"
xfs_on_loop "$BENCH_DIR/xfs.img" "$MNT" 20G
start_three "$BENCH_DIR/tnode-xapi" "$BENCH_DIR" "$BASE_PORT" "$MNT"
for i in 0 1 2; do
    "$TANDEM" xapi install --root "$BENCH_DIR/xapi/n$((i + 1))" --api "http://$(api $i)" \
        --host-uuid "host-n$((i + 1))" >/dev/null
done

{
    echo "date:        $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel:      $(uname -srm)"
    echo "cpus:        $(nproc) x $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "pools:       xfs (reflink) on a loop device (direct I/O), 3 nodes on loopback"
    echo "tandemd:     $("$BENCH_DIR/tnode-xapi" --version); repo HEAD $(git -C "$REPO" rev-parse --short HEAD)"
    echo "VDIs:        $ROUNDS lives of $SIZE bytes, SR of 2 replicas"
} | tee "$BENCH_DIR/machine.txt"
echo
python3 - "$BENCH_DIR" "$ROUNDS" "$SIZE" "$TANDEM" <<'PY' | tee "$BENCH_DIR/results.md"
import json, statistics, subprocess, sys, time
from pathlib import Path

run, rounds, size, tandem = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
SR = "7e1c2b30-0000-4000-8000-000000000001"
times = {}

def call(node, method, params, timed=None):
    plugin = "datapath/tandem" if method.startswith("Datapath.") else "volume/org.xen.xapi.storage.tandem"
    path = run / "xapi" / f"n{node + 1}" / plugin / method
    t0 = time.monotonic()
    out = subprocess.run([str(path), "--json"], input=json.dumps({**params, "dbg": "bench"}),
                         capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if out.returncode != 0:
        sys.exit(f"{method} failed: {out.stdout} {out.stderr}")
    times.setdefault(timed or method, []).append(elapsed)
    return json.loads(out.stdout)

config = call(0, "SR.create", {"uuid": SR, "configuration": {"replicas": "2"}, "name": "bench", "description": ""})
for n in range(3):
    call(n, "SR.attach", {"configuration": config})
volumes = lambda: json.loads(subprocess.run([tandem, "-o", "json", "volume", "list"], capture_output=True, text=True, check=True).stdout)
for _ in range(rounds):
    v = call(0, "Volume.create", {"sr": SR, "name": "d", "description": "", "size": size, "sharable": False})
    key = v["key"]
    call(0, "Volume.set", {"sr": SR, "key": key, "k": "vdi-type", "v": "user"})
    s = call(0, "Volume.snapshot", {"sr": SR, "key": key})
    c = call(0, "Volume.clone", {"sr": SR, "key": s["key"]})
    info = next(x for x in volumes() if x["name"] == key)
    diskful = {p["node"] for p in info["participants"] if p["kind"] == "diskful"}
    x = next(i for i in range(3) if f"n{i + 1}" not in diskful)
    dp = {"uri": v["uri"][0], "domain": "1"}
    t0 = time.monotonic()
    call(x, "Datapath.attach", dp)
    call(x, "Datapath.activate", dp)
    times.setdefault("Datapath.attach + activate", []).append(time.monotonic() - t0)
    t0 = time.monotonic()
    call(x, "Datapath.deactivate", dp)
    call(x, "Datapath.detach", dp)
    times.setdefault("Datapath.deactivate + detach", []).append(time.monotonic() - t0)
    call(1, "Volume.stat", {"sr": SR, "key": key})
    call(1, "SR.stat", {"sr": SR})
    call(2, "SR.ls", {"sr": SR})
    call(0, "Volume.resize", {"sr": SR, "key": key, "new_size": size * 2})
    call(0, "Volume.destroy", {"sr": SR, "key": c["key"]}, "Volume.destroy (clone)")
    call(0, "Volume.destroy", {"sr": SR, "key": s["key"]}, "Volume.destroy (snapshot)")
    call(0, "Volume.destroy", {"sr": SR, "key": key}, "Volume.destroy (volume)")

def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]

print("| call | calls | median ms | p99 ms | target | met |")
print("|---|---:|---:|---:|:---:|:---:|")
order = ["Volume.create", "Volume.set", "Volume.snapshot", "Volume.clone", "Datapath.attach + activate",
         "Datapath.deactivate + detach", "Volume.stat", "SR.stat", "SR.ls", "Volume.resize",
         "Volume.destroy (clone)", "Volume.destroy (snapshot)", "Volume.destroy (volume)"]
for name in order:
    xs = times[name]
    target = name != "Volume.resize"
    met = "yes" if p99(xs) < 0.2 else "**no**"
    print(f"| {name} | {len(xs)} | {statistics.median(xs) * 1000:.0f} | {p99(xs) * 1000:.0f} | "
          f"{'< 200 ms' if target else '-'} | {met if target else '-'} |")
PY
