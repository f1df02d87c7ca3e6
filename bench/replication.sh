#!/usr/bin/env bash
# Replication benchmark: tandemd volumes replicated between hosts that are Linux network
# namespaces joined by veth links limited with tc tbf, driven by fio's nbd engine on
# host A. It measures:
#   - the link: iperf3 from A to B on the A-B link;
#   - three configurations, fio on A: "1 replica (local)" (A diskful, alone),
#     "2 replicas" (A and B diskful, C tiebreaker), "diskless host" (A diskless, B and C
#     diskful), each with the six jobs of bench/nbd-single.sh;
#   - a pulled cable: with the 2-replica volume, A writes 4 MiB blocks at depth 4 while
#     B's links go down (no reset reaches anyone) for CUT_FOR seconds: the longest write
#     (target: at most 6 s, the dead-peer timeout and its tick) and A's write rate while
#     B is out (target: the 1-replica rate, measured by the same 4 MiB QD4 write on the
#     1-replica volume, over the same seconds of a job as long), then B's resync;
#   - idle resync: with the 2-replica volume, B is stopped, RESYNC_SIZE is written on A,
#     B is started again, and A's status is followed until B is UpToDate again;
#   - on loopback (root namespace, no limit): 4 KiB depth-1 write latency of a 2-replica
#     volume against a 1-replica volume, and their 4 MiB sequential reads, alternated.
# and prints the ratios the design's targets are about. See docs/benchmarks.md.
# Checks on the way, reported with the tables: an online verify after the resync (a
# against b) and after the diskless-host jobs (b against c); whether node A lost a peer
# holding data during a measured job (such cells are marked †); how much of each
# replica's data file sits in the page cache after the 2-replica prefill; the warnings,
# errors and resyncs in the node logs; every node must exit 0 on SIGTERM.
#
#   topology (default NET; full mesh of point-to-point links, each limited to LINK both ways):
#
#      A 10.77.200.101 ---- to-b/to-a ---- B 10.77.200.102
#            \                              /
#           to-c/to-a                 to-c/to-b
#                \                        /
#                  C 10.77.200.103 ------
#
#   Each host's address sits on its loopback (/32) and is routed over the direct link
#   to each other host, so A-B traffic only ever crosses the A-B link. The test subnet
#   exists only inside the namespaces (trepl-<pid>-a|b|c); the root namespace is not
#   touched, except by the loopback part, which uses 127.0.0.1 and free ports.
#
# Other people may run tandemd on the same machine. This script stops only the processes
# it started, by PID, never by name, and runs a private copy of the binary,
# $BENCH_DIR/tnode-repl, whose name does not contain "tandemd" (keep "tandemd" out of
# BENCH_DIR too). Everything it started or created is stopped or removed on exit,
# failure and Ctrl-C included.
#
# Environment:
#   TANDEMD      tandemd binary [target/release/tandemd under the repo]
#   RUNTIME      seconds measured per fio job [10]
#   RAMP         seconds of warm-up per fio job, not measured [1]
#   LINK         tc rate of every link, both directions [2gbit]; keep it below the disk's speed
#   SIZE         volume size, and the size fio jobs cover [1G]; a multiple of 4 MiB
#   RESYNC_SIZE  bytes written while B is down, for the resync measurement [512M]
#   JOB_ROUNDS   runs of each job in each configuration, back to back (best is shown) [2]
#   LAT_ROUNDS   rounds of the loopback comparisons (best of them is shown) [2]
#   QUORUM       quorum option of the volumes: majority or off [majority]
#   CUT_AT       seconds of writing before B's cables are pulled [5]
#   CUT_FOR      seconds B stays cut off [20]; 0 skips the cable pull
#   IPERF_TIME   seconds of the iperf3 link measurement [5]
#   BENCH_DIR    work directory, disk-backed (not tmpfs) [/var/tmp/tandem-repl]
#   NET          first three octets of the namespaces' private subnet [10.77.200]
#   KEEP_DATA=1  keep the volumes' data directories after the run
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-1}
LINK=${LINK:-2gbit}
SIZE_ARG=${SIZE:-1G}
RESYNC_ARG=${RESYNC_SIZE:-512M}
JOB_ROUNDS=${JOB_ROUNDS:-2}
LAT_ROUNDS=${LAT_ROUNDS:-2}
QUORUM=${QUORUM:-majority}
CUT_AT=${CUT_AT:-5}
CUT_FOR=${CUT_FOR:-20}
IPERF_TIME=${IPERF_TIME:-5}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-repl}
NET=${NET:-10.77.200}
KEEP_DATA=${KEEP_DATA:-0}
# tbf: a 1 MB bucket lets the rate be reached with the kernel's timer granularity (at
# 2gbit, 1 MB is 4 ms of traffic); the queue holds at most 10 ms more.
TBF_BURST=1mb
TBF_LATENCY=10ms

die() { echo "replication: $*" >&2; exit 1; }
note() { echo "== $(date +%T) $*" >&2; }

[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive number of seconds"
[[ $RAMP =~ ^[0-9]+$ ]] || die "RAMP must be a number of seconds"
[[ $LAT_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "LAT_ROUNDS must be a positive integer"
[[ $IPERF_TIME =~ ^[1-9][0-9]*$ ]] || die "IPERF_TIME must be a positive number of seconds"
[[ $QUORUM == majority || $QUORUM == off ]] || die "QUORUM must be majority or off"
[[ $CUT_AT =~ ^[1-9][0-9]*$ && $CUT_FOR =~ ^[0-9]+$ ]] || die "CUT_AT must be a positive number of seconds, CUT_FOR a number of seconds"
[[ $LINK =~ ^[0-9]+(\.[0-9]+)?[kmg]?bit$ ]] || die "LINK must be a tc rate such as 2gbit or 500mbit"
[[ $NET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "NET must be three octets, e.g. 10.77.200"
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || die "SIZE=$SIZE_ARG is not a size (e.g. 1G, 512M)"
RESYNC_BYTES=$(numfmt --from=iec "$RESYNC_ARG" 2>/dev/null) || die "RESYNC_SIZE=$RESYNC_ARG is not a size"
((SIZE >= 64 << 20 && SIZE % (4 << 20) == 0)) || die "SIZE must be at least 64M and a multiple of 4M"
((RESYNC_BYTES % (4 << 20) == 0 && RESYNC_BYTES > 0)) || die "RESYNC_SIZE must be a positive multiple of 4M"
((RESYNC_BYTES <= SIZE)) || RESYNC_BYTES=$SIZE

# ---- tools ---------------------------------------------------------------------------
((EUID == 0)) || die "needs root (network namespaces, tc)"
for tool in ip tc fio iperf3 python3 curl numfmt; do
    command -v "$tool" >/dev/null || die "$tool is not installed (Debian: apt-get install iproute2 fio iperf3 python3 curl)"
done
fio --enghelp 2>/dev/null | grep -qw nbd ||
    die "this fio has no nbd engine (fio --enghelp does not list it); install a fio built with libnbd"

TANDEMD=${TANDEMD:-$REPO/target/release/tandemd}
[[ -x $TANDEMD ]] || die "TANDEMD=$TANDEMD is not an executable file (build it: cargo build --release -p tandemd)"
TANDEMD=$(cd "$(dirname "$TANDEMD")" && pwd)/$(basename "$TANDEMD")
TANDEMD_SRC=$TANDEMD

# ---- work directory ------------------------------------------------------------------
mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
[[ $BENCH_DIR != *tandemd* ]] || die "BENCH_DIR must not contain \"tandemd\" (pkill -f tandemd would match the servers)"
FSTYPE=$(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ')
FSDEV=$(df --output=source "$BENCH_DIR" | tail -1 | tr -d ' ')
[[ $FSTYPE != tmpfs ]] || die "$BENCH_DIR is on tmpfs; set BENCH_DIR to a disk-backed directory"

# The private copy (copied then renamed: an old copy may still be running elsewhere).
TNODE=$BENCH_DIR/tnode-repl
cp "$TANDEMD_SRC" "$TNODE.tmp"
mv -f "$TNODE.tmp" "$TNODE"

DATA=$BENCH_DIR/data     # data directories of the nodes, one per node and part
RUN=$BENCH_DIR/last-run  # logs, fio and iperf3 JSON, results
rm -rf "$RUN" "$DATA"
mkdir -p "$RUN/json" "$DATA"

# ---- processes, namespaces, cleanup --------------------------------------------------
NS_PREFIX=trepl-$$
NAMESPACES=()                 # created by this script, deleted on exit
declare -A NODE_PID=()        # node -> PID of the running tnode-repl
declare -A NODE_NS=()         # node -> network namespace ("" = root namespace)
declare -A NODE_IP=()         # node -> address its API and peer listener bind
declare -A NODE_API=()        # node -> host:port of its API
declare -A NODE_PEER=()       # node -> host:port of its peer listener
declare -A NODE_DIR=()        # node -> data directory
declare -A NODE_LOG=()        # node -> log file
OTHER_PIDS=()                 # iperf3 server, resync poller
BAD_EXITS=0
PART=setup                    # the part of the run, prefix of the node logs
DATA_PEERS=                   # regex: nodes that hold data for the node running fio

stop_pid() {
    local pid=$1 secs=${2:-40} rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "replication: PID $pid did not stop within $secs s of SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return $rc
}

cleanup() {
    local rc=$? n pid
    trap - EXIT INT TERM
    for n in "${!NODE_PID[@]}"; do
        pid=${NODE_PID[$n]}
        [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && { stop_pid "$pid" 10 || true; }
    done
    for pid in "${OTHER_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null && { stop_pid "$pid" 5 || true; }
    done
    for n in "${NAMESPACES[@]}"; do
        ip netns del "$n" 2>/dev/null || echo "replication: could not delete namespace $n" >&2
    done
    ((KEEP_DATA)) || rm -rf "$DATA"
    if ((rc != 0)); then
        echo "replication: failed (exit $rc); logs are in $RUN" >&2
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in node $1's namespace (or in the root namespace for loopback nodes).
in_node() {
    local n=$1; shift
    if [[ -n ${NODE_NS[$n]} ]]; then ip netns exec "${NODE_NS[$n]}" "$@"; else "$@"; fi
}

# api NODE METHOD PATH [JSON]: prints the answer; fails (with the answer) on HTTP errors.
api() {
    local n=$1 method=$2 path=$3 body=${4:-} out code
    local args=(-sS -X "$method" -o "$RUN/api.out" -w '%{http_code}' "http://${NODE_API[$n]}$path")
    [[ -n $body ]] && args+=(-H 'content-type: application/json' --data-binary "$body")
    code=$(in_node "$n" curl "${args[@]}") || { echo "replication: curl to node $n failed" >&2; return 1; }
    out=$(cat "$RUN/api.out")
    if [[ $code != 2* ]]; then
        echo "replication: $method $path on node $n answered $code: $out" >&2
        return 1
    fi
    printf '%s\n' "$out"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# define_node NAME NAMESPACE IP API_PORT PEER_PORT
define_node() {
    local n=$1
    NODE_NS[$n]=$2
    NODE_IP[$n]=$3
    NODE_API[$n]=$3:$4
    NODE_PEER[$n]=$3:$5
    NODE_DIR[$n]=$DATA/$n
    NODE_PID[$n]=
}

start_node() {
    local n=$1 log=$RUN/$PART-node-$1.log nbd
    NODE_LOG[$n]=$log
    mkdir -p "${NODE_DIR[$n]}"
    if [[ -n ${NODE_NS[$n]} ]]; then nbd=${NODE_IP[$n]}:10809; else nbd=127.0.0.1:$(free_port); fi
    if in_node "$n" curl -s -o /dev/null "http://${NODE_API[$n]}/v1/node"; then
        die "something already answers on ${NODE_API[$n]}, where node $n is to listen"
    fi
    echo "---- start $(date +%T.%N)" >>"$log"
    # A simple command (no function, no subshell), so $! is the server itself: bash forks
    # and execs `ip`, and `ip netns exec` execs the server after entering the namespace.
    local wrap=()
    [[ -n ${NODE_NS[$n]} ]] && wrap=(ip netns exec "${NODE_NS[$n]}")
    NO_COLOR=1 "${wrap[@]}" "$TNODE" --name "$n" --data-dir "${NODE_DIR[$n]}" --cache none \
        --api-listen "${NODE_API[$n]}" --peer-listen "${NODE_PEER[$n]}" \
        --nbd-listen "$nbd" --nbd-socket "${NODE_DIR[$n]}/nbd.sock" 2>>"$log" &
    NODE_PID[$n]=$!
    for _ in $(seq 100); do
        kill -0 "${NODE_PID[$n]}" 2>/dev/null || { tail -5 "$log" >&2; die "node $n exited at start"; }
        in_node "$n" curl -sf -o /dev/null "http://${NODE_API[$n]}/v1/node" && return 0
        sleep 0.1
    done
    tail -20 "$log" >&2
    die "node $n does not answer on its API ${NODE_API[$n]}"
}

stop_node() {
    local n=$1 rc=0
    [[ -n ${NODE_PID[$n]} ]] || return 0
    stop_pid "${NODE_PID[$n]}" || rc=$?
    NODE_PID[$n]=
    if ((rc != 0)); then
        echo "replication: node $n exited with status $rc after SIGTERM (see ${NODE_LOG[$n]})" >&2
        BAD_EXITS=$((BAD_EXITS + 1))
    fi
    echo "---- stopped $(date +%T.%N) status $rc" >>"${NODE_LOG[$n]}"
}

hex128() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
CLUSTER_ID=$(hex128)

# make_spec VOLUME NODE:KIND... (node ids in the order given)
make_spec() {
    local vol=$1; shift
    local id=0 parts=() p n kind
    for p in "$@"; do
        n=${p%%:*} kind=${p#*:}
        parts+=("{\"node-id\":$id,\"node\":\"$n\",\"address\":\"${NODE_PEER[$n]}\",\"kind\":\"$kind\"}")
        id=$((id + 1))
    done
    local IFS=,
    echo "{\"cluster-id\":\"$CLUSTER_ID\",\"volume-id\":\"$(hex128)\",\"name\":\"$vol\",\"size\":$SIZE,\"participants\":[${parts[*]}],\"options\":{\"quorum\":\"$QUORUM\"}}"
}

# setup_volume VOLUME NODE:KIND...: PUTs the spec to every participant, then waits until
# every participant sees every peer Connected, and every diskful one Established and
# UpToDate.
setup_volume() {
    local vol=$1; shift
    local spec p n
    spec=$(make_spec "$vol" "$@")
    echo "$spec" >"$RUN/spec-$vol-$(date +%s%N).json"
    for p in "$@"; do
        api "${p%%:*}" PUT "/v1/node/volumes/$vol/spec" "$spec" >/dev/null || die "spec of $vol refused by ${p%%:*}"
    done
    wait_synced "$vol" "${@%%:*}"
    note "volume $vol: $(api "${1%%:*}" GET "/v1/node/volumes/$vol/status?format=text" | tr '\n' ' ')"
}

# wait_synced VOLUME NODE...: until each NODE sees every peer Connected, and every
# diskful one Established and UpToDate with nothing out of sync.
wait_synced() {
    local vol=$1 n p; shift
    for n in "$@"; do
        for i in $(seq 300); do
            api "$n" GET "/v1/node/volumes/$vol/status" >"$RUN/status.json" || die "no status of $vol on $n"
            python3 - "$RUN/status.json" <<'EOF' && continue 2
import json, sys
s = json.load(open(sys.argv[1]))
ok = s["disk"] in ("UpToDate", "Diskless") and all(
    p["connection"] == "Connected"
    and (p["kind"] != "diskful" or (p["replication"] == "Established" and p["disk"] == "UpToDate"
                                    and p["out-of-sync"] == 0))
    for p in s["peers"])
sys.exit(0 if ok else 1)
EOF
            sleep 0.1
        done
        api "$n" GET "/v1/node/volumes/$vol/status?format=text" >&2 || true
        for p in "$@"; do tail -5 "${NODE_LOG[$p]}" >&2; done
        die "volume $vol is not connected and in sync on node $n after 30 s"
    done
}

# fio_nbd NODE VOLUME TAG fio-options...: one fio job on node NODE's Unix socket.
fio_nbd() {
    local n=$1 vol=$2 tag=$3; shift 3
    in_node "$n" fio --name="$tag" --ioengine=nbd \
        --uri="nbd+unix:///$vol?socket=${NODE_DIR[$n]}/nbd.sock" \
        "$@" --output-format=json --output="$RUN/json/$tag.json" >/dev/null && return
    local m
    for m in "${!NODE_PID[@]}"; do
        [[ -n ${NODE_PID[$m]} ]] || continue
        if ! kill -0 "${NODE_PID[$m]}" 2>/dev/null; then
            echo "replication: node $m died; end of its log:" >&2
            tail -8 "${NODE_LOG[$m]}" >&2
        elif grep -qE '\b(WARN|ERROR)\b' "${NODE_LOG[$m]}"; then
            echo "replication: last warnings and errors of node $m:" >&2
            grep -E '\b(WARN|ERROR)\b' "${NODE_LOG[$m]}" | tail -6 >&2
        fi
    done
    die "fio $tag failed (see $RUN/json/$tag.json and $RUN/$PART-node-*.log)"
}

prefill() { # NODE VOLUME TAG: writes the whole volume once, so every read hits data
    fio_nbd "$1" "$2" "$3" --rw=write --bs=4M --iodepth=4 --size="$SIZE"
}

# A measured job must not lose a data peer: writes would then skip it. measured NODE
# VOLUME TAG fio-options... runs the job and, if the node's log shows that a peer in
# DATA_PEERS disconnected meanwhile, says so and records the job in disturbed.txt (the
# tables mark it).
measured() {
    local n=$1 vol=$2 tag=$3; shift 3
    local before new
    before=$(wc -l <"${NODE_LOG[$n]}")
    fio_nbd "$n" "$vol" "$tag" "$@"
    [[ -n $DATA_PEERS ]] || return 0
    new=$(tail -n +$((before + 1)) "${NODE_LOG[$n]}" |
        grep -E "peer disconnected.* peer=($DATA_PEERS)( |$)" || true)
    if [[ -n $new ]]; then
        echo "$tag" >>"$RUN/disturbed.txt"
        echo "replication: during $tag, node $n lost a peer holding data:" >&2
        echo "$new" >&2
    fi
}

# sustained_write NODE VOLUME TAG: 4 MiB writes at QD4 for the cut's whole length, the
# write rate logged every 100 ms to $RUN/TAG_bw.*.log (the cut and its reference).
sustained_write() {
    fio_nbd "$1" "$2" "$3" --rw=write --bs=4M --iodepth=4 --size="$SIZE" --time_based=1 \
        --runtime=$((CUT_AT + CUT_FOR + 5)) --write_bw_log="$RUN/$3" --log_avg_msec=100
}

# tag rw bs iodepth (the order matters: the writes come before the reads)
JOBS=(
    "seq-write write 4M 4"
    "seq-read read 4M 4"
    "rand-write-qd1 randwrite 4k 1"
    "rand-read-qd1 randread 4k 1"
    "rand-write-qd32 randwrite 4k 32"
    "rand-read-qd32 randread 4k 32"
)
# run_job NODE VOLUME TAG JOB: one measured run of JOB (an entry of JOBS).
run_job() {
    local n=$1 vol=$2 tag=$3 name rw bs qd
    read -r name rw bs qd <<<"$4"
    measured "$n" "$vol" "$tag" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" \
        --time_based=1 --runtime="$RUNTIME" --ramp_time="$RAMP" --norandommap=1 --randrepeat=1
}

# job_named NAME: the entry of JOBS with that name.
job_named() {
    local job
    for job in "${JOBS[@]}"; do
        [[ ${job%% *} == "$1" ]] && { echo "$job"; return; }
    done
    die "no job named $1"
}

# Each job runs JOB_ROUNDS times back to back (tags ROW.JOB.1, .2, ...): the disk's own
# speed swings between runs, and only the best run is compared.
run_jobs() { # NODE VOLUME ROW
    local n=$1 vol=$2 row=$3 job k
    for job in "${JOBS[@]}"; do
        for ((k = 1; k <= JOB_ROUNDS; k++)); do
            note "$row: ${job%% *} ($k/$JOB_ROUNDS)"
            run_job "$n" "$vol" "$row.${job%% *}.$k" "$job"
        done
    done
}

# ---- the network ---------------------------------------------------------------------
HOSTS=(a b c)
declare -A HOST_NUM=([a]=1 [b]=2 [c]=3)
for h in "${HOSTS[@]}"; do
    ns=$NS_PREFIX-$h
    ip netns add "$ns" || die "cannot create network namespace $ns"
    NAMESPACES+=("$ns")
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$NET.10${HOST_NUM[$h]}/32" dev lo
    define_node "$h" "$ns" "$NET.10${HOST_NUM[$h]}" 3370 7700
done
# link X Y BASE: a veth pair between hosts X and Y, X = NET.BASE+1/30, Y = NET.BASE+2/30,
# limited to LINK on both ends; host routes to each other's address over it.
link() {
    local x=$1 y=$2 base=$3 nsx=$NS_PREFIX-$1 nsy=$NS_PREFIX-$2
    ip link add "to-$y" netns "$nsx" type veth peer name "to-$x" netns "$nsy"
    ip -n "$nsx" addr add "$NET.$((base + 1))/30" dev "to-$y"
    ip -n "$nsy" addr add "$NET.$((base + 2))/30" dev "to-$x"
    ip -n "$nsx" link set "to-$y" up
    ip -n "$nsy" link set "to-$x" up
    tc -n "$nsx" qdisc add dev "to-$y" root tbf rate "$LINK" burst "$TBF_BURST" latency "$TBF_LATENCY"
    tc -n "$nsy" qdisc add dev "to-$x" root tbf rate "$LINK" burst "$TBF_BURST" latency "$TBF_LATENCY"
    ROUTES[$x]+="${NODE_IP[$y]}/32 via $NET.$((base + 2)) src ${NODE_IP[$x]};"
    ROUTES[$y]+="${NODE_IP[$x]}/32 via $NET.$((base + 1)) src ${NODE_IP[$y]};"
    add_routes "$x"
    add_routes "$y"
}
declare -A ROUTES=()  # host -> its routes to the other hosts, ";"-separated
# add_routes HOST: (re)installs HOST's routes (a link that went down lost its own).
add_routes() {
    local route
    IFS=';' read -ra route_list <<<"${ROUTES[$1]}"
    for route in "${route_list[@]}"; do
        # shellcheck disable=SC2086  # the route's words, split on purpose
        ip -n "$NS_PREFIX-$1" route replace $route
    done
}
note "network: namespaces $NS_PREFIX-{a,b,c}, links a-b, a-c, b-c at $LINK each way"
link a b 0
link a c 4
link b c 8
for pair in "a b" "a c" "b c"; do
    read -r x y <<<"$pair"
    ip -n "$NS_PREFIX-$x" route get "${NODE_IP[$y]}" | grep -q "dev to-$y" || die "no route from $x to $y over their link"
done

# ---- machine info --------------------------------------------------------------------
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
# The binary is not rebuilt here: say which commit it can be, by its modification time
# (a build may also include uncommitted changes of that moment).
BUILT_AT=$(date -u -r "$TANDEMD_SRC" '+%Y-%m-%d %H:%M:%S UTC')
COMMIT_AT_BUILD=$(TZ=UTC git -C "$REPO" log -1 --until="@$(stat -c %Y "$TANDEMD_SRC")" --format='%h (%cd)' --date=format-local:'%H:%M:%S' 2>/dev/null || echo '?')
OTHERS=$(ps -eo comm= | grep -cx tandemd || true)
{
    echo "date:        $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "kernel:      $(uname -srm)"
    echo "cpus:        $(nproc) x ${CPU_MODEL:-unknown}"
    echo "memory:      $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "bench dir:   $BENCH_DIR ($FSTYPE on $FSDEV)"
    echo "load avg:    $(cut -d' ' -f1-3 /proc/loadavg) (at start); other tandemd processes running: $OTHERS"
    echo "tandemd:     $("$TNODE" --version 2>/dev/null), --cache none ($TANDEMD_SRC, run as $TNODE)"
    echo "binary:      built $BUILT_AT; newest commit then: $COMMIT_AT_BUILD; repo HEAD now: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "links:       tc tbf rate $LINK burst $TBF_BURST latency $TBF_LATENCY on both ends of a-b, a-c, b-c"
    echo "volumes:     $SIZE bytes, quorum $QUORUM; fio $(fio --version | sed 's/^fio-//'), ioengine=nbd over the Unix socket, runtime ${RUNTIME}s + ramp ${RAMP}s per job"
    echo "iperf3:      $(iperf3 --version | head -1 | awk '{print $2}'), ${IPERF_TIME}s"
} >"$RUN/machine.txt"

# ---- link rate -----------------------------------------------------------------------
note "iperf3 a -> b (${IPERF_TIME}s)"
ip netns exec "$NS_PREFIX-b" iperf3 -s -1 -B "${NODE_IP[b]}" >"$RUN/iperf3-server.txt" 2>&1 &
OTHER_PIDS+=($!)
for _ in $(seq 50); do
    ip netns exec "$NS_PREFIX-b" ss -ltn "sport = :5201" | grep -q LISTEN && break
    sleep 0.1
done
ip netns exec "$NS_PREFIX-a" iperf3 -c "${NODE_IP[b]}" -t "$IPERF_TIME" -J >"$RUN/json/iperf3.json" ||
    die "iperf3 from a to b failed (see $RUN/json/iperf3.json)"
wait "${OTHER_PIDS[-1]}" 2>/dev/null || true

# ---- row 1: 1 replica (local) --------------------------------------------------------
note "row 1: 1 replica (a diskful, alone)"
PART=local DATA_PEERS=
start_node a
setup_volume vol a:diskful
prefill a vol local.prefill
run_jobs a vol local
# The cut's reference: the same sustained write, alone, as long as the cut's job, so its
# rate is compared over the same seconds of writing (a disk's rate sags as writing goes on).
if ((CUT_FOR > 0)); then
    note "1 replica: the cut's write, for its reference rate"
    sustained_write a vol local.sustained
fi
stop_node a
rm -rf "${NODE_DIR[a]}"

# ---- row 2: 2 replicas, then the idle resync -----------------------------------------
note "row 2: 2 replicas (a, b diskful; c tiebreaker)"
PART=repl2 DATA_PEERS=b
start_node a; start_node b; start_node c
setup_volume vol a:diskful b:diskful c:tiebreaker
prefill a vol repl2.prefill
# Which replicas went through the page cache: with --cache none, none should have.
if command -v fincore >/dev/null; then
    for n in a b; do
        echo "$n $(fincore -b -n -o RES "${NODE_DIR[$n]}/pools/default/vol.raw" | tr -d ' ')"
    done >"$RUN/pagecache-repl2.txt"
fi
run_jobs a vol repl2

# b's cables pulled while a streams 4 MiB writes at depth 4: b's ends of its links go
# down, so a's sockets to b hear nothing, not even a reset. fio logs its write rate every
# 100 ms; the times of the cut and the heal are taken relative to fio's start.
set_b_links() { # up|down
    ip -n "$NS_PREFIX-b" link set to-a "$1"
    ip -n "$NS_PREFIX-b" link set to-c "$1"
    [[ $1 == down ]] || add_routes b
}
if ((CUT_FOR > 0)); then
    note "cut: a writes 4 MiB blocks at QD4; b's links go down after ${CUT_AT}s, for ${CUT_FOR}s"
    fio_start=$(date +%s.%N)
    sustained_write a vol cut &
    CUT_FIO=$!
    sleep "$CUT_AT"
    set_b_links down
    cut_at=$(date +%s.%N)
    sleep "$CUT_FOR"
    set_b_links up
    heal_at=$(date +%s.%N)
    wait "$CUT_FIO" || die "fio failed while b was cut off: a write reached the client as an error"
    python3 -c "import sys; s = float(sys.argv[1]); print(float(sys.argv[2]) - s, float(sys.argv[3]) - s)" \
        "$fio_start" "$cut_at" "$heal_at" >"$RUN/cut-times.txt"
    note "cut: healed; waiting for b's resync"
    wait_synced vol a b
fi

note "resync: stopping b, writing $RESYNC_BYTES bytes on a"
api a GET /v1/node/volumes/vol/status >"$RUN/resync-status-0.json"
stop_node b
# b's connection: a sees it closed at once (b shuts down cleanly).
b_connection() {
    api a GET /v1/node/volumes/vol/status |
        python3 -c 'import json, sys; print(next(p["connection"] for p in json.load(sys.stdin)["peers"] if p["node"] == "b"))'
}
for _ in $(seq 100); do
    [[ $(b_connection) == Connected ]] || break
    sleep 0.1
done
[[ $(b_connection) != Connected ]] || die "a still sees b Connected 10 s after b stopped"
fio_nbd a vol resync.write --rw=write --bs=4M --iodepth=4 --size="$RESYNC_BYTES"
api a GET /v1/node/volumes/vol/status >"$RUN/resync-status-1.json"
# The poller runs in a's namespace and follows a's view of b: when b is Connected, and
# when b is Established, UpToDate and nothing is out of sync any more.
ip netns exec "${NODE_NS[a]}" python3 - "http://${NODE_API[a]}/v1/node/volumes/vol/status" >"$RUN/resync-poll.json" <<'EOF' &
import json, sys, time, urllib.request
url = sys.argv[1]
t0 = time.monotonic()
out = {"connected": None, "synced": None, "states": []}
while time.monotonic() - t0 < 600:
    try:
        s = json.load(urllib.request.urlopen(url, timeout=5))
    except Exception:
        time.sleep(0.02)
        continue
    t = time.monotonic() - t0
    b = next(p for p in s["peers"] if p["node"] == "b")
    state = (b["connection"], b["replication"], b["disk"])
    if not out["states"] or out["states"][-1][1:] != list(state):
        out["states"].append([round(t, 3), *state])
    if b["connection"] == "Connected" and out["connected"] is None:
        out["connected"] = t
    if (b["connection"], b["replication"], b["disk"]) == ("Connected", "Established", "UpToDate") \
            and b["out-of-sync"] == 0:
        out["synced"] = t
        out["status"] = s
        break
    time.sleep(0.02)
print(json.dumps(out))
EOF
POLLER=$!
OTHER_PIDS+=("$POLLER")
note "resync: starting b again"
start_node b
wait "$POLLER" || die "the resync poller failed"
grep -q '"synced": [0-9]' "$RUN/resync-poll.json" || die "b did not become UpToDate within 600 s (see $RUN/resync-poll.json)"
note "resync: done; online verify of a against b"
wait_synced vol a b
api a POST /v1/node/volumes/vol/verify >"$RUN/verify-repl2.json" || echo "replication: online verify failed" >&2
stop_node a; stop_node b; stop_node c
rm -rf "${NODE_DIR[a]}" "${NODE_DIR[b]}" "${NODE_DIR[c]}"

# ---- row 3: diskless host ------------------------------------------------------------
note "row 3: diskless host (a diskless; b, c diskful)"
PART=diskless DATA_PEERS='b|c'
start_node a; start_node b; start_node c
setup_volume vol a:diskless b:diskful c:diskful
prefill a vol diskless.prefill
run_jobs a vol diskless
note "diskless: online verify of b against c"
wait_synced vol b c
api b POST /v1/node/volumes/vol/verify >"$RUN/verify-diskless.json" || echo "replication: online verify failed" >&2
stop_node a; stop_node b; stop_node c
rm -rf "${NODE_DIR[a]}" "${NODE_DIR[b]}" "${NODE_DIR[c]}"

# ---- loopback latency ----------------------------------------------------------------
note "loopback: 1-replica volume 'one' and 2-replica volume 'two' on 127.0.0.1"
PART=loopback
define_node la "" 127.0.0.1 "$(free_port)" "$(free_port)"
define_node lb "" 127.0.0.1 "$(free_port)" "$(free_port)"
start_node la; start_node lb
setup_volume one la:diskful
setup_volume two la:diskful lb:diskful
prefill la one lo.one.prefill
prefill la two lo.two.prefill
# The depth-1 write latency, then the sequential read: the same local read path on both
# volumes, alternated in time, is the fair form of the "2 replicas seq read / 1 replica"
# comparison, which the configurations above measure minutes apart, at the mercy of the
# disk's swings between runs.
for ((r = 1; r <= LAT_ROUNDS; r++)); do
    if ((r % 2)); then order="one two"; else order="two one"; fi
    for name in rand-write-qd1 seq-read; do
        for vol in $order; do
            note "loopback round $r/$LAT_ROUNDS: $vol, $name"
            if [[ $vol == two ]]; then DATA_PEERS=lb; else DATA_PEERS=; fi
            run_job la "$vol" "lo.$vol.$r.$name" "$(job_named "$name")"
        done
    done
done
stop_node la; stop_node lb

# ---- the tables ----------------------------------------------------------------------
echo
cat "$RUN/machine.txt"
echo
python3 - "$RUN" "$LINK" "$LAT_ROUNDS" "$RESYNC_BYTES" "$JOB_ROUNDS" "$CUT_FOR" <<'EOF' | tee "$RUN/results.md"
import json, re, sys
from pathlib import Path

run, link, lat_rounds, resync_bytes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
job_rounds, cut_for = int(sys.argv[5]), int(sys.argv[6])
MiB = 1 << 20

def job(tag):
    j = json.loads((run / "json" / f"{tag}.json").read_text())["jobs"][0]
    if j["error"]:
        sys.exit(f"{tag}: fio error {j['error']}")
    return j

def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"

dpath = run / "disturbed.txt"
disturbed = set(dpath.read_text().split()) if dpath.exists() else set()
mark = lambda tag: " †" if tag in disturbed else ""

ip = json.loads((run / "json" / "iperf3.json").read_text())
link_bps = ip["end"]["sum_received"]["bits_per_second"]
link_mib = link_bps / 8 / MiB

rows = [("1 replica (local)", "local"), ("2 replicas", "repl2"), ("diskless host", "diskless")]
# (column, job, direction, value, whether lower is better)
cols = [
    ("4 MiB seq write, QD4 (MiB/s)", "seq-write", "write", lambda s: s["bw_bytes"] / MiB, False),
    ("4 MiB seq read, QD4 (MiB/s)", "seq-read", "read", lambda s: s["bw_bytes"] / MiB, False),
    ("4 KiB rand write, QD1, mean (µs)", "rand-write-qd1", "write", lambda s: s["clat_ns"]["mean"] / 1e3, True),
    ("4 KiB rand read, QD1, mean (µs)", "rand-read-qd1", "read", lambda s: s["clat_ns"]["mean"] / 1e3, True),
    ("4 KiB rand write, QD32 (IOPS)", "rand-write-qd32", "write", lambda s: s["iops"], False),
    ("4 KiB rand read, QD32 (IOPS)", "rand-read-qd32", "read", lambda s: s["iops"], False),
]
by_tag = {tag: (ddir, get, lower) for _, tag, ddir, get, lower in cols}

def best(runs_of, tag):
    """The best of the runs tagged runs_of (lowest latency, highest rate) of job tag:
    (value, the run's tag, every run's value)."""
    ddir, get, lower = by_tag[tag]
    got = [(get(job(t)[ddir]), t) for t in runs_of]
    value, chosen = min(got) if lower else max(got)
    return value, chosen, [v for v, _ in got]

val, runs, chosen = {}, {}, {}
for _, r in rows:
    for _, tag, *_ in cols:
        tags = [f"{r}.{tag}.{k}" for k in range(1, job_rounds + 1)]
        val[r, tag], chosen[r, tag], runs[r, tag] = best(tags, tag)
    val[r, "prefill"] = job(f"{r}.prefill")["write"]["bw_bytes"] / MiB

print(f"Link a -> b (iperf3, TCP payload): {link_bps / 1e9:.3f} Gbit/s = {link_mib:,.1f} MiB/s "
      f"(tc tbf rate {link})")
print()
print("| configuration | " + " | ".join(c for c, *_ in cols) + " |")
print("|---|" + "---:|" * len(cols))
for label, r in rows:
    print(f"| {label} | " + " | ".join(fmt(val[r, tag]) + mark(chosen[r, tag]) for _, tag, *_ in cols) + " |")
print()
if job_rounds > 1:
    print(f"Each cell is the best of {job_rounds} runs; all runs:")
    for label, r in rows:
        print(f"  {label}: " + "; ".join(f"{tag} " + ", ".join(fmt(v) for v in runs[r, tag]) for _, tag, *_ in cols))
    print()
if disturbed:
    print("† node a's connection to a peer holding data was closed (and redialled) during this job: "
          + ", ".join(sorted(disturbed)))
    print()
print("Prefill (4 MiB seq write of the whole volume, first write of every block): " +
      ", ".join(f"{label} {fmt(val[r, 'prefill'])} MiB/s" for label, r in rows))
print()

# Loopback: the best of the rounds, per job and volume.
lo = {}
for tag, label, unit in (("rand-write-qd1", "4 KiB rand write QD1 mean", "µs"),
                         ("seq-read", "4 MiB seq read QD4, alternated", "MiB/s")):
    for vol in ("one", "two"):
        tags = [f"lo.{vol}.{i}.{tag}" for i in range(1, lat_rounds + 1)]
        lo[tag, vol] = best(tags, tag)
        if any(t in disturbed for t in tags):
            print(f"† loopback volume {vol}, {tag}: la's connection to lb was closed during a round")
    print(f"Loopback, {label} (best of {lat_rounds}): " + ", ".join(
        f"{n} {fmt(lo[tag, vol][0])} {unit} (rounds {', '.join(fmt(v) for v in lo[tag, vol][2])})"
        for vol, n in (("one", "1 replica"), ("two", "2 replicas"))))

# Resync.
poll = json.loads((run / "resync-poll.json").read_text())
s0 = json.loads((run / "resync-status-0.json").read_text())
s1 = json.loads((run / "resync-status-1.json").read_text())
peer = lambda s: next(p for p in s["peers"] if p["node"] == "b")
written = job("resync.write")["write"]["io_bytes"]
oos = peer(s1)["out-of-sync"]
transferred = peer(poll["status"])["resync-transferred"] - peer(s0)["resync-transferred"]
duration = poll["synced"] - poll["connected"]
resync_mib = transferred / MiB / duration
log_rate = None
for line in (run / "repl2-node-a.log").read_text().splitlines():
    m = re.search(r"resync finished.*mib_per_s=([\d.]+)", line)
    if m:
        log_rate = float(m.group(1))
print(f"Idle resync: wrote {written / MiB:,.0f} MiB on a while b was down; a marked "
      f"{oos / MiB:,.1f} MiB out of sync for b; after b restarted, a saw it Connected after "
      f"{poll['connected']:.2f} s and Established/UpToDate {duration:.2f} s later, with "
      f"{transferred / MiB:,.1f} MiB resynced: {resync_mib:,.1f} MiB/s "
      f"(tandemd's own log: {log_rate if log_rate is None else f'{log_rate:,.1f}'} MiB/s). "
      f"States seen: {poll['states']}")
for f, what in (("verify-repl2.json", "after the resync, a against b"),
                ("verify-diskless.json", "after the diskless-host jobs, b against c")):
    vpath = run / f
    if vpath.exists() and vpath.stat().st_size:
        v = json.loads(vpath.read_text())
        got = ", ".join(f"{p['node']}: {p['differing-blocks']} differing 4 KiB blocks" for p in v["peers"])
        print(f"Online verify {what}: {got or 'no peer was verified (none connected and UpToDate at that moment)'}")
pc = run / "pagecache-repl2.txt"
if pc.exists():
    res = dict(line.split() for line in pc.read_text().splitlines())
    print("Page cache held by each replica's data file right after the 2-replica prefill "
          "(fincore; --cache none means none should be there): "
          + ", ".join(f"{n} {int(b) / MiB:,.0f} MiB" for n, b in res.items()))
print()

# The cut: the write rate in 100 ms windows (fio's bw log: ms, KiB/s, ...), the longest
# run of windows in which no write completed, and the rate once b was declared dead
# (from the end of that stall to the heal).
cut_path = run / "cut-times.txt"
cut_at, heal_at = (float(x) for x in cut_path.read_text().split()) if cut_path.exists() else (0, 0)
def bw_windows(tag):
    got = []
    for path in run.glob(f"{tag}_bw*.log"):
        for line in path.read_text().splitlines():
            ms, kib = (int(x) for x in line.split(",")[:2])
            got.append((ms / 1000, kib))
    return sorted(got)

windows = bw_windows("cut")
# Windows without a completed write may be logged as 0 or not at all: the stall is the
# longest gap between windows that saw writes complete.
busy = [t for t, kib in windows if kib > 0]
stall, stall_end = 0.0, cut_at
for before, after in zip(busy, busy[1:]):
    if after > cut_at and after - before - 0.1 > stall:
        stall, stall_end = after - before - 0.1, after
during = [kib for t, kib in windows if stall_end < t <= heal_at]
cut_rate = sum(during) / len(during) / 1024 if during else 0.0
# The reference: the 1-replica volume's rate over the same seconds of its own job.
alone = [kib for t, kib in bw_windows("local.sustained") if stall_end < t <= heal_at]
alone_rate = sum(alone) / len(alone) / 1024 if alone else float("nan")
cut_job = job("cut")["write"] if cut_path.exists() else None
longest = cut_job["lat_ns"]["max"] / 1e9 if cut_job else 0.0
if cut_job:
    print(f"b cut off for {cut_for} s under 4 MiB writes at QD4 (from {cut_at:.1f} s to {heal_at:.1f} s of the job): "
          f"longest write {longest:.2f} s; longest time without a completed write {stall:.1f} s; "
          f"write rate after b was declared dead {fmt(cut_rate)} MiB/s over {len(during) / 10:.1f} s; "
          f"no write failed ({cut_job['io_bytes'] / MiB:,.0f} MiB written in all); the same write on the "
          f"1-replica volume, over the same seconds of its job: {fmt(alone_rate)} MiB/s")
    print()

def ratio_text(r):
    t = f"{r:.2f}"
    return f"{r:.3f}" if t in ("0.90", "1.50", "1.00") and r not in (0.9, 1.5, 1.0) else t

targets = [
    ("2 replicas seq write / link rate", val["repl2", "seq-write"], link_mib, "MiB/s", ">=", 0.9),
    ("2 replicas seq read / 1 replica seq read", val["repl2", "seq-read"], val["local", "seq-read"], "MiB/s", ">=", 0.9),
    ("the same, alternated on loopback", lo["seq-read", "two"][0], lo["seq-read", "one"][0], "MiB/s", ">=", 0.9),
    ("diskless seq read / link rate", val["diskless", "seq-read"], link_mib, "MiB/s", ">=", 0.9),
    ("diskless seq write / link rate", val["diskless", "seq-write"], link_mib, "MiB/s", ">=", 0.9),
    ("loopback QD1 write mean, 2 replicas / 1 replica", lo["rand-write-qd1", "two"][0], lo["rand-write-qd1", "one"][0], "µs", "<=", 1.5),
    ("idle resync rate / link rate", resync_mib, link_mib, "MiB/s", ">=", 0.9),
    ("resync bytes / bytes written", transferred / MiB, written / MiB, "MiB", "<=", 1.0),
] + ([
    ("b cut: longest write / 6 s", longest, 6.0, "s", "<=", 1.0),
    ("b cut: write rate while b is out / 1 replica, same write", cut_rate, alone_rate, "MiB/s", ">=", 0.9),
] if cut_job else [])
print("| target | measured | reference | ratio | target | met |")
print("|---|---:|---:|---:|:---:|:---:|")
for name, a, b, unit, op, limit in targets:
    r = a / b
    met = r >= limit if op == ">=" else r <= limit
    print(f"| {name} | {fmt(a)} {unit} | {fmt(b)} {unit} | {ratio_text(r)} | {'≥' if op == '>=' else '≤'} {limit:.2f} | "
          f"{'yes' if met else '**no**'} |")
EOF

# ---- server health -------------------------------------------------------------------
echo
echo "Warnings and errors in the node logs, counted by message (stopping b for the resync"
echo "measurement, and stopping the nodes after each part, make their peers log"
echo "\"peer disconnected\"; anything else is worth a look):"
python3 - "$RUN" <<'EOF'
import re, sys
from collections import Counter
from pathlib import Path
found = False
for log in sorted(Path(sys.argv[1]).glob("*-node-*.log")):
    counts, first = Counter(), {}
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\S+)\s+(WARN|ERROR)\s+(\S+): (.*?)(?: \w[\w.-]*=|$)", line)
        if m:
            key = (m.group(2), m.group(4))
            counts[key] += 1
            first.setdefault(key, line)
    for (level, msg), n in counts.most_common():
        found = True
        print(f"  {log.name}: {n} x {level} \"{msg}\"; first: {first[level, msg]}")
if not found:
    print("  none")
print("Resyncs sent (source side), per log:")
any_resync = False
for log in sorted(Path(sys.argv[1]).glob("*-node-*.log")):
    sent = [int(m.group(1)) for m in re.finditer(r"resync finished .*?bytes=(\d+)",
                                                  log.read_text(errors="replace"))
            if "this replica is UpToDate" not in m.group(0)]
    if sent:
        any_resync = True
        print(f"  {log.name}: {len(sent)} resync(s), {sum(sent) / (1 << 20):,.1f} MiB in all "
              f"({', '.join(f'{b / (1 << 20):,.1f}' for b in sent)} MiB)")
if not any_resync:
    print("  none")
EOF
((BAD_EXITS == 0)) && echo "Every node stopped cleanly (exit 0 after SIGTERM)." ||
    echo "$BAD_EXITS node stop(s) did not exit 0 after SIGTERM."
echo "load avg:    $(cut -d' ' -f1-3 /proc/loadavg) (at end)"
echo "Logs, JSON and results: $RUN"
