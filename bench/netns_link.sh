#!/usr/bin/env bash
# Kernel link shaping against ostinato's in-process link emulation, on one machine (as root).
#
# Two islands, each in its own network namespace (ost_a, ost_b), joined to the host by a veth
# pair (host 10.77.1.1 <-> ost_a 10.77.1.2, host 10.77.2.1 <-> ost_b 10.77.2.2; the host
# forwards between them). The coordinator listens on the host side of a's veth. Every veth end
# gets a `tc qdisc ... tbf rate $RATE`, so each island's upload and download are capped
# separately, as on a real full-duplex link. Three fleets of the same model, data and schedule:
#
#   kernel    islands in the namespaces, veths capped with tbf, no in-process emulation
#   netns     islands in the namespaces, no tbf (what the namespaces and forwarding cost)
#   emulated  islands on loopback with --fleet.link=bandwidth=$RATE (ostinato/fleet/link.py)
#
# and compares exchange_s per round (DIR/rounds.jsonl: the slowest member's exchange).
# This kernel has tbf and htb but not netem, so latency cannot be shaped here: latency stays
# emulated in-process (fleet.link=latency=...) in every setting, and is left out of this
# comparison.
#
#   bench/netns_link.sh [OUT]     env: RATE=100mbit H=10 ROUNDS=8 COMPRESSION=fp32 PORT=29517
#
# Namespaces, veths and the ip_forward setting are removed/restored on exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-/tmp/netns_link}
RATE=${RATE:-100mbit}
H=${H:-10}
ROUNDS=${ROUNDS:-8}
COMPRESSION=${COMPRESSION:-fp32}
PORT=${PORT:-29517}
PY=$PWD/.venv/bin/python
HOST_IP=10.77.1.1

[[ $(id -u) == 0 ]] || { echo "netns_link.sh: needs root (ip netns, tc)" >&2; exit 1; }

FORWARD_WAS=$(cat /proc/sys/net/ipv4/ip_forward)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ns in a b; do
        ip link del "ost_h$ns" 2>/dev/null || true
        ip netns del "ost_$ns" 2>/dev/null || true
    done
    echo "$FORWARD_WAS" >/proc/sys/net/ipv4/ip_forward
}
trap cleanup EXIT INT TERM

setup_namespaces() {
    echo 1 >/proc/sys/net/ipv4/ip_forward
    local i=1
    for ns in a b; do
        ip netns add "ost_$ns"
        ip link add "ost_h$ns" type veth peer name "ost_${ns}0"
        ip link set "ost_${ns}0" netns "ost_$ns"
        ip addr add "10.77.$i.1/24" dev "ost_h$ns"
        ip link set "ost_h$ns" up
        ip netns exec "ost_$ns" ip addr add "10.77.$i.2/24" dev "ost_${ns}0"
        ip netns exec "ost_$ns" ip link set "ost_${ns}0" up
        ip netns exec "ost_$ns" ip link set lo up
        ip netns exec "ost_$ns" ip route add default via "10.77.$i.1"
        i=$((i + 1))
    done
}

# tbf on both ends of both veths: host side = the island's download, namespace side = upload.
# burst 64kb is ~5 ms at 100 Mbit/s (tbf needs at least rate/HZ); latency 100ms bounds the queue.
shape() {
    for ns in a b; do
        tc qdisc replace dev "ost_h$ns" root tbf rate "$RATE" burst 64kb latency 100ms
        ip netns exec "ost_$ns" tc qdisc replace dev "ost_${ns}0" root tbf rate "$RATE" \
            burst 64kb latency 100ms
    done
}

unshape() {
    for ns in a b; do
        tc qdisc del dev "ost_h$ns" root 2>/dev/null || true
        ip netns exec "ost_$ns" tc qdisc del dev "ost_${ns}0" root 2>/dev/null || true
    done
}

mkdir -p "$OUT"
# One tokenizer for every run, and the fleet benchmarks' model (bench/fleet_common.py).
PYTHONPATH=bench "$PY" -c "
from pathlib import Path
from fleet_vs_ddp import shared_tokenizer
shared_tokenizer(Path('$OUT'), [])"
mapfile -t MODEL < <(PYTHONPATH=bench "$PY" -c "
from fleet_common import MODEL
print('\n'.join('--' + m for m in MODEL))")
COMMON=(
    --config configs/tiny.toml "${MODEL[@]}" --checkpoint.every=0
    --data.tokenizer="$OUT/tokenizer.json" --train.steps=$((H * ROUNDS)) --train.batch_size=8
    --fleet.budget="steps:$H" --fleet.compression="$COMPRESSION" --fleet.expect=2
)
export OSTINATO_FLEET_TOKEN=${OSTINATO_FLEET_TOKEN:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export OMP_NUM_THREADS=1 TORCH_CPP_LOG_LEVEL=ERROR

# run_fleet NAME WHERE(netns|loopback) [extra island options...]
run_fleet() {
    local name=$1 where=$2 dir="$OUT/$1" address pids=()
    shift 2
    rm -rf "$dir" && mkdir -p "$dir"
    if [[ $where == netns ]]; then address=$HOST_IP:$PORT; else address=127.0.0.1:$PORT; fi
    "$PY" -m ostinato fleet coordinator --bind "$address" --out "$dir" "${COMMON[@]}" \
        >"$dir/coordinator.log" 2>&1 &
    local coordinator=$!
    PIDS+=("$coordinator")
    for island in a b; do
        local command=("$PY" -m ostinato train "${COMMON[@]}" --out "$dir/$island" --resume none
            --fleet.coordinator="$address" --fleet.island="$island" "$@")
        if [[ $where == netns ]]; then
            # gloo picks its interface from the hostname unless told: use the namespace's veth
            ip netns exec "ost_$island" env GLOO_SOCKET_IFNAME="ost_${island}0" "${command[@]}" \
                >"$dir/$island.log" 2>&1 &
        else
            "${command[@]}" >"$dir/$island.log" 2>&1 &
        fi
        pids+=($!)
        PIDS+=($!)
    done
    local failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    kill "$coordinator" 2>/dev/null || true
    wait "$coordinator" 2>/dev/null || true
    if ((failed)); then
        echo "netns_link.sh: fleet $name failed; see $dir/*.log" >&2
        tail -n 20 "$dir"/a.log "$dir"/b.log >&2
        exit 1
    fi
    echo "fleet $name done" >&2
}

setup_namespaces
shape
run_fleet kernel netns
unshape
run_fleet netns netns
run_fleet emulated loopback --fleet.link="bandwidth=$RATE"

"$PY" - "$OUT" "$RATE" "$H" "$ROUNDS" "$COMPRESSION" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

out, rate, h, rounds, compression = sys.argv[1:]
print(f"\n{compression} pseudo-gradients, 2 islands, H={h}, {rounds} rounds, link {rate}")
print("first round left out of the medians (it absorbs the islands' start-up skew)\n")
print("| fleet | rounds | MB sent per island per round | exchange_s median | min | max |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
medians = {}
for name in ("kernel", "netns", "emulated"):
    rows = [json.loads(line) for line in (Path(out) / name / "rounds.jsonl").read_text().splitlines()]
    times = [r["exchange_s"] for r in rows[1:]]
    sent = statistics.median(max(r["bytes_sent"].values()) for r in rows) / 1e6
    medians[name] = statistics.median(times)
    print(
        f"| {name} | {len(rows)} | {sent:.2f} | {medians[name]:.3f} | {min(times):.3f} "
        f"| {max(times):.3f} |"
    )
print(f"\nemulated / kernel exchange_s: {medians['emulated'] / medians['kernel']:.2f}")
EOF
