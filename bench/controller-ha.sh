#!/usr/bin/env bash
# Controller high availability: failover time, and control-plane throughput with the
# controller's database on the replicated system volume.
#   - failover: three controller candidates on three hosts (network namespaces on a
#     bridge, veth links), KILLS times: SIGKILL the controller's tandemd, time until
#     `tandem cluster`, asked through the survivors, names another controller; then
#     restart the killed one and wait until the system volume is UpToDate again.
#   - throughput: SETS key-value sets and CREATES volume creations, one after the
#     other on one HTTP connection to the controller's API, per second: with the
#     database on the system volume of three replicas across the hosts (every commit
#     replicated over veth), and of one replica (a single-candidate cluster on
#     loopback); and, when BASELINE_BIN names the directory of a `tandemd` and `tandem`
#     of a release that kept the database in a local file (SQLite, WAL), with that.
# Targets (docs/benchmarks.md): failover median ≤ 5 s and max ≤ 10 s; throughput with
# the replicated database ≥ 50 % of the local file's.
#
# It stops only the processes it started, by PID, runs private copies of the binaries
# (nothing else is matched by name), and deletes the namespaces it made.
#
# Environment:
#   KILLS         controller kills [10]
#   SETS          key-value sets per configuration [300]
#   CREATES       volume creations per configuration [100]
#   BASELINE_BIN  directory with tandemd and tandem of a release with a local-file database [unset]
#   BENCH_DIR     work directory, disk-backed (not tmpfs) [/var/tmp/tandem-ha]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KILLS=${KILLS:-10}
SETS=${SETS:-300}
CREATES=${CREATES:-100}
BASELINE_BIN=${BASELINE_BIN:-}
BENCH_DIR=${BENCH_DIR:-/var/tmp/tandem-ha}
NS=tbha$$
SUBNET=198.18.91

[[ $(id -u) == 0 ]] || { echo "controller-ha: needs root (network namespaces)" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p tandemd -p tandem-cli
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
cp "$REPO/target/release/tandemd" "$BENCH_DIR/tnode-ha"
TANDEM="$REPO/target/release/tandem"

declare -A PID
cleanup() {
    for p in "${PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
    for n in 1 2 3; do ip netns del "$NS-h$n" 2>/dev/null || true; done
    ip netns del "$NS-sw" 2>/dev/null || true
    rm -rf "$BENCH_DIR"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
median_max() { # numbers on stdin -> "median max"
    sort -g | awk '{v[NR]=$1} END {m = NR % 2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2; printf "%.3f %.3f\n", m, v[NR]}'
}

# rate NS URL KIND COUNT: requests per second, one after the other on one connection,
# from namespace NS (empty: this one); KIND kv (PUT /v1/kv/bench/kI) or create (POST
# /v1/volumes, 16 MiB, one replica).
rate() {
    local run=()
    [[ -n $1 ]] && run=(ip netns exec "$1")
    shift
    "${run[@]}" python3 - "$@" <<'EOF'
import http.client, json, sys, time, urllib.parse
url, kind, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
u = urllib.parse.urlparse(url)
c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
head = {"content-type": "application/json"}
start = time.monotonic()
for i in range(count):
    if kind == "kv":
        c.request("PUT", f"/v1/kv/bench/k{i}", json.dumps({"value": "v" * 64}), head)
    else:
        c.request("POST", "/v1/volumes", json.dumps({"name": f"t{i}", "size": 16 << 20, "replicas": 1}), head)
    r = c.getresponse()
    body = r.read()
    if r.status >= 300:
        sys.exit(f"{kind} {i}: HTTP {r.status} {body[:300]!r}")
print(f"{count / (time.monotonic() - start):.1f}")
EOF
}

# ---- three candidates on three hosts ----
ip netns add "$NS-sw"
ip -n "$NS-sw" link add br0 type bridge
ip -n "$NS-sw" link set br0 up
for n in 1 2 3; do
    ip netns add "$NS-h$n"
    ip -n "$NS-sw" link add "p$n" type veth peer name eth0 netns "$NS-h$n"
    ip -n "$NS-sw" link set "p$n" master br0 up
    ip -n "$NS-h$n" link set lo up
    ip -n "$NS-h$n" addr add "$SUBNET.$n/24" dev eth0
    ip -n "$NS-h$n" link set eth0 up
done
api() { echo "$SUBNET.$1:3370"; }
ALL="http://$(api 1),http://$(api 2),http://$(api 3)"
start_node() { # N
    local n=$1
    ip netns exec "$NS-h$n" "$BENCH_DIR/tnode-ha" --name "h$n" --data-dir "$BENCH_DIR/h$n" \
        --api-listen "$(api "$n")" --peer-listen "$SUBNET.$n:7700" --nbd-listen "$SUBNET.$n:10809" \
        --log-level warn --controller 2>>"$BENCH_DIR/h$n.log" &
    PID[$n]=$!
    for _ in $(seq 100); do
        ip netns exec "$NS-h$n" curl -sf "http://$(api "$n")/v1/node" >/dev/null && return
        sleep 0.1
    done
    echo "controller-ha: h$n did not come up" >&2
    exit 1
}
cli() { # HOST ARGS...: tandem in host HOST's namespace, through every node's API
    local n=$1
    shift
    ip netns exec "$NS-h$n" "$TANDEM" --controller "$ALL" "$@"
}
for n in 1 2 3; do start_node "$n"; done
cli 1 node create h2 "$(api 2)" >/dev/null
cli 1 node create h3 "$(api 3)" >/dev/null
controller() { # HOST: the controller's node name, as asked from HOST
    cli "$1" -o json cluster 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["controller"])'
}
system_whole() { # HOST
    cli "$1" -o json volume list --all 2>/dev/null | python3 -c '
import json, sys
v = [v for v in json.load(sys.stdin) if v["name"] == "tandem-controller"][0]
ok = v["state"] == "UpToDate" and sum(p["kind"] == "diskful" and p.get("disk") == "UpToDate" for p in v["participants"]) == 3
sys.exit(0 if ok else 1)'
}
until system_whole 1; do sleep 0.2; done

c=$(controller 1)
n=${c#h}
replicated_kv=$(rate "$NS-h$n" "http://$(api "$n")" kv "$SETS")
replicated_create=$(rate "$NS-h$n" "http://$(api "$n")" create "$CREATES")

: >"$BENCH_DIR/failover.txt"
for k in $(seq "$KILLS"); do
    c=$(controller 1 || controller 2 || controller 3)
    victim=${c#h}
    ask=$((victim % 3 + 1))
    kill -KILL "${PID[$victim]}"
    wait "${PID[$victim]}" 2>/dev/null || true
    t0=$(now)
    while true; do
        c2=$(controller "$ask" || true)
        [[ -n $c2 && $c2 != "h$victim" ]] && break
        sleep 0.05
    done
    t1=$(now)
    echo "$t1 - $t0" | bc >>"$BENCH_DIR/failover.txt"
    echo "controller-ha: kill $k of h$victim: $c2 took over after $(tail -1 "$BENCH_DIR/failover.txt") s" >&2
    start_node "$victim"
    until system_whole "$ask"; do sleep 0.2; done
done
read -r fo_median fo_max < <(median_max <"$BENCH_DIR/failover.txt")

# ---- one candidate on loopback: the database on a system volume of one replica ----
for p in "${PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
for p in "${PID[@]}"; do wait "$p" 2>/dev/null || true; done
PID=()
one_node() { # BIN_DIR LABEL: kv and create rates of a one-node cluster on loopback
    local bin=$1 label=$2
    cp "$bin/tandemd" "$BENCH_DIR/tnode-$label"
    "$BENCH_DIR/tnode-$label" --name solo --data-dir "$BENCH_DIR/$label" --api-listen 127.0.0.1:4990 \
        --peer-listen 127.0.0.1:4991 --nbd-listen 127.0.0.1:4992 --nbd-socket "$BENCH_DIR/$label.sock" \
        --log-level warn --controller 2>"$BENCH_DIR/$label.log" &
    PID[solo]=$!
    for _ in $(seq 100); do "$bin/tandem" --controller http://127.0.0.1:4990 cluster >/dev/null 2>&1 && break; sleep 0.1; done
    echo "$(rate "" http://127.0.0.1:4990 kv "$SETS") $(rate "" http://127.0.0.1:4990 create "$CREATES")"
    kill -TERM "${PID[solo]}"
    wait "${PID[solo]}" 2>/dev/null || true
    unset 'PID[solo]'
}
read -r single_kv single_create < <(one_node "$REPO/target/release" single)
file_kv=- file_create=-
if [[ -n $BASELINE_BIN ]]; then
    read -r file_kv file_create < <(one_node "$BASELINE_BIN" file)
fi

pct() { [[ $2 == - ]] && echo - || echo "$(echo "scale=0; 100 * $1 / $2" | bc) %"; }
cat <<EOF
controller-ha ($(git -C "$REPO" rev-parse --short HEAD), $(date -u +%FT%TZ))
failover over $KILLS kills of the controller's tandemd (3 candidates on 3 hosts):
  median ${fo_median} s, max ${fo_max} s   (targets: median ≤ 5 s, max ≤ 10 s)
  each: $(paste -sd' ' "$BENCH_DIR/failover.txt")
throughput, one request after the other     kv sets/s   volume creates/s
  database replicated on 3 hosts (veth)     $replicated_kv       $replicated_create
  database on 1 replica (loopback)          $single_kv       $single_create
  local file (baseline release)             $file_kv       $file_create
  replicated vs local file                  $(pct "$replicated_kv" "$file_kv")       $(pct "$replicated_create" "$file_create")   (target ≥ 50 %)
EOF
