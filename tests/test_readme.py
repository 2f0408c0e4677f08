"""The README's documented Python names import from where it says they live."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DOTTED = re.compile(r"`(cxrlabel(?:\.[A-Za-z_]\w*)+)")


def documented_names(text: str) -> list[str]:
    return sorted(set(DOTTED.findall(text)))


def resolve(dotted: str) -> object:
    """Import the longest module prefix of `dotted`, then walk attributes for the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_readme_documents_public_names() -> None:
    # The README names at least the four entry points users call from Python.
    names = documented_names(README.read_text(encoding="utf-8"))
    leaves = {n.rsplit(".", 1)[1] for n in names}
    assert {"apply_policy", "read_image", "create_model", "write_report"} <= leaves, names


@pytest.mark.parametrize("dotted", documented_names(README.read_text(encoding="utf-8")))
def test_documented_name_imports(dotted: str) -> None:
    assert resolve(dotted) is not None


def test_resolve_fails_for_a_name_that_is_not_there() -> None:
    with pytest.raises(AttributeError):
        resolve("cxrlabel.data.no_such_function")
