"""A torchrun job for tests/training/test_features_distributed.py: `extract_features` of a table
at 32 px with the tiny backbone, with one rank made to fail after its first journaled batch, as a
killed rank would (the `on_batch` hook, which the CLI does not expose).

Usage: torchrun ... dist_extract_job.py CSV CACHE_DIR BATCH_SIZE FAIL_RANK (-1: none fails)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

from cxrlabel import distributed
from cxrlabel.data.formats import load_table
from cxrlabel.models.factory import TINY_PREPROCESSING
from cxrlabel.training.features import extract_features


class RankKilled(RuntimeError):
    """Raised by the failing rank after its first journaled batch."""


def main(argv: list[str]) -> int:
    csv, cache_dir, batch_size, fail_rank = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    env = distributed.dist_env()
    distributed.init_process_group(env, "cpu")

    def on_batch(batch: int) -> None:
        if env.rank == int(fail_rank):
            raise RankKilled(f"rank {env.rank} stopped after batch {batch}")

    try:
        extract_features(
            load_table(Path(csv)), "tiny", "none", replace(TINY_PREPROCESSING, size=32),
            Path(cache_dir), batch_size=int(batch_size), progress=False, env=env,
            on_batch=on_batch,
        )  # fmt: skip
    finally:
        distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
