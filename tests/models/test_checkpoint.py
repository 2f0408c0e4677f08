"""Checkpoints: safetensors + JSON round trips, strict loading, no pickle, torn-save detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cxrlabel
from cxrlabel.models.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    flatten_optimizer_state,
    load_checkpoint,
    load_training_state,
    read_metadata,
    remove_checkpoint,
    rename_checkpoint,
    save_checkpoint,
    set_thresholds,
    thresholds_from_metadata,
    unflatten_optimizer_state,
    update_metadata,
)
from cxrlabel.models.factory import CXRModel, create_model, masked_bce_loss
from cxrlabel.models.thresholds import Thresholds

LABELS = ("Cardiomegaly", "Edema", "Pleural Effusion")


def _model(seed: int = 0, head: str = "linear") -> CXRModel:
    torch.manual_seed(seed)
    return create_model("tiny", head, LABELS, weights="none", size=96, hidden=16)


def _trained(seed: int = 0) -> tuple[CXRModel, torch.optim.Adam]:
    """A model and Adam optimizer after two steps, so the optimizer has real state."""
    model = _model(seed, head="mlp3_dropout")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(4, 3, 96, 96)
    target = torch.randint(0, 2, (4, len(LABELS))).float()
    for _ in range(2):
        opt.zero_grad()
        masked_bce_loss(model(x), target, torch.ones_like(target)).backward()
        opt.step()
    return model, opt


def test_paths_from_any_file(tmp_path: Path) -> None:
    expected = (
        tmp_path / "last.safetensors",
        tmp_path / "last.state.safetensors",
        tmp_path / "last.json",
    )
    for name in ("last", "last.safetensors", "last.state.safetensors", "last.json"):
        assert checkpoint_paths(tmp_path / name) == expected


def test_weights_round_trip(tmp_path: Path) -> None:
    model, _ = _trained()
    save_checkpoint(tmp_path / "best", model, config={"lr": 1e-3}, epoch=2, step=7)
    loaded, meta = load_checkpoint(tmp_path / "best.safetensors")
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    assert loaded.spec == model.spec
    assert loaded.preprocessing == model.preprocessing
    assert not loaded.training
    assert meta["epoch"] == 2 and meta["step"] == 7 and meta["config"] == {"lr": 1e-3}
    assert meta["model"]["labels"] == list(LABELS)
    assert meta["versions"]["cxrlabel"] == cxrlabel.__version__
    assert meta["versions"]["torch"] == torch.__version__
    assert {"timm", "safetensors"} <= set(meta["versions"])


def test_only_safetensors_and_json_are_written(tmp_path: Path) -> None:
    model, opt = _trained()
    save_checkpoint(tmp_path / "last", model, config={}, epoch=0, step=2, optimizer=opt)
    names = sorted(p.name for p in tmp_path.iterdir())
    # No leftover temporaries and nothing that would need unpickling.
    assert names == ["last.json", "last.safetensors", "last.state.safetensors"]


def test_training_state_round_trip(tmp_path: Path) -> None:
    model, opt = _trained()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    save_checkpoint(tmp_path / "last", model, config={}, epoch=1, step=2, optimizer=opt)
    torch.manual_seed(999)

    fresh = _model(seed=5, head="mlp3_dropout")
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    meta = load_training_state(tmp_path / "last.json", fresh, fresh_opt)
    assert meta["step"] == 2
    assert torch.equal(torch.get_rng_state(), rng_before)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]  # lr, betas (a tuple again), weight decay
    assert isinstance(b["param_groups"][0]["betas"], tuple)
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["state"][index][name]), (index, name)
    weights = model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())


def test_flatten_unflatten_keeps_scalars() -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2), "flag": 4}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
    }
    tensors, scalars = flatten_optimizer_state(state)
    assert set(tensors) == {"state.0.step", "state.0.exp_avg"}
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(scalars)))
    assert back["param_groups"] == state["param_groups"]
    assert back["state"][0]["flag"] == 4
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2))


def test_torn_save_is_detected(tmp_path: Path) -> None:
    model, _ = _trained()
    save_checkpoint(tmp_path / "last", model, config={}, epoch=0, step=1)
    other = _model(seed=9, head="mlp3_dropout")
    # Weights from another save beside this metadata: what a crash between the writes leaves.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "x.st")
    (tmp_path / "x.st").replace(tmp_path / "last.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "last.json")


def test_load_is_strict(tmp_path: Path) -> None:
    model, _ = _trained()
    meta_path = save_checkpoint(tmp_path / "best", model, config={}, epoch=0, step=1)
    meta = json.loads(meta_path.read_text())
    meta["model"]["labels"] = ["Cardiomegaly"]  # a head of a different width
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(meta_path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


# --------------------------------------------------------------------------------------------
# Metadata updates and thresholds
# --------------------------------------------------------------------------------------------


def test_update_metadata_keeps_weights_and_refuses_weight_keys(tmp_path: Path) -> None:
    model, _ = _trained()
    save_checkpoint(tmp_path / "best", model, config={}, epoch=0, step=1, extra={"a": 1})
    weights = (tmp_path / "best.safetensors").read_bytes()
    meta = update_metadata(tmp_path / "best.json", note="checked", extra=None)
    assert meta["note"] == "checked" and "extra" not in meta
    again = read_metadata(tmp_path / "best.safetensors")  # hashes still verify
    assert again["note"] == "checked" and "extra" not in again
    assert (tmp_path / "best.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]
    for key in ("sha256", "files", "model", "preprocessing"):
        with pytest.raises(CheckpointError, match="describe the weights"):
            update_metadata(tmp_path / "best.json", **{key: {}})
    # A torn checkpoint is reported, not patched.
    (tmp_path / "best.safetensors").write_bytes(weights[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="do not match"):
        update_metadata(tmp_path / "best.json", note="x")


def test_thresholds_are_stored_and_read_back(tmp_path: Path) -> None:
    model, _ = _trained()
    save_checkpoint(tmp_path / "best", model, config={}, epoch=0, step=1)
    meta = read_metadata(tmp_path / "best.json")
    assert "thresholds" not in meta
    assert thresholds_from_metadata(meta) == Thresholds.fixed(LABELS)  # the method's 0.5
    # Given in another order and with a band: stored in the model's label order.
    chosen = Thresholds(
        tuple(reversed(LABELS)), (0.7, 0.4, 0.2), "youden", chosen_on="valid.csv"
    ).with_band(0.05)
    set_thresholds(tmp_path / "best.safetensors", chosen)
    meta = read_metadata(tmp_path / "best.json")
    assert list(meta["thresholds"]["values"]) == list(LABELS)
    back = thresholds_from_metadata(meta)
    assert back == chosen.subset(LABELS)
    assert back.values == (0.2, 0.4, 0.7) and back.rule == "youden"
    _, loaded_meta = load_checkpoint(tmp_path / "best.json")
    assert Thresholds.from_dict(loaded_meta["thresholds"]) == back
    with pytest.raises(CheckpointError, match="no threshold stored"):
        set_thresholds(tmp_path / "best.json", Thresholds.fixed(["Edema"]))


def test_save_checkpoint_with_thresholds(tmp_path: Path) -> None:
    model, _ = _trained()
    chosen = Thresholds(LABELS, (0.3, 0.5, 0.6), "max_f1")
    save_checkpoint(tmp_path / "best", model, config={}, epoch=0, step=1, thresholds=chosen)
    assert thresholds_from_metadata(read_metadata(tmp_path / "best.json")) == chosen


def test_rename_and_remove_checkpoint(tmp_path: Path) -> None:
    model, opt = _trained()
    save_checkpoint(tmp_path / "best-1", model, config={}, epoch=3, step=9, optimizer=opt)
    rename_checkpoint(tmp_path / "best-1.safetensors", tmp_path / "best-2.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best-2.json",
        "best-2.safetensors",
        "best-2.state.safetensors",
    ]
    loaded, meta = load_checkpoint(tmp_path / "best-2.json")
    assert meta["epoch"] == 3 and meta["files"]["weights"] == "best-2.safetensors"
    original = model.state_dict()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())
    remove_checkpoint(tmp_path / "best-2.json")
    assert not list(tmp_path.iterdir())
