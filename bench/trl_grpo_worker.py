"""TRL's side of bench/rl_vs_trl.py: GRPOTrainer on an export, run in the benchmark's own venv.

Reads a JSON spec written by rl_vs_trl.py (export directory, prompts in ostinato's order,
held-out problems, the GRPO settings) and writes a JSON result: held-out accuracy (greedy,
ostinato's reward rule) against training seconds, and the rollout tokens/s of TRL's generate.
Not meant to be run by hand.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from ostinato.rl.rewards import answer_reward, safe_reward


class Clock:
    """Training seconds: wall time since the start, less the time spent evaluating."""

    def __init__(self) -> None:
        self.started, self.paused = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.started - self.paused


def timed_generate(model, counts: dict, eos_id: int):
    """model.generate, counting its seconds and the tokens it generated (up to each EOS)."""
    generate = model.generate

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        counts["seconds"] += time.perf_counter() - started
        prompt = kwargs.get("input_ids", args[0] if args else None)
        new = out[:, prompt.shape[1] :] if prompt is not None else out
        for row in new.tolist():
            counts["tokens"] += row.index(eos_id) + 1 if eos_id in row else len(row)
        return out

    return wrapper


@torch.no_grad()
def accuracy(model, tokenizer, heldout: list[dict], max_new_tokens: int) -> float:
    right = 0
    for start in range(0, len(heldout), 50):
        batch = heldout[start : start + 50]
        inputs = tokenizer([p["prompt"] for p in batch], return_tensors="pt", padding=True)
        out = type(model).generate(  # the class's: not the timed one that counts rollouts
            model,
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, problem in zip(out[:, inputs["input_ids"].shape[1] :], batch, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            task = SimpleNamespace(answer=problem["answer"])
            right += safe_reward(answer_reward, text, task, 0.0) >= 1.0
    return right / len(heldout)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["export"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["export"], dtype=torch.float32)
    model.generation_config.max_length = None
    counts = {"seconds": 0.0, "tokens": 0}
    curve = [(0.0, 0, accuracy(model, tokenizer, spec["heldout"], spec["max_new_tokens"]))]
    clock = Clock()

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % spec["eval_every"] and state.global_step != spec["steps"]:
                return
            started = time.perf_counter()
            model.eval()
            acc = accuracy(model, tokenizer, spec["heldout"], spec["max_new_tokens"])
            model.train()
            clock.paused += time.perf_counter() - started
            curve.append((clock.now(), state.global_step, acc))
            print(
                f"trl step {state.global_step}: held-out {acc:.0%} at {curve[-1][0]:.0f} s",
                flush=True,
            )

    def reward(completions, answer, **kwargs):
        return [
            safe_reward(answer_reward, text, SimpleNamespace(answer=a), spec["format_reward"])
            for text, a in zip(completions, answer, strict=True)
        ]

    batch = spec["prompts"] * spec["group_size"]
    config = GRPOConfig(
        output_dir=spec["out"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=spec["grad_clip"],
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        beta=0.0,
        epsilon=spec["clip"],
        max_steps=spec["steps"],
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=spec["seed"],
        disable_tqdm=True,
    )
    dataset = Dataset.from_list(spec["train"])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Evaluate()],
    )
    model.generate = timed_generate(model, counts, tokenizer.eos_token_id)
    clock.started, clock.paused = time.perf_counter(), 0.0
    trainer.train()
    result = {
        "curve": curve,
        "train_s": clock.now(),
        "rollout_tokens": counts["tokens"],
        "generate_s": counts["seconds"],
        "trl_version": __import__("trl").__version__,
    }
    open(spec["result"], "w").write(json.dumps(result))


if __name__ == "__main__":
    main()
