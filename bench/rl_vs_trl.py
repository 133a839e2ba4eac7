"""GRPO on the same start, task, prompts and group size: `ostinato rl` against TRL's GRPOTrainer.

The SFT checkpoint (--init, a run of `ostinato train` on the reasoning corpus) is exported to
Hugging Face format for TRL; both sides take --steps updates of rl.prompts prompts x
rl.group_size answers from configs/rl-demo.toml (the same prompts in the same order, the same
learning rate, clipping, temperature, answer length and reward rule, no KL), on the same
machine, one after the other. ostinato runs the recipe as shipped: two rollout islands beside
the trainer. TRL runs in its own venv (--trl-venv; --install-trl makes it: trl with the pinned
CPU torch, and ostinato itself for the reward rule and the prompts), with transformers'
generate for rollouts. Held-out accuracy (greedy, the same problems) is measured every
--eval-every updates on both sides; time spent evaluating is left out of both clocks.

Printed: accuracy against training seconds for both, when ostinato first reached TRL's final
accuracy as a share of TRL's time (target <= 0.7), and rollout tokens/s (target >= 1.5x).

    .venv/bin/python bench/rl_vs_trl.py --init runs/demo-sft [--steps 30] [--install-trl]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/rl-demo.toml"


def trl_python(venv: Path, install: bool) -> Path | None:
    python = venv / "bin" / "python"
    if install and not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        if subprocess.run([*pip, "torch==2.13.0", "trl", "-e", str(ROOT)]).returncode != 0:
            print("TRL arm skipped: `pip install trl` failed here")
            return None
    if not python.exists():
        print(f"TRL arm skipped: no venv at {venv} (--install-trl makes one)")
        return None
    check = subprocess.run([str(python), "-c", "import trl, ostinato"], capture_output=True)
    if check.returncode != 0:
        print(f"TRL arm skipped: trl or ostinato does not import in {venv}")
        return None
    return python


def run_ostinato(init: Path, steps: int, eval_every: int, out: Path) -> dict:
    command = [sys.executable, "-m", "ostinato", "rl", "--config", str(RECIPE), "--out", str(out)]
    command += [f"--rl.init={init}", f"--rl.steps={steps}", f"--rl.eval_every={eval_every}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    curve = [(0.0, 0, summary["initial_accuracy"])]
    for r in lines:
        if "accuracy" in r:
            # Training seconds: the run's own seconds by kind, evaluation and checkpoints left out.
            spent = sum(v for k, v in r["seconds"].items() if k not in ("evaluate", "checkpoint"))
            curve.append((spent, r["step"], r["accuracy"]))
    rates = [r["rollout_tokens_per_s"] for r in lines]
    return {"curve": curve, "train_s": curve[-1][0], "tokens_per_s": sorted(rates)[len(rates) // 2]}


def trl_spec(init: Path, steps: int, eval_every: int, work: Path) -> dict:
    from ostinato.config import load_config
    from ostinato.rl.policy import load_policy, prompts_of
    from ostinato.serve.convert import export_model

    cfg = load_config(RECIPE, [f"rl.init={init}"])
    policy, _ = load_policy(cfg, set())
    rl = cfg.rl
    train = [t for step in range(1, steps + 1) for t in prompts_of(policy.tasks.train, rl, step)]
    heldout = policy.tasks.heldout[: rl.eval_problems]
    export_model(init, work / "export", "fp32")
    return {
        "export": str(work / "export"),
        "out": str(work / "trl"),
        "result": str(work / "trl.json"),
        "train": [{"prompt": t.prompt, "answer": t.answer} for t in train],
        "heldout": [{"prompt": t.prompt, "answer": t.answer} for t in heldout],
        "steps": steps,
        "eval_every": eval_every,
        "prompts": rl.prompts,
        "group_size": rl.group_size,
        "max_new_tokens": rl.max_new_tokens,
        "temperature": rl.temperature,
        "lr": rl.lr,
        "clip": rl.clip,
        "grad_clip": rl.grad_clip,
        "format_reward": rl.format_reward,
        "seed": rl.seed,
        "threads": 2,
    }


def reached(curve: list, accuracy: float) -> float | None:
    """Training seconds at which `curve` first reached `accuracy`."""
    return next((t for t, _, a in curve if a >= accuracy), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl")
    parser.add_argument("--install-trl", action="store_true")
    args = parser.parse_args()
    trl = trl_python(args.trl_venv, args.install_trl)
    init = args.init.resolve()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        ours = run_ostinato(init, args.steps, args.eval_every, work / "ostinato")
        print(f"ostinato: {ours['curve']}", flush=True)
        theirs = None
        if trl is not None:
            spec = trl_spec(init, args.steps, args.eval_every, work)
            (work / "spec.json").write_text(json.dumps(spec))
            worker = [str(trl), str(ROOT / "bench/trl_grpo_worker.py"), str(work / "spec.json")]
            subprocess.run(worker, check=True)
            theirs = json.loads((work / "trl.json").read_text())
            theirs["tokens_per_s"] = theirs["rollout_tokens"] / theirs["generate_s"]
            print(f"trl {theirs['trl_version']}: {theirs['curve']}", flush=True)
    print(f"{'side':>9} {'update':>6} {'train s':>8} {'held-out':>8}")
    for name, side in (("ostinato", ours), ("trl", theirs)):
        for t, step, acc in side["curve"] if side else []:
            print(f"{name:>9} {step:>6} {t:>8.1f} {acc:>8.0%}")
    if theirs is not None:
        start, final = theirs["curve"][0][2], theirs["curve"][-1][2]
        if final <= start:
            print(
                f"TRL ended at {final:.0%} from a start of {start:.0%} after "
                f"{theirs['train_s']:.0f} s: no gain to reach, so the time target says nothing"
            )
        else:
            at = reached(ours["curve"][1:], final)
            share = "never" if at is None else f"{at / theirs['train_s']:.2f}x"
            print(
                f"TRL's final accuracy {final:.0%} after {theirs['train_s']:.0f} s; ostinato "
                f"reached it at {share} of that time (target <= 0.7x)"
            )
        per_update = [side["train_s"] / side["curve"][-1][1] for side in (ours, theirs)]
        print(f"seconds per update: ostinato {per_update[0]:.2f}, TRL {per_update[1]:.2f}")
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        print(
            f"rollout tokens/s: ostinato {ours['tokens_per_s']:.0f} (median per update, 2 islands), "
            f"TRL {theirs['tokens_per_s']:.0f} (its generate): {ratio:.2f}x (target >= 1.5x)"
        )
    print(json.dumps({"ostinato": ours, "trl": theirs}))


if __name__ == "__main__":
    main()
