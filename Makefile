# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; the package itself declares a range.
TORCH_PIN := torch==2.13.0

.PHONY: demo rl-demo test lint format clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q $(TORCH_PIN) -e '.[dev]'
	touch $@

OSTINATO := $(VENV)/bin/ostinato
QUESTIONS := 'What is 27 + 45?\nBo has 12 pens. Bo gets 5 more and gives away 3. How many pens does Bo have now?\n'

# The demo fleet: two islands of one thread each (one per core), rounds of 10 s for 140 s.
# Island b is twice as slow and is killed in round 4; a bit of island a's copy of the global
# parameters flips in round 8. Island b skips the held-out evaluation: a holds the same model.
DEMO_FLEET := --islands 2 --train.threads=1 --train.steps=400 \
	--fleet.budget=seconds:10 --fleet.rounds=14 --checkpoint.every=25 \
	--for b:train.eval_problems=0 --for b:train.samples=0 --for b:train.eval_every=0
DEMO_FAULTS := slow@island=b,factor=2; crash@island=b,round=4; bitflip@island=a,round=8

# Train the demo reasoning model on a local fleet under faults, print the survival table, export
# island a's model to Hugging Face format, prove the export computes what was trained, and ask
# it questions through the engine that `ostinato serve` uses.
demo: $(VENV)/.base
	rm -rf runs/demo runs/demo-hf
	$(OSTINATO) chaos --config configs/demo.toml --out runs/demo $(DEMO_FLEET) \
		--faults "$(DEMO_FAULTS)"
	$(OSTINATO) export runs/demo/a --out runs/demo-hf
	$(OSTINATO) verify runs/demo-hf --device cpu
	printf $(QUESTIONS) | $(OSTINATO) chat runs/demo-hf

# Reasoning by reinforcement: the demo model trained alone, then GRPO with two rollout islands.
rl-demo: $(VENV)/.base
	rm -rf runs/demo-sft runs/rl-demo runs/rl-demo-hf
	$(OSTINATO) train --config configs/demo.toml --out runs/demo-sft --train.steps=1200 \
		--train.eval_every=0
	$(OSTINATO) rl --config configs/rl-demo.toml --out runs/rl-demo
	$(OSTINATO) export runs/rl-demo --out runs/rl-demo-hf
	printf $(QUESTIONS) | $(OSTINATO) chat runs/rl-demo-hf

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
