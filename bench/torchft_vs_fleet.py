"""An ostinato fleet against torchft's DiLoCo under the same SIGKILL, side by side in one script.

Both sides train the same model (ostinato's Llama, `tiny` size, vocab 2048, sequences of 128 on
the standard library's source, one shared tokenizer, the same init), on the same per-island data
streams (ostinato's TokenStream, seeded as an ostinato island named a or b), with the same inner
AdamW and schedule, H inner steps per round, fp32 pseudo-gradients and Nesterov outer SGD
(lr 0.7, momentum 0.9). Each side runs 2 replicas of one process and one thread each:

- ostinato: `ostinato fleet coordinator` plus two `ostinato train --fleet.*` islands;
- torchft: `torchft_lighthouse` plus two workers (this file, `worker` mode) running
  torchft.local_sgd.DiLoCo under a torchft Manager with ProcessGroupGloo, in their own venv
  (torchft-nightly==2026.10.26 beside torch 2.13.0+cpu; made on demand with --make-venv).

The kill schedule: when replica b has finished inner step K*H (it enters the exchange of round
K) it gets SIGKILL, and is started again at once, as a supervisor would. Failure detection is
matched: ostinato's heartbeat timeout and grace window and torchft's lighthouse heartbeat and
join timeouts are all --detect-s; heartbeats every 0.1 s on both sides; the collective timeout
(ostinato's fleet.timeout_s, torchft's Manager and ProcessGroupGloo timeout) is --timeout-s.

    .venv/bin/python bench/torchft_vs_fleet.py [--h 20] [--rounds 15] [--kill-round 5]
        [--repeats 2] [--venv /tmp/torchft-venv --make-venv]

What is measured, from each replica's per-step timestamps (ostinato: the compute, waiting,
exchange and recovery spans of events.jsonl; torchft: the worker's own log of steps and syncs):
- kill -> survivor trains again: start of the survivor's first inner step after the first sync
  it could not finish before the kill, minus max(kill, the end of its last step before that
  sync): the stall the failure caused, not the inner steps it was still doing anyway;
- survivor's extra waiting: over every sync after the kill, the time beyond its usual sync gap;
- restart -> restarted replica trains again: from starting the new process to its first inner
  step, and to its first inner step whose work reaches a committed round;
- inner steps discarded: steps whose work never reached a committed round, for the survivor and
  for the restarted replica; steps the killed process lost with its memory are shown apart;
- time to the same validation loss: the global parameters after each committed round are
  evaluated on the same held-out tokens; the target is the worse of the two final losses, and
  time runs from each side's first inner step.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from fleet_common import MODEL

from ostinato.config import load_config
from ostinato.data.stream import TokenStream
from ostinato.fleet.outer import unique_parameters
from ostinato.model.llama import Llama
from ostinato.train.evaluate import validation_loss
from ostinato.train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny.toml"
TORCHFT = "torchft-nightly==2026.10.26"
TORCH = "torch==2.13.0"
HEARTBEAT_S = 0.1  # torchft's Manager default; ostinato's default is 0.5


@dataclass
class Step:
    start: float
    end: float
    life: int  # 0: the first process of this replica, 1: the restarted one
    sync_after: bool  # a sync (round) followed this step
    kept: bool = True  # its work reached a committed round


@dataclass
class Side:
    name: str
    steps: dict[str, list[Step]]  # replica -> inner steps in time order
    kill: float
    restart: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (unix time, val loss)
    rounds: int = 0
    note: str = ""


# --- shared setup ---------------------------------------------------------------------------


def overrides(args: argparse.Namespace, tokenizer: Path) -> list[str]:
    every = args.h if args.island_checkpoint_every is None else args.island_checkpoint_every
    return [
        *MODEL,
        f"train.steps={args.rounds * args.h}",
        f"train.batch_size={args.batch}",
        f"checkpoint.every={every}",
        f"data.tokenizer={tokenizer}",
    ]


def prepare_data(
    out: Path, args: argparse.Namespace, names: tuple[str, ...] = ("a", "b")
) -> tuple[list[str], dict[str, int]]:
    """Train the tokenizer once, for both sides; keep the validation tokens for the loss curves.

    Returns the overrides of every run and each replica's data seed, the one an ostinato island
    of that name uses (so replica a of torchft reads what island a of ostinato reads)."""
    from ostinato.data.sources import load_documents
    from ostinato.data.stream import tokenize
    from ostinato.data.tokenizer import train_tokenizer
    from ostinato.fleet.island import island_seed

    cfg = load_config(RECIPE, [*MODEL, f"train.steps={args.rounds * args.h}"])
    documents = load_documents(cfg.data)
    tokenizer = train_tokenizer(documents.train, cfg.model.vocab_size)
    path = out / "tokenizer.json"
    tokenizer.save(str(path))
    torch.save({"validation": tokenize(tokenizer, documents.validation)}, out / "data.pt")
    island_cfgs = {
        n: load_config(RECIPE, [*MODEL, "fleet.coordinator=x:1", f"fleet.island={n}"])
        for n in names
    }
    seeds = {n: island_seed(c.fleet, c.data.seed) for n, c in island_cfgs.items()}
    return overrides(args, path), seeds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line torn by the kill
    return rows


class Tail:
    """The rows appended to a JSON-lines file since the last call. The bench polls the logs of
    both sides many times a second while they train on the same cores: reading each whole file
    every time cost up to a third of a core by the end of a run, and more for the side that
    logs more lines, so it skewed the very step times it measures."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
        self.offset += len(whole)
        rows = []
        for line in whole.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line torn by a kill
        return rows


def wait_for_step(
    path: Path, step: int, procs: list[subprocess.Popen], timeout: float, tick=None
) -> None:
    """Poll a replica's per-step log until it has logged `step` (or give up)."""
    deadline, tail = time.monotonic() + timeout, Tail(path)
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a process exited before step {step}; see the logs in {path.parent}")
        if any(r.get("step", 0) >= step for r in tail.new_rows()):
            return
        time.sleep(0.01)
    raise SystemExit(f"no step {step} in {path} within {timeout:.0f} s")


def kill_and_restart(
    proc: subprocess.Popen, start, out: Path
) -> tuple[float, float, subprocess.Popen]:
    """SIGKILL, then start the replica again at once, as a supervisor would."""
    killed = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    restarted = time.time()
    (out / "kill.json").write_text(json.dumps({"killed": killed, "restarted": restarted}))
    return killed, restarted, start()


def spawn(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("a") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=bench_env())


def finish(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- ostinato -------------------------------------------------------------------------------


def fleet_options(args: argparse.Namespace) -> list[str]:
    return [
        f"--fleet.budget=steps:{args.h}",
        "--fleet.compression=fp32",
        "--fleet.outer_lr=0.7",  # torchft's side: SGD(lr=0.7, momentum=0.9, nesterov=True)
        f"--fleet.heartbeat_s={HEARTBEAT_S}",
        f"--fleet.heartbeat_timeout_s={args.detect_s}",
        f"--fleet.grace_s={args.detect_s}",
        f"--fleet.timeout_s={args.timeout_s}",
        f"--fleet.checkpoint_every={args.fleet_checkpoint_every}",
    ]


def start_coordinator(
    out: Path, cfg: list[str], args: argparse.Namespace, expect: int = 2
) -> tuple[subprocess.Popen, str]:
    """The coordinator gets the islands' overrides too: it refuses islands whose model or
    rounds differ from its own recipe."""
    command = [sys.executable, "-m", "ostinato", "fleet", "coordinator", "--bind", "127.0.0.1:0"]
    command += [
        "--out",
        str(out),
        "--config",
        str(RECIPE),
        f"--fleet.expect={expect}",
        *[f"--{o}" for o in cfg],
        *fleet_options(args),
    ]
    log = out / "coordinator.log"
    proc = spawn(command, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("coordinator on "):
                return proc, line.removeprefix("coordinator on ").split(";")[0].strip()
        time.sleep(0.05)
    raise SystemExit(f"the coordinator did not start; see {log}")


def run_ostinato(out: Path, cfg: list[str], args: argparse.Namespace) -> Side:
    os.environ["OSTINATO_FLEET_TOKEN"] = secrets.token_hex(16)
    coordinator, address = start_coordinator(out, cfg, args)

    def island(name: str, resume: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "ostinato", "train", "--config", str(RECIPE)]
        command += ["--out", str(out / name), "--resume", resume, *[f"--{o}" for o in cfg]]
        command += [*fleet_options(args), f"--fleet.coordinator={address}"]
        command += [f"--fleet.island={name}"]
        return spawn(command, out / f"{name}.log")

    a, b = island("a", "none"), island("b", "none")
    copier = CheckpointCopier(out / "fleet" / "checkpoints", out / "globals")
    metrics_b = out / "b" / "metrics.jsonl"
    wait_for_step(metrics_b, args.kill_round * args.h, [a, b], timeout=600, tick=copier.poll)
    killed, restarted, b = kill_and_restart(b, lambda: island("b", "auto"), out)
    while a.poll() is None:
        copier.poll()
        time.sleep(0.1)
    finish([b], timeout=60)
    copier.poll()
    coordinator.terminate()
    finish([coordinator], timeout=10)
    side = Side("ostinato", ostinato_steps(out, {"a": [], "b": [restarted]}), killed, restarted)
    side.rounds = len(read_jsonl(out / "rounds.jsonl"))
    side.curve = ostinato_curve(out, cfg)
    return side


class CheckpointCopier:
    """Copies each fleet checkpoint as it appears (only the newest 3 are kept on disk)."""

    def __init__(self, root: Path, into: Path):
        self.root, self.into, self.last = root, into, 0.0
        into.mkdir(parents=True, exist_ok=True)

    def poll(self) -> None:
        from ostinato.checkpoint.store import committed_checkpoints

        if time.monotonic() - self.last < 0.2:
            return
        self.last = time.monotonic()
        for path in committed_checkpoints(self.root):
            target = self.into / path.name
            if not target.exists():
                try:
                    shutil.copytree(path, target)
                except (OSError, shutil.Error):
                    shutil.rmtree(target, ignore_errors=True)  # rotated away mid-copy


def ostinato_steps(out: Path, restarts: dict[str, list[float]]) -> dict[str, list[Step]]:
    """Each island's inner steps from its events.jsonl; `restarts` holds, per island, when each
    of its processes after the first started (a step's life is how many started before it).

    After a round's inner steps the island logs a `waiting` span, then `exchange` if the round
    committed with it or `recovery` if it did not. After `recovery` the member carries its
    pseudo-gradient into its next round (error feedback), so those steps are kept if a later
    round of the same process commits them; they are dropped if that round leaves the island's
    pseudo-gradient out as an outlier (rounds.jsonl `excluded`) or the island is quarantined."""
    rounds = read_jsonl(out / "rounds.jsonl")
    quarantined = {g["island"] for g in read_jsonl(out / "guards.jsonl") if g["guard"] == "digest"}
    steps = {}
    for name, restarted in restarts.items():
        steps[name], pending, waited = [], [], None
        for event in read_jsonl(out / name / "events.jsonl"):
            life = sum(event.get("start", 0) > t for t in restarted)
            if pending and pending[-1].life != life:  # the process died with these
                steps[name] += pending
                pending = []
            kind = event.get("kind")
            if kind == "compute":
                pending.append(Step(event["start"], event["end"], life, False, False))
            elif kind == "waiting":
                waited = event["start"]
            elif waited is not None and kind in ("exchange", "recovery"):
                if pending:
                    pending[-1].sync_after = True
                if kind == "exchange" or name in quarantined:
                    kept = kind == "exchange" and not left_out(rounds, name, waited, event["end"])
                    for step in pending:
                        step.kept = kept
                    steps[name] += pending
                    pending = []
                waited = None
        steps[name] += pending
    return steps


def left_out(rounds: list[dict], name: str, start: float, end: float) -> bool:
    """Whether the round this island committed between start and end left its work out."""
    for record in rounds:
        if start - 0.1 <= record["time"] <= end + 0.5 and name in record["members"]:
            return name in record.get("excluded", [])
    return False


def ostinato_curve(out: Path, cfg: list[str]) -> list[tuple[float, float]]:
    """Validation loss of the global parameters of each committed round."""
    from ostinato.checkpoint.store import load_tensors, read_meta

    times = {r["round"]: r["time"] for r in read_jsonl(out / "rounds.jsonl")}
    model, val = eval_model(out, cfg)
    params = unique_parameters(model)
    numel = sum(p.numel() for p in params)
    curve = []
    for path in sorted((out / "globals").glob("step_*")):
        # the outer state is [global parameters, momentum]; error feedback is not needed
        state = {"outer_optimizer": {"state": torch.empty(2 * numel)}}
        try:
            load_tensors(path, state)
        except ValueError:
            continue  # torn by the copy
        flat, offset = state["outer_optimizer"]["state"], 0
        with torch.no_grad():
            for param in params:
                param.copy_(flat[offset : offset + param.numel()].view_as(param))
                offset += param.numel()
        number = read_meta(path)["fleet"]["round"]
        curve.append((times[number], validation_loss(model, val, model.cfg.max_seq_len)))
    return curve


def eval_model(out: Path, cfg: list[str]) -> tuple[Llama, torch.Tensor]:
    config = load_config(RECIPE, cfg)
    model = Llama(config.model)
    model.eval()
    val = torch.load(out.parents[1] / "data.pt")["validation"]
    return model, val


# --- torchft --------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def make_venv(venv: Path) -> str | None:
    """The benchmark's own environment; returns why it could not be made, or None."""
    python = venv_python(venv)
    probe = [str(python), "-c", "import torchft, tokenizers"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    import tokenizers

    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # torch first and pinned, so pip never pulls a CUDA build for torchft's `torch>=2.7`
        [str(python), "-m", "pip", "install", TORCH],
        [str(python), "-m", "pip", "install", TORCHFT, f"tokenizers=={tokenizers.__version__}"],
    ]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(command[-2:])} failed: {done.stdout[-800:]}{done.stderr[-800:]}"
    return None


def start_lighthouse(out: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    lighthouse = spawn(
        [
            str(Path(args.venv) / "bin" / "torchft_lighthouse"),
            "--bind",
            f"127.0.0.1:{port}",
            "--min_replicas",
            "1",
            "--heartbeat_timeout_ms",
            str(int(args.detect_s * 1000)),
            "--join_timeout_ms",
            str(int(args.detect_s * 1000)),
        ],
        out / "lighthouse.log",
    )
    return lighthouse, f"http://127.0.0.1:{port}"


def run_torchft(out: Path, cfg: list[str], seeds: dict[str, int], args: argparse.Namespace) -> Side:
    lighthouse, address = start_lighthouse(out, args)
    setup = {
        "overrides": cfg,
        "h": args.h,
        "rounds": args.rounds,
        "lighthouse": address,
        "timeout_s": args.timeout_s,
        "seeds": seeds,
    }
    (out / "setup.json").write_text(json.dumps(setup))

    def worker(name: str, life: int) -> subprocess.Popen:
        command = [str(venv_python(Path(args.venv))), __file__, "worker", str(out), name, str(life)]
        return spawn(command, out / f"{name}.log")

    a, b = worker("a", 0), worker("b", 0)
    log_b = out / "b.steps.jsonl"
    wait_for_step(log_b, args.kill_round * args.h, [a, b], timeout=600)
    killed, restarted, b = kill_and_restart(b, lambda: worker("b", 1), out)
    a.wait(timeout=1800)
    # b ends with a when it is back in a's quorum; one that is not would go on alone from its
    # own step 0 (a run of its own), so it is stopped.
    finish([b], timeout=5)
    lighthouse.terminate()
    finish([lighthouse], timeout=10)
    side = Side("torchft", torchft_steps(out), killed, restarted)
    side.rounds = sum(1 for r in read_jsonl(out / "a.steps.jsonl") if r.get("committed"))
    side.curve = torchft_curve(out, cfg)
    return side


def torchft_steps(out: Path, names: tuple[str, ...] = ("a", "b")) -> dict[str, list[Step]]:
    """A step is kept if the next sync of its process committed without healing it: a failed
    commit restores the last global parameters, and healing overwrites the local ones."""
    steps = {}
    for name in names:
        steps[name], pending = [], []
        for row in read_jsonl(out / f"{name}.steps.jsonl"):
            if pending and pending[-1].life != row["life"]:  # the process died with these
                steps[name] += pending
                pending = []
            if "step" in row:
                pending.append(Step(row["start"], row["end"], row["life"], False, False))
                continue
            for step in pending:
                step.kept = row["committed"] and not row["healed"]
            if pending:
                pending[-1].sync_after = True
            steps[name] += pending
            pending = []
        steps[name] += pending
    return steps


def torchft_curve(out: Path, cfg: list[str]) -> list[tuple[float, float]]:
    path = out / "a.globals.pt"
    if not path.exists():
        return []
    model, val = eval_model(out, cfg)
    curve = []
    for when, params in torch.load(path):
        with torch.no_grad():
            for name, tensor in params.items():
                model.get_parameter(name).copy_(tensor)
        curve.append((when, validation_loss(model, val, model.cfg.max_seq_len)))
    return curve


# --- the torchft worker (runs in the torchft venv) ------------------------------------------


def worker_main(out: Path, name: str, life: int) -> None:
    from torchft import Manager, ProcessGroupGloo

    from ostinato.data.sources import load_documents
    from ostinato.data.stream import tokenize
    from ostinato.data.tokenizer import load_tokenizer

    setup = json.loads((out / "setup.json").read_text())
    cfg = load_config(RECIPE, setup["overrides"])
    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    model = Llama(cfg.model)
    model.init_weights(cfg.train.seed)
    inner = inner_optimizer(model, cfg.train)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    # the same start-up work as an island: read the corpus, tokenize it with the shared tokenizer
    tokens = tokenize(load_tokenizer(cfg.data.tokenizer), load_documents(cfg.data).train)
    stream = TokenStream(tokens, cfg.data.seq_len, setup["seeds"][name])
    state = {"step": 0, "healed": False}

    def load_state(sd: dict) -> None:  # called when this replica heals from a peer
        model.load_state_dict(sd["model"])
        inner.load_state_dict(sd["inner"])
        state["step"], state["healed"] = sd["step"], True

    def save_state() -> dict:
        return {"model": model.state_dict(), "inner": inner.state_dict(), "step": state["step"]}

    timeout = timedelta(seconds=setup["timeout_s"])
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state,
        state_dict=save_state,
        min_replica_size=1,
        use_async_quorum=False,  # DiLoCo requires it
        replica_id=f"replica_{name}",
        store_addr="127.0.0.1",
        store_port=store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=setup["lighthouse"],
        hostname="127.0.0.1",
        heartbeat_interval=timedelta(seconds=HEARTBEAT_S),
        timeout=timeout,
        quorum_timeout=timedelta(seconds=600),
        connect_timeout=timedelta(seconds=30),
        init_sync=False,  # both replicas start from the same seeded init
    )
    commits = record_commits(manager)
    if life == 0:
        barrier(out, name, list(setup["seeds"]))
    train_replica(out, name, life, cfg, setup, model, inner, outer, stream, manager, state, commits)
    os._exit(0)  # the manager's threads would keep the process waiting


def inner_optimizer(model: Llama, cfg) -> torch.optim.AdamW:
    """As ostinato.train.trainer.make_optimizer: matrices decay, norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def record_commits(manager) -> list[bool]:
    """DiLoCo drops should_commit's answer; keep it, to tell committed syncs from failed ones."""
    commits: list[bool] = []
    original = manager.should_commit

    def should_commit(*args, **kwargs) -> bool:
        decision = original(*args, **kwargs)
        commits.append(decision)
        return decision

    manager.should_commit = should_commit
    return commits


def barrier(out: Path, name: str, names: list[str]) -> None:
    """The first processes start training together, as ostinato's fleet.expect makes them."""
    (out / f"ready.{name}").touch()
    while not all((out / f"ready.{n}").exists() for n in names):
        time.sleep(0.01)


def train_replica(
    out, name, life, cfg, setup, model, inner, outer, stream, manager, state, commits
):
    from torchft.local_sgd import DiLoCo

    log = (out / f"{name}.steps.jsonl").open("a")

    def write(row: dict) -> None:
        log.write(json.dumps({"life": life, **row}) + "\n")
        log.flush()

    # Registered before DiLoCo's own hooks, so the step is logged before a sync starts.
    step_row: dict = {}
    inner.register_step_post_hook(lambda *_: write({**step_row, "end": time.time()}))
    snapshots = []
    with DiLoCo(manager, [model], inner, outer, sync_every=setup["h"]) as diloco:
        while manager.current_step() < setup["rounds"]:
            step_row.update(start=time.time(), step=state["step"] + 1)
            for group in inner.param_groups:
                group["lr"] = lr_at(state["step"], cfg.train)
            inputs, targets = stream.next_batch(cfg.train.batch_size)
            model(inputs, targets).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            state["step"] += 1
            seen = len(commits)
            inner.step()  # DiLoCo syncs inside this call every H steps
            inner.zero_grad(set_to_none=True)
            if len(commits) > seen:
                write({"committed": commits[-1], "healed": state["healed"], "synced": time.time()})
                state["healed"] = False
                if commits[-1] and name == "a":
                    originals = diloco._fragments[0].original_parameters  # the new global model
                    snapshots.append((time.time(), {k: v.clone() for k, v in originals.items()}))
    if snapshots:
        torch.save(snapshots, out / f"{name}.globals.pt")
    manager.shutdown(wait=False)


# --- measuring ------------------------------------------------------------------------------


@dataclass
class Measures:
    survivor_stall_s: float | None
    survivor_extra_wait_s: float | None
    survivor_lost_s: float | None
    restart_first_step_s: float | None
    restart_useful_step_s: float | None
    discarded_survivor: int
    discarded_restarted: int
    lost_in_crash: int
    final_loss: float | None
    first_step: float


def measure(side: Side) -> Measures:
    a, b = side.steps["a"], side.steps["b"]
    stall = extra = None
    syncs = [i for i, s in enumerate(a[:-1]) if s.sync_after]
    after = [i for i in syncs if a[i + 1].start > side.kill]
    if after:
        i = after[0]
        stall = a[i + 1].start - max(side.kill, a[i].end)
        usual = [a[j + 1].start - a[j].end for j in syncs if a[j + 1].start < side.kill][1:]
        normal = statistics.median(usual) if usual else 0.0
        extra = sum(max(0.0, a[j + 1].start - a[j].end - normal) for j in after)
    # A restarted replica that outlives the survivor trains a run of its own (torchft: from its
    # own step 0, alone); those steps are not part of this run.
    run_end = max(s.end for s in a) + 2.0
    new = [s for s in b if s.life == 1 and s.start < run_end]
    ignored = sum(s.life == 1 for s in b) - len(new)
    if ignored:
        side.note += f"; b went on alone after the run ended ({ignored} steps ignored)"
    first = new[0].start - side.restart if new else None
    useful = next((s.start - side.restart for s in new if s.kept), None)
    old = [s for s in b if s.life == 0]
    discarded = sum(not s.kept for s in a)
    step_s = statistics.median(s.end - s.start for s in a)
    lost = None if extra is None else extra + discarded * step_s
    return Measures(
        stall,
        extra,
        lost,
        first,
        useful,
        discarded,
        sum(not s.kept for s in new),
        sum(not s.kept for s in old),
        side.curve[-1][1] if side.curve else None,
        min(s.start for s in a + b),
    )


def time_to(side: Side, target: float, first_step: float) -> float | None:
    return next((t - first_step for t, loss in side.curve if loss <= target + 1e-9), None)


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # already shown: a median and its range
        return value
    if isinstance(value, int):
        return f"{value}{unit}"
    return f"{value:.2f}{unit}"


def ratio(theirs, ours) -> str:
    if theirs is None or ours is None or isinstance(theirs, str) or isinstance(ours, str):
        return "-"
    if ours == 0:
        return "inf" if theirs else "="
    return f"{theirs / ours:.2f}x"


ROWS = [  # label, Measures field, target for ostinato
    ("kill -> survivor trains again (s)", "survivor_stall_s", "<= 2"),
    ("survivor's extra waiting after the kill (s)", "survivor_extra_wait_s", "-"),
    ("survivor's time lost: waiting + discarded steps (s)", "survivor_lost_s", "-"),
    ("restart -> first inner step (s)", "restart_first_step_s", "-"),
    ("restart -> first kept inner step (s)", "restart_useful_step_s", "<= 5"),
    ("inner steps discarded, survivor", "discarded_survivor", "0"),
    ("inner steps discarded, restarted replica", "discarded_restarted", "0"),
    ("inner steps lost with the killed process", "lost_in_crash", "-"),
]


def results(ours: Side, theirs: Side | None) -> list[tuple[str, object, object, str]]:
    """One repeat's rows: (label, ostinato, torchft, target)."""
    m_ours = measure(ours)
    m_theirs = measure(theirs) if theirs else None
    rows = [
        (label, getattr(m_ours, key), getattr(m_theirs, key) if m_theirs else None, goal)
        for label, key, goal in ROWS
    ]
    losses = [m.final_loss for m in (m_ours, m_theirs) if m and m.final_loss is not None]
    target = max(losses) if losses else None
    if target is not None:
        t_ours = time_to(ours, target, m_ours.first_step)
        t_theirs = time_to(theirs, target, m_theirs.first_step) if theirs else None
        rows.append(("time to the same val loss (s)", t_ours, t_theirs, "-"))
    theirs_loss = m_theirs.final_loss if m_theirs else None
    rows.append(
        ("final val loss (the target above: the worse)", m_ours.final_loss, theirs_loss, "-")
    )
    rows.append(("committed rounds", ours.rounds, theirs.rounds if theirs else None, "-"))
    return rows


def print_table(title: str, rows: list[tuple[str, object, object, str]]) -> None:
    print(f"\n{title}\n")
    print("| measure | ostinato | torchft | torchft / ostinato | target (ostinato) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, ours_v, theirs_v, goal in rows:
        shown = "-" if label.startswith(("final", "committed")) else ratio(theirs_v, ours_v)
        print(f"| {label} | {fmt(ours_v)} | {fmt(theirs_v)} | {shown} | {goal} |")


def median_rows(repeats: list[list[tuple]]) -> list[tuple[str, object, object, str]]:
    """Per measure and side: the median over the repeats, and their range."""

    def median(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        mid = statistics.median(values)
        return int(mid) if all(isinstance(v, int) for v in values) and mid == int(mid) else mid

    def spread(values) -> str | None:
        values = [v for v in values if v is not None]
        if len(values) < 2:
            return fmt(median(values)) if values else None
        return f"{fmt(median(values))} ({fmt(min(values))}-{fmt(max(values))})"

    return [
        (rows[0][0], spread([r[1] for r in rows]), spread([r[2] for r in rows]), rows[0][3])
        for rows in zip(*repeats, strict=True)
    ]


def print_details(side: Side | None) -> None:
    if side is not None:
        curve = ", ".join(f"{loss:.3f}" for _, loss in side.curve)
        print(f"{side.name}: {side.note}; val loss by round: {curve}")


# --- main -----------------------------------------------------------------------------------


def add_checkpoint_options(parser: argparse.ArgumentParser, fleet_every: int, why: str) -> None:
    """How often the fleet's islands and the fleet itself write checkpoints (torchft's replicas
    write none)."""
    parser.add_argument(
        "--island-checkpoint-every",
        type=int,
        default=None,
        help="inner steps between an island's own checkpoints (default: H; 0: at the end only)",
    )
    parser.add_argument(
        "--fleet-checkpoint-every",
        type=int,
        default=fleet_every,
        help=f"rounds between fleet checkpoints (default {fleet_every}: {why})",
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--h", type=int, default=20, help="inner steps per round")
    parser.add_argument("--rounds", type=int, default=15, help="committed rounds per run")
    parser.add_argument("--kill-round", type=int, default=5, help="kill b entering this round")
    parser.add_argument("--batch", type=int, default=8, help="sequences per replica per step")
    parser.add_argument("--detect-s", type=float, default=2.0, help="failure detection timeout")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="collective timeout")
    parser.add_argument("--venv", default="/tmp/torchft-venv", help="torchft's own venv")
    parser.add_argument("--make-venv", action="store_true", help="create --venv if missing")
    parser.add_argument("--skip-torchft", action="store_true", help="run the ostinato side only")
    add_checkpoint_options(parser, fleet_every=1, why="every round gives the loss curve")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    return parser.parse_args()


def torchft_ready(args: argparse.Namespace) -> str | None:
    """None if the torchft side can run, else why not."""
    if args.skip_torchft:
        return "skipped (--skip-torchft)"
    if args.make_venv:
        why = make_venv(Path(args.venv))
        if why:
            return why
    if not venv_python(Path(args.venv)).exists():
        return f"no venv at {args.venv} (run with --make-venv)"
    return None


def timed(run, name: str, *run_args) -> Side:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    side = run(*run_args)
    side.note = (
        f"{time.perf_counter() - started:.0f} s, "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{name} side done ({side.note})", flush=True)
    return side


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "worker":
        return worker_main(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="torchft_vs_fleet_"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    cfg, seeds = prepare_data(out, args)
    why = torchft_ready(args)
    if why:
        print(f"torchft side not run: {why}")
    print(f"runs in {out}", flush=True)
    print(f"H={args.h}, {args.rounds} rounds, b killed after step {args.kill_round * args.h}")
    print(f"failure detection {args.detect_s:g} s, collective timeout {args.timeout_s:g} s")
    repeats = []
    for repeat in range(args.repeats):
        run_dir = out / f"run{repeat}"
        (run_dir / "ostinato").mkdir(parents=True)
        (run_dir / "torchft").mkdir()
        sides: dict[str, Side | None] = {"ostinato": None, "torchft": None}
        order = ["ostinato", "torchft"][:: 1 if repeat % 2 == 0 else -1]  # alternate
        for name in order:
            if name == "ostinato":
                sides[name] = timed(run_ostinato, name, run_dir / name, cfg, args)
            elif why is None:
                sides[name] = timed(run_torchft, name, run_dir / name, cfg, seeds, args)
        repeats.append(results(sides["ostinato"], sides["torchft"]))
        print_table(f"repeat {repeat}", repeats[-1])
        print()
        for side in sides.values():
            print_details(side)
    if len(repeats) > 1:
        print_table(f"median (range) of {len(repeats)} repeats", median_rows(repeats))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
