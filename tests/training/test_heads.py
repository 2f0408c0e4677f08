"""Frozen-feature approach, "train many heads": head training, the sweep, and its checkpoints
used by every command that takes a model (label, serve, export, evaluate)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlabel.cli import main
from cxrlabel.config import (
    ConfigError,
    HeadConfig,
    build_config,
)
from cxrlabel.data.images import read_image
from cxrlabel.data.labels import resolve_labels
from cxrlabel.labelling.service import create_app
from cxrlabel.models.checkpoint import load_checkpoint, read_metadata
from cxrlabel.models.ensemble import load_ensemble
from cxrlabel.models.factory import masked_bce_loss
from cxrlabel.models.onnx import OnnxModel, export_onnx
from cxrlabel.models.predictor import load_model
from cxrlabel.models.thresholds import choose_thresholds
from cxrlabel.training.features import features_for
from cxrlabel.training.finetune import load_tables
from cxrlabel.training.heads import (
    format_sweep_table,
    predict_head,
    run_extract,
    run_sweep,
    run_train_head,
    train_head,
)
from tests.helpers import local_client

# Module-wide: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tiny_dataset: Path, runs: Path, **overrides) -> HeadConfig:
    values = {
        "train_csv": str(tiny_dataset / "train.csv"),
        "valid_fraction": 0.3,
        "epochs": 3,
        "runs_dir": str(runs),
        "name": "sweep",
        **overrides,
    }
    return HeadConfig.build("tiny-heads", values)


# ---------------------------------------------------------------------------------------------
# Heads on feature matrices


def test_train_head_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    mask = rng.random(y.shape) > 0.2
    losses: list[float] = []
    head = train_head(
        x, y, mask, "mlp3", epochs=15, lr=3e-3, on_epoch=lambda _e, loss: losses.append(loss)
    )
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]
    assert not head.training


def test_train_head_is_seeded_and_leaves_global_rng_alone():
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    y = (x[:, :2] > 0).astype(np.float32)
    mask = np.ones_like(y, dtype=bool)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = train_head(x, y, mask, "mlp3_dropout", epochs=2, seed=5)
    assert torch.rand(1) == expected
    # Dropout draws from the RNG too: a different global state must not change the result.
    torch.manual_seed(999)
    b = train_head(x, y, mask, "mlp3_dropout", epochs=2, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_masked_loss_ignores_masked_entries():
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.randint(0, 2, (4, 3)).float()
    mask = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    flipped = torch.where(mask, targets, 1 - targets)
    loss = masked_bce_loss(logits, targets, mask)
    torch.testing.assert_close(loss, masked_bce_loss(logits, flipped, mask))
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0)


# ---------------------------------------------------------------------------------------------
# The sweep and its checkpoints


@pytest.fixture(scope="module")
def swept(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """One sweep of the tiny backbone x the three heads, thresholds by youden."""
    runs = tmp_path_factory.mktemp("heads")
    config = _config(tiny_dataset, runs, threshold_rule="youden")
    return config, runs / "sweep", run_sweep(config, progress=False)


def test_sweep_rows_table_and_run_folder(swept, tiny_dataset: Path):
    config, run, df = swept
    assert df["Model"].tolist() == ["Tiny_1", "Tiny_3", "Tiny_3_D"]
    for column in ("Acc", "Prec", "Recall", "F Score", "AUROC"):
        values = df[column].to_numpy(dtype=float)
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values), column
    assert all(0.0 <= v <= 1.0 for v in df["Acc"])
    assert df["Checkpoint"].tolist() == [
        f"{m}/checkpoints/best.json" for m in ("Tiny_1", "Tiny_3", "Tiny_3_D")
    ]
    assert HeadConfig.load(run / "config.yaml") == config
    assert pd.read_csv(run / "sweep.csv")["Model"].tolist() == df["Model"].tolist()
    caches = sorted(p.name for p in (run / "features").iterdir())
    assert len(caches) == 2 and {c.split("-")[0] for c in caches} == {"train", "valid"}

    markdown = format_sweep_table(df)
    assert (run / "sweep.md").read_text() == markdown
    lines = markdown.splitlines()
    assert lines[0] == "| Model | Acc | Prec | Recall | F Score | AUROC | Checkpoint |"
    assert lines[2].startswith("| Tiny_1 | ") and len(lines) == 5
    assert lines[4].endswith("| Tiny_3_D/checkpoints/best.json |")

    # A second sweep with the same settings reuses both caches (no new directories).
    again = _config(tiny_dataset, run.parent, name="again", heads=["linear"])
    run_sweep(again, run / "again", progress=False)
    assert sorted(p.name for p in (run / "again" / "features").iterdir()) == caches


def test_checkpoint_metadata_names_backbone_weights_config_and_thresholds(swept, tiny_dataset):
    config, run, _ = swept
    meta = read_metadata(run / "Tiny_3_D" / "checkpoints" / "best.json")
    assert meta["model"]["backbone"] == "tiny" and meta["model"]["head"] == "mlp3_dropout"
    assert meta["model"]["labels"] == list(resolve_labels("competition"))
    assert meta["preprocessing"]["size"] == 64
    assert meta["frozen_backbone"] == {
        "backbone": "tiny",
        "weights": "none",
        "weights_identity": "none",
        "weights_sha256": None,
        "keras_compat": False,
    }
    assert meta["config"]["backbones"] == ["tiny"] and meta["config"]["heads"] == ["mlp3_dropout"]
    assert meta["config"]["threshold_rule"] == "youden"
    assert meta["thresholds"]["rule"] == "youden"
    assert "patient split" in meta["thresholds"]["chosen_on"]
    assert HeadConfig.build(None, meta["config"]) == HeadConfig(
        **{**config.to_dict(), "backbones": ("tiny",), "heads": ("mlp3_dropout",)}
    )


def _validation(config: HeadConfig, run: Path, tmp_path: Path, model_name: str):
    """The checkpoint, the validation films and the head's predictions on their cached
    features (the features the sweep trained and thresholded with)."""
    checkpoint = run / model_name / "checkpoints" / "best.json"
    model, meta = load_checkpoint(checkpoint)
    _, valid = load_tables(config, tmp_path)  # same seed and fraction: the sweep's split
    feats = features_for(
        valid, "tiny", config.weights, model.preprocessing, run / "features", "valid",
        progress=False, keras_compat=config.keras_compat,
    )  # fmt: skip
    assert feats.reused  # the sweep's own cache: same films, same preprocessing
    films = [valid.image_paths()[i] for i in feats.rows]
    return checkpoint, meta, valid, feats, films, predict_head(model.head, feats.features)


def test_3_D_checkpoint_labels_serves_and_exports_like_its_head(swept, tmp_path: Path):
    config, run, _ = swept
    checkpoint, meta, valid, feats, films, expected = _validation(config, run, tmp_path, "Tiny_3_D")
    labels = meta["model"]["labels"]
    assert len(films) >= 3 and expected.shape == (len(films), len(labels))
    # The stored thresholds are the rule's choice on exactly these predictions.
    y, m = feats.targets(valid, labels, config.policy)
    chosen = choose_thresholds(y, expected, m, labels, "youden", band=0.0)
    assert tuple(meta["thresholds"]["values"].values()) == chosen.values

    # cxrlabel label, with the model folder as --model.
    out = tmp_path / "labels"
    args = ["label", *map(str, films), "--model", str(run / "Tiny_3_D"), "--out", str(out)]
    assert main([*args, "--no-progress", "--device", "cpu", "--backend", "torch"]) == 0
    with open(out / "probabilities.csv") as f:
        rows = {Path(r["Path"]).resolve(): r for r in csv.DictReader(f)}
    got = np.array([[float(rows[Path(p).resolve()][k]) for k in labels] for p in films])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    # The service.
    client = local_client(create_app(load_model([checkpoint], backend="torch", device="cpu")))
    for film, want in zip(films, expected, strict=True):
        response = client.post("/predict", files={"file": (film.name, film.read_bytes())})
        assert response.status_code == 200, response.text
        body = response.json()["probabilities"]
        np.testing.assert_allclose([body[k] for k in labels], want, atol=1e-5, rtol=0)

    # export --onnx matches PyTorch.
    onnx_path = export_onnx([checkpoint], tmp_path / "heads.onnx")
    images = [read_image(p) for p in films]
    torch_probs = load_ensemble([checkpoint], device="cpu").predict_images(images)
    np.testing.assert_allclose(torch_probs, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(OnnxModel(onnx_path).predict_images(images), torch_probs,
                               atol=1e-5, rtol=0)  # fmt: skip


def test_evaluate_takes_a_head_checkpoint(swept, tiny_dataset: Path, tmp_path: Path):
    _, run, _ = swept
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(run / "Tiny_1"), "--data", str(tiny_dataset / "train.csv")]
    assert main([*args, "--bootstrap", "5", "--view", "all", "--out", str(out)]) == 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["evaluations"][0]["model"].startswith("Tiny_1")


def test_keras_compat_is_rebuilt_on_load(tiny_dataset: Path, tmp_path: Path):
    config = _config(
        tiny_dataset, tmp_path, heads=["linear"], keras_compat=True, epochs=1, name="keras"
    )
    checkpoint = run_train_head(config, progress=False)
    assert checkpoint == tmp_path / "keras" / "Tiny_1" / "checkpoints" / "best.json"
    model, meta = load_checkpoint(checkpoint)
    assert meta["frozen_backbone"]["keras_compat"] is True
    assert all(bn.eps == 1e-3 for bn in model.modules() if isinstance(bn, torch.nn.BatchNorm2d))
    *_, films, expected = _validation(config, tmp_path / "keras", tmp_path / "split", "Tiny_1")
    got = load_ensemble([checkpoint], device="cpu").predict_images([read_image(p) for p in films])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_weights_file_is_named_by_its_sha256(tiny_dataset: Path, tmp_path: Path):
    import hashlib

    from safetensors.torch import save_file

    from cxrlabel.models.factory import TinyCNN

    weights = tmp_path / "tiny.safetensors"
    torch.manual_seed(3)
    save_file(TinyCNN().state_dict(), str(weights))
    config = _config(
        tiny_dataset, tmp_path, heads=["mlp3"], weights=str(weights), epochs=1, name="file"
    )
    meta = read_metadata(run_train_head(config, progress=False))
    source = meta["frozen_backbone"]
    assert source["weights"] == str(weights)
    assert source["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert source["weights_identity"].startswith(str(weights.resolve()))


# ---------------------------------------------------------------------------------------------
# The commands


def test_cli_extract_then_train_head_reuses_features(tiny_dataset: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    args = ["--preset", "tiny-heads", "--run-dir", str(run), "epochs=2", "heads=mlp3",
            f"train_csv={tiny_dataset / 'train.csv'}", "valid_fraction=0.3"]  # fmt: skip
    assert main(["extract", *args]) == 0
    assert "tiny train: extracted" in capsys.readouterr().out
    assert main(["extract", *args]) == 0
    assert "tiny valid: reused" in capsys.readouterr().out
    assert main(["train-head", *args]) == 0
    assert "Tiny_3/checkpoints/best.json" in capsys.readouterr().out
    _, meta = load_checkpoint(run / "Tiny_3" / "checkpoints" / "best.json")
    assert meta["config"]["epochs"] == 2 and meta["model"]["head"] == "mlp3"
    # --config re-runs from the saved config.yaml, with overrides on top.
    assert main(["sweep", "--config", str(run / "config.yaml"), "--run-dir", str(run)]) == 0
    assert "| Tiny_3 |" in capsys.readouterr().out and (run / "sweep.md").is_file()
    assert main(["sweep", "--config", str(run / "config.yaml"), "heads=linear,mlp3",
                 "--run-dir", str(tmp_path / "two")]) == 0  # fmt: skip
    assert pd.read_csv(tmp_path / "two" / "sweep.csv")["Model"].tolist() == ["Tiny_1", "Tiny_3"]


def test_train_head_needs_one_model_and_presets_of_its_kind(
    tiny_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    config = _config(tiny_dataset, tmp_path)  # three heads
    with pytest.raises(ValueError, match="train-head trains one model"):
        run_train_head(config, progress=False)
    assert main(["sweep", "--preset", "tiny-cpu"]) == 2
    assert "tiny-cpu.yaml is a 'finetune' config (for cxrlabel train), not a 'heads'" in caplog.text
    with pytest.raises(ConfigError, match=r"tiny-heads\.yaml is a 'heads' config"):
        build_config("tiny-heads")
    with pytest.raises(ValueError, match=r"unknown head\(s\) \['mlp9'\]"):
        run_extract(_config(tiny_dataset, tmp_path, heads=["mlp9"]), progress=False)
