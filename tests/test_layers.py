"""The package's import graph follows the data's path: a module imports only its own stage
and the stages before it, never a later one (lazy imports inside functions included).

fileio < data < synth < models < config < evaluation < training < labelling < cli/demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cxrlabel"

# Top-level module or subpackage -> its place on the data's path.
LAYERS = {
    "__init__": 0,
    "fileio": 0,
    "csvcells": 0,  # the CSV cell rule, used by every stage that writes or reads CSVs
    "hardware": 0,  # CPU flags and name, for the training and inference plans
    "distributed": 0,  # which torchrun process this is; used by training and labelling
    "data": 1,
    "synth": 2,
    "models": 3,
    "config": 4,  # RunConfig validates threshold rules from models.thresholds
    "evaluation": 5,
    "training": 6,  # validation metrics and loss plots come from evaluation
    "hospital": 7,  # SR / secondary capture / FHIR from StudyFindings; sending to a PACS
    "labelling": 8,
    "cli": 9,
    "__main__": 9,  # `python -m cxrlabel` (torchrun -m cxrlabel): the command line
    "demo": 9,
}


# Allowed by the order, but a concept with another owner: evaluation learns whether data are
# synthetic from the data layer's marker, not from the generator; the service runs models
# through the model layer, not through the batch labeller.
FORBIDDEN = (
    ("cxrlabel.evaluation", "cxrlabel.synth"),
    ("cxrlabel.labelling.service", "cxrlabel.labelling.batch"),
)


def _stage(module: str) -> str:
    """'cxrlabel.data.images' -> 'data'; 'cxrlabel' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported cxrlabel module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("cxrlabel")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in this package
                found.append((node.lineno, f"<relative import level {node.level}>"))
            elif node.module and node.module.startswith("cxrlabel"):
                found.append((node.lineno, node.module))
    return found


def upward_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        here = _stage(_module_name(path, package))
        if here not in LAYERS:
            problems.append(f"{path}: stage {here!r} has no place in LAYERS")
            continue
        for line, target in _imports(path):
            there = _stage(target) if target.startswith("cxrlabel") else target
            if there not in LAYERS:
                problems.append(f"{path}:{line}: imports {target} (unknown stage)")
            elif LAYERS[there] > LAYERS[here]:
                problems.append(f"{path}:{line}: {here} imports {target} from a later stage")
    return problems


def test_no_module_imports_a_later_stage() -> None:
    assert upward_imports() == []


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        for line, target in _imports(path):
            for importer, owner in FORBIDDEN:
                if _within(name, importer) and _within(target, owner):
                    problems.append(f"{path}:{line}: {name} imports {target}")
    return problems


def test_no_module_reaches_past_a_concepts_owner() -> None:
    assert forbidden_imports() == []


def test_every_subpackage_has_a_place() -> None:
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    stages |= {p.stem for p in PACKAGE.glob("*.py")}
    assert stages <= set(LAYERS), sorted(stages - set(LAYERS))


def test_the_checker_finds_an_upward_import(tmp_path: Path) -> None:
    package = tmp_path / "cxrlabel"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "bad.py").write_text(
        "def f():\n    from cxrlabel.training.finetune import train\n    return train\n"
    )
    (problem,) = upward_imports(package)
    assert "bad.py:2" in problem and "cxrlabel.training.finetune" in problem


@pytest.mark.parametrize("name", ["cxrlabel.data.images", "cxrlabel.models.factory"])
def test_stage_of_a_module(name: str) -> None:
    assert _stage(name) == name.split(".")[1]
