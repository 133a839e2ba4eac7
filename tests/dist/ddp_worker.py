"""One rank of a DDP island, launched by torchrun from test_ddp.py; writes its parameter digest."""

import json
import os
import sys
from pathlib import Path

from ostinato.config import load_config
from ostinato.faults.inject import step_hooks
from ostinato.train.trainer import train

config, out, *overrides = sys.argv[1:]
cfg = load_config(config, overrides)
# The entry point chooses the step hooks, as `ostinato train` does: faults.schedule's faults.
result = train(cfg, Path(out), "none", show_progress=False, hooks=step_hooks(cfg))
rank = os.environ["RANK"]
(Path(out) / f"rank{rank}.json").write_text(
    json.dumps({"digest": result.parameter_digest, "step": result.step, "loss": result.final_loss})
)
