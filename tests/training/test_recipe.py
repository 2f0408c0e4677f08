"""The optimisation recipe: frozen stages, per-group lrs, warm-up, EMA, pos_weight, AUC-margin."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cxrlabel.config import ConfigError, RunConfig, build_config
from cxrlabel.models.checkpoint import EMA_PREFIX, checkpoint_paths, read_metadata
from cxrlabel.models.factory import (
    backbone_stages,
    create_model,
    freeze_stages,
    masked_bce_loss,
    module_stages,
)
from cxrlabel.training.execution import choose_execution
from cxrlabel.training.finetune import TrainResult, train, train_step
from cxrlabel.training.recipe import (
    balanced_pos_weight,
    param_groups,
    pos_weights,
    scheduled_lr,
    set_lr,
)

LABELS = ("Cardiomegaly", "Edema", "Atelectasis")


def _config(dataset: Path, runs: Path, name: str, **overrides: object) -> RunConfig:
    values = {
        "name": name,
        "runs_dir": str(runs),
        "train_csv": str(dataset / "train.csv"),
        "size": 32,
        "epochs": 1,
        "batch_size": 4,
        "valid_fraction": 0.25,
        "deterministic": True,
        "seed": 5,
        "device": "cpu",
        "precision": "fp32",
        **overrides,
    }
    return build_config("tiny-cpu", values)


# --------------------------------------------------------------------------------------------
# freeze_stages
# --------------------------------------------------------------------------------------------


def _batch(n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, size, size, generator=generator),
        "target": (torch.rand(n, len(LABELS), generator=generator) > 0.5).float(),
        "mask": torch.ones(n, len(LABELS)),
    }


def test_frozen_stages_get_no_gradient_and_keep_their_statistics(one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model("tiny", "linear", LABELS, weights="none", size=32)
    frozen_count = freeze_stages(model, 2)
    stages = module_stages(model.backbone)
    frozen = {
        f"backbone.{m}.{p}"
        for m, module in model.backbone.named_modules()
        for p, _ in module.named_parameters(recurse=False)
        if stages[m] < 2
    }
    # Tiny's first two blocks: conv + BN each (features.0/.1 and features.4/.5).
    assert frozen == {
        "backbone.features.0.weight", "backbone.features.1.weight", "backbone.features.1.bias",
        "backbone.features.4.weight", "backbone.features.5.weight", "backbone.features.5.bias",
    }  # fmt: skip
    assert frozen_count == sum(dict(model.named_parameters())[n].numel() for n in frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(param_groups(model, 1.0), lr=0.01)
    plan = choose_execution("cpu", "fp32")
    for _ in range(3):
        train_step(model, _batch(), optimizer, plan)
    params = dict(model.named_parameters())
    for name, param in params.items():
        if name in frozen:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name
        else:
            assert param.grad is not None, name
            assert not torch.equal(param, before[name]), name
    after = model.state_dict()
    for bn in ("features.1", "features.5"):  # frozen BN: eval in training, stats unchanged
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            key = f"backbone.{bn}.{stat}"
            assert torch.equal(after[key], before[key]), key
    for bn in ("features.9", "features.13"):  # the trainable stages' BN statistics move
        key = f"backbone.{bn}.running_mean"
        assert not torch.equal(after[key], before[key]), key
    assert model.training and not model.backbone.features[1].training


def test_freeze_stages_names_the_number_of_stages() -> None:
    model = create_model("tiny", "linear", LABELS, weights="none", size=32)
    assert len(backbone_stages(model.backbone)) == 4
    with pytest.raises(ValueError, match="4 stages"):
        freeze_stages(model, 5)
    with pytest.raises(ConfigError):
        RunConfig(freeze_stages=-1)


@pytest.mark.parametrize("backbone", ["xception", "densenet121"])
def test_stages_of_timm_backbones(backbone: str, one_thread: None) -> None:
    """Every one of the five reduction stages holds parameters; freezing them all leaves only
    what follows the last stage (nothing, for these two) and the head trainable."""
    model = create_model(backbone, "linear", LABELS, weights="none", size=64)
    stages = module_stages(model.backbone)
    assert len(backbone_stages(model.backbone)) == 5
    owners = {
        stages[m]
        for m, module in model.backbone.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    assert owners == {0, 1, 2, 3, 4}
    freeze_stages(model, 5)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


# --------------------------------------------------------------------------------------------
# Learning rates
# --------------------------------------------------------------------------------------------


def test_warmup_then_cosine_decay() -> None:
    lrs = [scheduled_lr(0.1, "cosine", s, 100, warmup_steps=10) for s in range(101)]
    rise = np.diff(lrs[:10])
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert np.allclose(rise, 0.01)  # linear
    assert lrs[10] == pytest.approx(0.1)
    assert all(b < a for a, b in pairwise(lrs[10:]))  # then decays
    assert lrs[99] < 1e-3 and lrs[100] == pytest.approx(0.0)
    constant = [scheduled_lr(0.1, "constant", s, 100, warmup_steps=4) for s in range(8)]
    assert constant == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert scheduled_lr(0.1, "cosine", 5, 10) == pytest.approx(0.05)  # no warm-up: as before


def test_backbone_and_head_groups_follow_the_schedule() -> None:
    model = create_model("tiny", "linear", LABELS, weights="none", size=32)
    optimizer = torch.optim.Adam(param_groups(model, 0.1), lr=1.0)
    assert len(optimizer.param_groups) == 2
    lr = scheduled_lr(0.01, "cosine", 3, 10, warmup_steps=2)
    set_lr(optimizer, lr)
    train_step(model, _batch(), optimizer, choose_execution("cpu", "fp32"))
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.1 * lr) and head["lr"] == pytest.approx(lr)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}


# --------------------------------------------------------------------------------------------
# pos_weight
# --------------------------------------------------------------------------------------------


def test_weighted_bce_equals_hand_computed_value() -> None:
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weight = torch.tensor([3.0, 0.5])

    def log_sigmoid(x: float) -> float:
        return math.log(1.0 / (1.0 + math.exp(-x)))

    image0 = -3.0 * log_sigmoid(0.5) - log_sigmoid(1.0)  # positive x3, negative (1-s(x)=s(-x))
    image1 = -log_sigmoid(-2.0)  # label 1 masked
    expected = (image0 + image1) / 2
    got = masked_bce_loss(logits, targets, mask, pos_weight=weight)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(masked_bce_loss(logits, targets, mask)) != pytest.approx(expected)


def test_balanced_weights_match_counts() -> None:
    # Label 0: 1 positive, 3 negatives (one masked row left out); label 1: no positives;
    # label 2: no negatives; label 3: nothing certain.
    targets = np.array([[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 1, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 0]])
    assert balanced_pos_weight(targets, mask).tolist() == pytest.approx([3.0, 50.0, 1 / 50, 1.0])
    labels = ("Cardiomegaly", "Edema", "Atelectasis", "Consolidation")
    assert pos_weights("none", labels, targets, mask) is None
    assert pos_weights("Edema=2.5", labels, targets, mask) == {
        "Cardiomegaly": 1.0, "Edema": 2.5, "Atelectasis": 1.0, "Consolidation": 1.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="Effusion"):
        pos_weights("Effusion=2", labels, targets, mask)


def test_pos_weight_config_is_checked() -> None:
    assert RunConfig(pos_weight="Edema=2,Cardiomegaly=0.5").pos_weight.startswith("Edema")
    with pytest.raises(ConfigError, match="Pneumothorax"):  # not among the competition labels
        RunConfig(pos_weight="Pneumothorax=2")
    for bad in ("Edema", "Edema=-1", "Edema=x", "weighted"):
        with pytest.raises(ConfigError):
            RunConfig(pos_weight=bad)


# --------------------------------------------------------------------------------------------
# Runs: EMA (and resume), warm-up, groups and pos_weight recorded; the AUC-margin stage
# --------------------------------------------------------------------------------------------

RECIPE = {
    "ema_decay": 0.9,
    "backbone_lr_scale": 0.1,
    "warmup_epochs": 0.5,
    "lr_schedule": "cosine",
    "pos_weight": "balanced",
    "freeze_stages": 1,
}


@pytest.fixture(scope="module")
def recipe_run(
    tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None
) -> TrainResult:
    runs = tmp_path_factory.mktemp("recipe_runs")
    return train(_config(tiny_dataset, runs, "recipe", **RECIPE))


def _last_tensors(result: TrainResult) -> tuple[dict, dict]:
    weights, state, _ = checkpoint_paths(result.last_checkpoint)
    ema = {k[len(EMA_PREFIX) :]: v for k, v in load_file(str(state)).items() if "ema." in k}
    return load_file(str(weights)), ema


def test_ema_weights_are_what_best_holds(recipe_run: TrainResult) -> None:
    raw, ema = _last_tensors(recipe_run)
    best = load_file(str(recipe_run.best_checkpoint))
    assert raw.keys() == ema.keys() == best.keys()
    head = "head.weight"
    assert not torch.equal(raw[head], ema[head])  # the average lags the raw weights
    assert all(torch.equal(best[k], ema[k]) for k in best)  # one epoch: best is its end


def test_run_records_groups_schedule_and_pos_weight(recipe_run: TrainResult) -> None:
    steps = pd.read_csv(recipe_run.run_dir / "metrics.csv").query("kind == 'step'")
    lrs = steps.lr.tolist()
    warmup = max(1, round(0.5 * len(lrs)))
    assert lrs[:warmup] == pytest.approx([0.003 * (i + 1) / warmup for i in range(warmup)])
    assert lrs[warmup] == pytest.approx(0.003)  # the cosine starts at the full rate ...
    assert all(b < a for a, b in pairwise(lrs[warmup:]))  # decays
    assert set(steps.stage) == {"bce"}
    groups = read_metadata(recipe_run.last_checkpoint)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 * lrs[-1], lrs[-1]])
    summary = json.loads((recipe_run.run_dir / "summary.json").read_text())
    weights = summary["pos_weight"]
    assert list(weights) == summary["labels"]
    assert all(1 / 50 <= w <= 50 for w in weights.values())
    assert summary["best_stage"] == "bce"


def test_resume_with_ema_is_exact(
    recipe_run: TrainResult, tiny_dataset: Path, tmp_path: Path, one_thread: None
) -> None:
    config = _config(tiny_dataset, tmp_path, "killed", **RECIPE)
    killed = train(config, stop_after_steps=2, checkpoint_every_steps=1)
    assert not killed.completed
    resumed = train(config, resume=True)
    assert resumed.completed
    for a, b in zip(_last_tensors(recipe_run), _last_tensors(resumed), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(str(recipe_run.best_checkpoint)), load_file(str(resumed.best_checkpoint))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_aucm_stage_follows_the_bce_epochs(
    tiny_dataset: Path, tmp_path: Path, one_thread: None
) -> None:
    config = _config(
        tiny_dataset, tmp_path, "aucm", epochs=1, aucm_epochs=1, aucm_lr=0.05,
        select_best="val_auroc", require_certain=False,
    )  # fmt: skip
    result = train(config)
    assert result.completed and result.metrics["epochs"] == 2
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    epochs = metrics.query("kind == 'epoch'")
    assert epochs.stage.tolist() == ["bce", "aucm"] and epochs.epoch.tolist() == [0, 1]
    aucm = metrics.query("kind == 'step' and stage == 'aucm'")
    bce = metrics.query("kind == 'step' and stage == 'bce'")
    assert len(aucm) == len(bce) and (aucm.epoch == 1).all()
    assert (aucm.lr == 0.05).all()
    assert aucm.train_loss.notna().all() and aucm.train_loss.nunique() > 1  # the loss moves
    # A different objective: AUC-M on probabilities is far below BCE summed over labels.
    assert aucm.train_loss.abs().max() < bce.train_loss.min()
    assert result.metrics["best_stage"] in ("bce", "aucm")
    assert result.metrics["best_epoch"] in (0, 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"warmup_epochs": 4.0, "epochs": 3},
        {"warmup_epochs": -1.0},
        {"ema_decay": 1.0},
        {"backbone_lr_scale": -0.5},
        {"aucm_epochs": -1},
        {"aucm_lr": 0.0},
        {"aucm_margin": -1.0},
    ],
)
def test_recipe_values_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RunConfig(**bad)
    assert RunConfig().to_dict()["freeze_stages"] == 0  # defaults: the method's plain run
