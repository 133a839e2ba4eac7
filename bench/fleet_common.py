"""Settings shared by the fleet benchmarks (bench/fleet_vs_ddp.py, bench/torchft_vs_fleet.py)."""

# The model and data every fleet benchmark trains: ostinato's Llama at `tiny` size with a
# 2048-token vocabulary and 128-token sequences, on 3 MB of the standard library's source, one
# thread per process. The 2-core dev box trains it at ~13k tokens/s per rank; the recipe's own
# model is too small to learn anything from this corpus, configs/small.toml too big to run here
# in minutes.
MODEL = [
    "model.size=tiny",
    "model.max_seq_len=128",
    "model.vocab_size=2048",
    "data.source=stdlib",
    "data.max_bytes=3000000",
    "data.seq_len=128",
    "train.threads=1",
    "train.warmup_steps=20",
    "train.eval_problems=0",
    "train.samples=0",
]
