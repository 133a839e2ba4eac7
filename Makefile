# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this machine's disk; the package itself declares a range.
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint format clean

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

# Train the demo reasoning model, export it to Hugging Face format, prove the export computes
# what was trained, and ask it questions through the engine that `ostinato serve` uses.
demo: $(VENV)/.base
	rm -rf runs/demo runs/demo-hf
	$(OSTINATO) train --config configs/demo.toml --out runs/demo
	$(OSTINATO) export runs/demo --out runs/demo-hf
	$(OSTINATO) verify runs/demo-hf --device cpu
	printf $(QUESTIONS) | $(OSTINATO) chat runs/demo-hf

test: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs
