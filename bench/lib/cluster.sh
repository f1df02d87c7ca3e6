# Three tandemd on loopback for the benchmark scripts (sourced, not run).
#
# start_three BIN DIR BASE_PORT [POOL_ROOT]
#   Starts n1 (with the controller), n2 and n3 from BIN, their data in DIR/nN, logs in
#   DIR/nN.log, NBD sockets DIR/nN.sock, ports BASE_PORT..BASE_PORT+8 (API, peer, NBD);
#   their `default` pools in POOL_ROOT/nN when given. Appends their PIDs to PIDS,
#   exports TANDEM_CONTROLLER, and joins n2 and n3 through the controller. Needs TANDEM
#   (the CLI) and curl.
# api I: the API address (host:port) of node I (0, 1, 2).

api() { echo "127.0.0.1:$((BASE_PORT + $1))"; }

start_three() {
    local bin=$1 dir=$2 root=${4:-}
    BASE_PORT=$3
    local i n pool
    for i in 0 1 2; do
        n=n$((i + 1))
        local extra=()
        [[ $i == 0 ]] && extra+=(--controller)
        [[ -n $root ]] && extra+=(--pool "default=$root/$n")
        "$bin" --name "$n" --data-dir "$dir/$n" \
            --api-listen "$(api $i)" --peer-listen "127.0.0.1:$((BASE_PORT + 3 + i))" \
            --nbd-listen "127.0.0.1:$((BASE_PORT + 6 + i))" --nbd-socket "$dir/$n.sock" \
            --log-level warn "${extra[@]}" 2>"$dir/$n.log" &
        PIDS+=($!)
    done
    export TANDEM_CONTROLLER="http://$(api 0)"
    for _ in $(seq 100); do "$TANDEM" node list >/dev/null 2>&1 && break; sleep 0.1; done
    for i in 1 2; do
        for _ in $(seq 100); do curl -sf "http://$(api "$i")/v1/node" >/dev/null && break; sleep 0.1; done
    done
    "$TANDEM" node create n2 "$(api 1)" >/dev/null
    "$TANDEM" node create n3 "$(api 2)" >/dev/null
}

# xfs_on_loop IMAGE MNT SIZE: an xfs file system with reflink on a loop device doing
# direct I/O on IMAGE (so the pools' writes are not cached a second time on the way:
# the host's page cache would absorb and flush them in bursts, which shows as latency
# unrelated to Tandem), mounted on MNT; sets LOOP.
xfs_on_loop() {
    truncate -s "$3" "$1"
    LOOP=$(losetup --find --show --direct-io=on --sector-size 4096 "$1")
    mkfs.xfs -q -f -m reflink=1 "$LOOP"
    mount "$LOOP" "$2"
}

# bench_on_xfs NAME: for a benchmark whose nodes' pools are on `xfs_on_loop` (in
# $BENCH_DIR/xfs, image $BENCH_DIR/xfs.img): sets MNT, LOOP and PIDS, cleans up at exit
# (the processes it started, by PID; the mount, the loop device, the image and the
# nodes' directories, on failure too) and starts from an empty $BENCH_DIR.
bench_on_xfs() {
    BENCH_NAME=$1
    PIDS=()
    LOOP=
    MNT=$BENCH_DIR/xfs
    trap cleanup_xfs_bench EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
    rm -rf "$BENCH_DIR"
    mkdir -p "$MNT"
}

cleanup_xfs_bench() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    mountpoint -q "$MNT" && { umount "$MNT" || umount -l "$MNT"; }
    [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
    rm -rf "$BENCH_DIR/xfs.img" "$MNT" "$BENCH_DIR"/n?
    ((rc == 0)) || echo "$BENCH_NAME: failed (exit $rc); logs are in $BENCH_DIR" >&2
}
