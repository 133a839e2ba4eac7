"""The trainer's side of rollout islands against a hand-played island: what it sends and what
it refuses (a result changed on its way, ids outside the vocabulary, the wrong shape, a version
never published, a stale one, a replayed or foreign hello). Every refusal is counted, the slice
is generated again, and the batch still completes with the honest result."""

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from ostinato.data.tokenizer import train_tokenizer
from ostinato.fleet import wire
from ostinato.model.llama import Llama
from ostinato.rl.config import RLConfig
from ostinato.rl.fleet import RolloutFleet
from ostinato.rl.island import fingerprint, get_sealed, put_sealed, rl_prefix
from tests.conftest import TINY, cli_env, run_cli, tiny_config
from tests.dist.test_fleet_trust import listening

pytestmark = pytest.mark.timeout(120)
TOKEN = "test-token"


class HandPlayedIsland:
    """Island r0, played by the test: every message built by hand."""

    def __init__(self, address: str, token: str = TOKEN):
        self.token = token
        self.view = torch.distributed.PrefixStore(rl_prefix(TOKEN), wire.connect(address, 10))
        self.seq = 0

    def hello(self, print_, incarnation: str, wait_s: float = 10) -> dict | None:
        body = json.dumps({"fingerprint": print_, "incarnation": incarnation}).encode()
        put_sealed(self.view, self.token, "hello/r0", body, "hello", "r0")
        key = f"verdict/r0/{incarnation}"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            verdict = get_sealed(self.view, TOKEN, key, key)
            if verdict is not None:
                return json.loads(verdict)
            time.sleep(0.01)
        return None

    def next_work(self, incarnation: str) -> tuple[str, dict]:
        self.seq += 1
        key = f"work/r0/{incarnation}/{self.seq}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            work = get_sealed(self.view, TOKEN, key, key)
            if work is not None:
                return key, json.loads(work)
            time.sleep(0.01)
        raise AssertionError(f"no {key}")

    def answer(self, work_key: str, result: dict, token: str = TOKEN) -> None:
        key = work_key.replace("work/", "result/", 1)
        put_sealed(self.view, token, key, json.dumps(result).encode(), key)


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    monkeypatch.setenv("OSTINATO_FLEET_TOKEN", TOKEN)
    cfg = tiny_config()
    tokenizer = train_tokenizer(["What is 1 + 2? #### 3"] * 20, cfg.model.vocab_size)
    model = Llama(cfg.model)
    model.init_weights(0)
    # The hand-played island sends no heartbeats: a minute before that counts against it.
    rl = RLConfig(rollout_islands=1, spawn=False, max_new_tokens=8, rollout_timeout_s=30)
    rl.heartbeat_timeout_s = 60
    fleet = RolloutFleet(rl, model, tokenizer, tmp_path)
    yield fleet
    fleet.close()


def test_hostile_results_are_refused_counted_and_generated_again(fleet):
    island = HandPlayedIsland(fleet.address)
    foreign = fingerprint(replace(fleet.model.cfg, dim=32), fleet.tokenizer)
    admitted = threading.Thread(target=fleet.wait_for_islands)
    admitted.start()
    refused = island.hello(foreign, "aaaa")
    assert refused == {"ok": False, "reason": refused["reason"]}
    assert "model.dim: 32 there, 64 here" in refused["reason"]
    assert island.hello(fleet.print, "bbbb") == {"ok": True}
    admitted.join(timeout=10)
    assert fleet.islands["r0"].incarnation == "bbbb"
    # a replayed hello (an incarnation already seen) gets no new verdict and changes nothing
    island.view.delete_key("verdict/r0/aaaa")
    body = json.dumps({"fingerprint": fleet.print, "incarnation": "aaaa"}).encode()
    put_sealed(island.view, TOKEN, "hello/r0", body, "hello", "r0")
    fleet._admit()  # what the trainer does while it waits for rollouts
    assert not island.view.check(["verdict/r0/aaaa"])
    assert fleet.islands["r0"].incarnation == "bbbb"

    fleet.publish(0)
    fleet.publish(1)
    prompts, seeds = ["What is 1 + 2?"] * 4, [1, 2, 3, 4]
    fleet.issue(2, prompts, seeds, min_version=1)
    collected = {}
    worker = threading.Thread(target=lambda: collected.update(out=fleet.collect(2)))
    worker.start()
    honest = {"version": 1, "answers": [[5, 6]] * 4, "stopped": [True] * 4, "seconds": 0.1}
    honest["behaviour"] = None
    hostile = [
        ("bad MAC", {**honest}, "another-token"),
        ("id outside the vocabulary", {**honest, "answers": [[5, 10**9]] * 4}, TOKEN),
        ("too few answers", {**honest, "answers": [[5]] * 3}, TOKEN),
        ("answer too long", {**honest, "answers": [[5] * 100] * 4}, TOKEN),
        ("version never published", {**honest, "version": 7}, TOKEN),
        ("seconds not a number", {**honest, "seconds": "soon"}, TOKEN),
    ]
    for _, result, token in hostile:
        key, work = island.next_work("bbbb")
        assert work["prompts"] == prompts and work["seeds"] == seeds
        island.answer(key, {**result, "id": key}, token)
    key, _ = island.next_work("bbbb")
    island.answer(key, {**honest, "id": key, "version": 0})  # older than min_version 1: stale
    key, _ = island.next_work("bbbb")
    island.answer(key, {**honest, "id": key})
    worker.join(timeout=20)
    results, _ = collected["out"]
    assert [r["answers"] for r in results] == [honest["answers"]]
    assert results[0]["version"] == 1
    assert fleet.counters.refused == 4 * len(hostile)
    assert fleet.counters.dropped_stale == 4
    assert fleet.counters.lost == 0 and fleet.counters.local == 0


def test_the_trainer_listens_only_where_it_was_told(fleet):
    """rl.bind = 127.0.0.1:0: the store's socket, as the kernel holds it, is on loopback only."""
    port = int(fleet.address.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in listening()
    assert not {(host, p) for host, p in listening() if p == port and host != "127.0.0.1"}


def test_an_island_of_another_model_is_refused_by_name(fleet, tmp_path):
    """`ostinato rl rollout --model-from RUN` of another model, started by hand against a
    trainer that waits for its islands: refused, exit 3, the differing field named."""
    other = tmp_path / "other"
    trained = run_cli(
        "train", "--config", str(TINY), "--out", str(other), "--train.steps=2",
        "--model.dim=32", "--model.n_heads=1", "--checkpoint.every=0", "--train.eval_problems=0",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    island = subprocess.Popen(
        [sys.executable, "-m", "ostinato", "rl", "rollout", "--coordinator", fleet.address,
         "--island", "r0", "--model-from", str(other)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**cli_env(), "OSTINATO_FLEET_TOKEN": TOKEN},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while island.poll() is None and time.monotonic() < deadline:
        fleet._admit()  # what the trainer does while it waits
        time.sleep(0.05)
    output = island.communicate(timeout=30)[0]
    assert island.returncode == 3, output[-2000:]
    assert "refused rollout island r0" in output and "model.dim: 32 there, 64 here" in output
    assert fleet.islands["r0"].incarnation is None
