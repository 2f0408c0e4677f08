"""Helpers shared by the synthetic-generator tests."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_csvs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    # keep_default_na=False + na_values=[""] : blank cells are NaN, nothing else is.
    kw = {"keep_default_na": False, "na_values": [""]}
    return pd.read_csv(out / "train.csv", **kw), pd.read_csv(out / "valid.csv", **kw)
