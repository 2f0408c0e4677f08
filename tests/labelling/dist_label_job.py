"""A torchrun job for tests/labelling/test_batch_distributed.py: `cxrlabel label` with one rank
made to fail after its first batch, as a killed rank would (an on_batch hook, which the CLI
does not expose).

Usage: torchrun ... dist_label_job.py CHECKPOINT OUT FAIL_RANK INPUT...
"""

from __future__ import annotations

import sys
from pathlib import Path

from cxrlabel import distributed
from cxrlabel.labelling.batch import label_inputs
from cxrlabel.models.predictor import load_model


class RankKilled(RuntimeError):
    """Raised by the failing rank after its first committed batch."""


def main(argv: list[str]) -> int:
    checkpoint, out, fail_rank, *inputs = argv
    env = distributed.dist_env()
    distributed.init_process_group(env, "cpu")

    def on_batch(done: int) -> None:
        if env.rank == int(fail_rank):
            raise RankKilled(f"rank {env.rank} stopped after {done} inputs")

    try:
        model = load_model([checkpoint], backend="torch", device="cpu")
        label_inputs(
            inputs, model, Path(out), batch_size=2, progress=False, on_batch=on_batch,
            read_timeout=None, env=env,
        )  # fmt: skip
    finally:
        distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
