"""Checkpoints: safetensors + JSON round trips, strict loading, no pickle, torn-save detection."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import cxrlabel
from cxrlabel.models.checkpoint import (
    CheckpointError,
    checkpoint_paths,
    flatten_optimizer_state,
    load_checkpoint,
    load_training_state,
    load_weights_into,
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


# --------------------------------------------------------------------------------------------
# Hostile checkpoints (issue 11, findings 9 and 11): never the network, always a named error
# --------------------------------------------------------------------------------------------


def _rewrite_meta(path: Path, change: Any) -> Path:
    """Edit a saved checkpoint's JSON in place (as an attacker with write access would)."""
    meta_path = checkpoint_paths(path)[2]
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))
    return meta_path


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way a model build could reach out (a socket, the Hub's downloads) raises and is
    recorded; the test asserts the list stays empty."""
    import socket

    import huggingface_hub

    calls: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise NetworkUsed(f"{name} called with {args!r}")

        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse(name))
        monkeypatch.setattr(huggingface_hub.file_download, name, refuse(name), raising=False)
    import timm.models._hub as timm_hub

    monkeypatch.setattr(timm_hub, "hf_hub_download", refuse("timm hf_hub_download"))
    return calls


@pytest.mark.parametrize(
    "backbone",
    [
        "hf-hub:timm/resnet18.a1_in1k",
        "hf_hub:timm/resnet18.a1_in1k",
        "local-dir:/tmp",
        "timm/resnet18.a1_in1k",
        "https://example.com/model.safetensors",
        "../../resnet18",
        "no_such_backbone",
        "",
    ],
)
def test_checkpoint_backbone_must_be_known_and_local(
    tmp_path: Path, no_network: list[str], backbone: str
) -> None:
    path = save_checkpoint(tmp_path / "best", _model(), config={}, epoch=0, step=0)
    meta_path = _rewrite_meta(path, lambda m: m["model"].update(backbone=backbone))
    with pytest.raises(CheckpointError, match=r"model\.backbone") as info:
        load_checkpoint(path)
    assert str(meta_path) in str(info.value)
    assert no_network == []


def test_checkpoint_with_a_timm_backbone_builds_offline(
    tmp_path: Path, no_network: list[str]
) -> None:
    """A plain timm registry name (with or without a pretrained tag) still loads: pretrained=False,
    so timm never looks at the Hub."""
    torch.manual_seed(0)
    model = create_model("resnet18.a1_in1k", "linear", LABELS, weights="none", size=32)
    path = save_checkpoint(tmp_path / "best", model, config={}, epoch=0, step=0)
    loaded, _ = load_checkpoint(path)
    assert loaded.spec.backbone == "resnet18.a1_in1k"
    assert no_network == []


def _poison(kind: str, weights: Path) -> None:
    import pickle
    import struct

    from safetensors.torch import load_file, save_file

    good = weights.read_bytes()
    state = load_file(str(weights))
    if kind == "random bytes":
        weights.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        weights.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        weights.write_bytes(b"")
    elif kind == "huge header length":
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    elif kind == "header claims huge tensors":
        header = {"head.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20],
                                  "data_offsets": [0, 1 << 42]}}  # fmt: skip
        raw = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    elif kind == "pickle":
        weights.write_bytes(pickle.dumps({k: v.numpy() for k, v in state.items()}))
    elif kind == "wrong shape":
        state["head.weight"] = torch.zeros(7, 7)
        save_file(state, str(weights))
    elif kind == "wrong dtype":
        state["head.weight"] = state["head.weight"].to(torch.int32)
        save_file(state, str(weights))
    elif kind == "missing key":
        del state["head.weight"]
        save_file(state, str(weights))
    elif kind == "unexpected key":
        state["extra.weight"] = torch.zeros(2)
        save_file(state, str(weights))
    else:
        raise AssertionError(kind)


POISONS = (
    "random bytes",
    "truncated",
    "empty",
    "huge header length",
    "header claims huge tensors",
    "pickle",
    "wrong shape",
    "wrong dtype",
    "missing key",
    "unexpected key",
)


@pytest.mark.parametrize("kind", POISONS)
def test_poisoned_weights_are_a_named_error(tmp_path: Path, kind: str) -> None:
    """The attacker rewrites the weights and the hash beside them, so only the loader's own
    checks stand between the file and safetensors / torch tracebacks."""
    path = save_checkpoint(tmp_path / "best", _model(), config={}, epoch=0, step=0)
    weights = checkpoint_paths(path)[0]
    _poison(kind, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _rewrite_meta(path, lambda m: m["sha256"].update(weights=digest))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(weights) in str(info.value)
    model = _model()
    with pytest.raises(CheckpointError, match=str(weights)):
        load_weights_into(path, model)


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "pickle"])
def test_poisoned_training_state_is_a_named_error(tmp_path: Path, kind: str) -> None:
    model, opt = _trained()
    path = save_checkpoint(tmp_path / "last", model, config={}, epoch=0, step=2, optimizer=opt)
    state = checkpoint_paths(path)[1]
    state.write_bytes(
        {
            "random bytes": bytes(range(256)) * 8,
            "truncated": state.read_bytes()[:100],
            "pickle": b"\x80\x04K\x01.",
        }[kind]
    )
    digest = hashlib.sha256(state.read_bytes()).hexdigest()
    _rewrite_meta(path, lambda m: m["sha256"].update(state=digest))
    fresh, fresh_opt = _trained(seed=1)
    with pytest.raises(CheckpointError, match=str(state)):
        load_training_state(path, fresh, fresh_opt)


def _set(*keys: str, value: Any) -> Any:
    def change(meta: dict[str, Any]) -> None:
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def _drop(*keys: str) -> Any:
    def change(meta: dict[str, Any]) -> None:
        target = meta
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set("files", "weights", value="/etc/passwd"), "files"),
        (_set("files", "weights", value="../best.safetensors"), "files"),
        (_set("files", "weights", value="other.safetensors"), "files"),
        (_set("files", "pretrained", value="x.safetensors"), "files"),
        (_set("files", value="best.safetensors"), "files"),
        (_drop("sha256", "weights"), "sha256"),
        (_drop("model", "head"), "model"),
        (_set("model", "pretrained_path", value="/etc/passwd"), "model"),
        (_set("model", "head", value="transformer"), "model.head"),
        (_set("model", "hidden", value=10**9), "model.hidden"),
        (_set("model", "labels", value="Edema"), "model.labels"),
        (_set("model", "labels", value=[]), "model.labels"),
        (_set("preprocessing", "size", value=10**6), "preprocessing"),
        (_set("preprocessing", "file", value="/etc/passwd"), "preprocessing"),
        (_drop("preprocessing"), "preprocessing"),
        (_set("format", value=2), "format"),
    ],
)
def test_crafted_metadata_is_a_named_error(
    tmp_path: Path, no_network: list[str], change: Any, field: str
) -> None:
    path = save_checkpoint(tmp_path / "best", _model(), config={}, epoch=0, step=0)
    meta_path = _rewrite_meta(path, change)
    with pytest.raises(CheckpointError, match=re.escape(field)) as info:
        load_checkpoint(path)
    assert str(meta_path) in str(info.value)
    assert no_network == []


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", "null"])
def test_unreadable_metadata_is_a_named_error(tmp_path: Path, text: str) -> None:
    path = save_checkpoint(tmp_path / "best", _model(), config={}, epoch=0, step=0)
    meta_path = checkpoint_paths(path)[2]
    meta_path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=re.escape(str(meta_path))):
        load_checkpoint(path)


def test_label_with_a_poisoned_model_prints_one_line_and_exits_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    from cxrlabel.cli import main

    films = tmp_path / "films"
    films.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(films / "a.png")
    path = save_checkpoint(tmp_path / "model" / "best", _model(), config={}, epoch=0, step=0)
    weights = checkpoint_paths(path)[0]
    _poison("pickle", weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    _rewrite_meta(path, lambda m: m["sha256"].update(weights=digest))
    args = ["label", str(films), "--model", str(weights), "--out", str(tmp_path / "out"),
            "--backend", "torch", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(weights) in errors[0].getMessage()
    assert "not a readable safetensors" in errors[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err
