#!/usr/bin/env bash
# GPU checks, as one prepared script that finishes in under 10 minutes on one accelerator:
#  1. train the 1B recipe (FSDP2 over GPUS ranks) and an 8B-shaped model of 4 layers for a few
#     hundred steps in bf16 with nccl; report tokens/s and MFU against the H200's measured
#     ~790 TFLOP/s bf16 (FACTS.md) and the state each rank held;
#  2. export a small trained model, `ostinato verify --device cuda`, and the serving benchmark.
# Usage: bash bench/gpu.sh [OUT_DIR]   (results are printed; copy them into BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu}}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -x .venv/bin/ostinato ] || make .venv/.base

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
.venv/bin/ostinato doctor | tee "$OUT/doctor.txt"

# 1. The 1B recipe: 300 steps, bf16 autocast, nccl via torchrun on GPUS ranks (FSDP2 sharded
#    with more than one; one GPU is one unsharded rank), no evaluation. Then an 8B-shaped model
#    with 4 of its 32 layers (4096 wide, 128k vocabulary), every layer recomputed.
GPUS=${GPUS:-1}
COMMON=(--resume none --train.steps=300 --train.warmup_steps=30 --checkpoint.every=100
        --train.dtype=bf16 --train.eval_problems=0 --train.samples=0 --data.max_bytes=30000000)
.venv/bin/torchrun --standalone --nproc_per_node="$GPUS" -m ostinato train --config configs/1b.toml \
    --out "$OUT/1b" "${COMMON[@]}" --train.batch_size=8 --data.seq_len=2048 --train.compile=true \
    --parallel.strategy=fsdp 2>&1 | tail -n 20
.venv/bin/torchrun --standalone --nproc_per_node="$GPUS" -m ostinato train --config configs/8b.toml \
    --out "$OUT/8b-4layers" "${COMMON[@]}" --model.n_layers=4 --train.batch_size=1 \
    --train.grad_accum=1 --data.seq_len=8192 --parallel.activation_checkpointing=full \
    2>&1 | tail -n 20
$PY - "$OUT/1b" "$OUT/8b-4layers" <<'PY'
import json, sys
from pathlib import Path
from ostinato.config import load_config
from ostinato.model.llama import Llama, count_parameters
for run in map(Path, sys.argv[1:]):
    cfg = load_config(run / "config.toml")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][50:]
    tokens_per_s = sum(r["tokens"] for r in records) / sum(r["step_s"] for r in records)
    with __import__("torch").device("meta"):
        params = count_parameters(Llama(cfg.model))
    m = cfg.model
    flops_per_token = 6 * params + 12 * m.n_layers * m.dim * cfg.data.seq_len  # + attention
    summary = json.loads((run / "summary.json").read_text())
    chips = summary["world_size"]
    mfu = tokens_per_s * flops_per_token / (790e12 * chips)
    print(f"{run.name}: {params / 1e9:.2f} B params, {summary['strategy']} on {chips} GPU(s), "
          f"{tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} (against 790 TFLOP/s measured bf16 per "
          f"GPU; target >= 40%), state/rank {summary['state_bytes_per_rank'] / 2**30:.1f} GiB")
PY

# 2. Export, verify on the GPU, serving benchmark.
.venv/bin/ostinato train --config configs/demo.toml --out "$OUT/demo" --resume none \
    --train.steps=200 --hardware.device=cuda 2>&1 | tail -n 5
.venv/bin/ostinato export "$OUT/demo" --out "$OUT/demo-hf"
.venv/bin/ostinato verify "$OUT/demo-hf" --device cuda
# The serving benchmark starts `ostinato serve` on the export (its engine picks the GPU).
$PY bench/serve_throughput.py --run "$OUT/demo"
