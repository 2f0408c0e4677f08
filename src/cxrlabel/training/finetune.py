"""End-to-end fine-tuning (approach 2): one `train(config)` call makes a complete run folder.

The folder's layout (default ``<config.runs_dir>/<config.name>``: config.yaml, splits/,
metrics.csv, plots/loss.png, checkpoints/{last,best,epoch-NNNN,kept.json}, summary.json) is
cxrlabel.models.run_folder's; the checkpoints, and the order that lets end-of-epoch
bookkeeping survive a kill at any point, are cxrlabel.training.saver's `CheckpointSaver`.
This module is the training loop: data, steps, validation, metrics.csv and the summary.

Every best / kept checkpoint carries decision thresholds in its metadata ("thresholds"):
chosen per label by `config.threshold_rule` (fixed 0.5, youden, max_f1) on that epoch's
validation predictions (image level), optionally with a +/- `uncertainty_band`. They are chosen
when the checkpoint is saved, from the very predictions that ranked it, so no extra pass over
the validation set is needed and a resumed run stores the same thresholds.

Preprocessing caches go to ``<run_dir>/../.cache/<settings>-<image list hash>/`` so runs over
the same images at the same resize settings share one.

Resuming is exact: each epoch's order comes from a generator seeded by (seed, epoch), the
batches an interrupted epoch already did are skipped, and weights, optimizer state and the
global RNG come back from `last`. With ``config.deterministic`` a resumed run ends with the
same weights, bit for bit, as one that was never interrupted (with ema_decay, the EMA is saved
in `last` too). Inside the AUC-margin stage (aucm_epochs) a resume restarts that stage's PESG
optimizer and loss state, so it is not exact there.

The optimisation recipe (frozen stages, per-group learning rates, warm-up, EMA, pos_weight,
the AUC-margin stage) is built from RunConfig's "Recipe: optimisation" keys by
cxrlabel.training.recipe; every default leaves the method's plain Adam + masked BCE run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from cxrlabel.config import RunConfig, load_config
from cxrlabel.data.cache import ImageCache, prepare_cache
from cxrlabel.data.dataset import CXRDataset, collate_skipping
from cxrlabel.data.formats import load_table
from cxrlabel.data.labels import (
    POSITIVE,
    LabelTable,
    filter_certain,
    filter_view,
    resolve_labels,
)
from cxrlabel.data.splits import patient_split, save_split
from cxrlabel.data.transforms import AugmentConfig, augment_config, zoom_range
from cxrlabel.distributed import (
    DistEnv,
    DistributedError,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    dist_env,
    init_process_group,
    per_process_batch,
    process_device,
    shard,
    step_batches,
)
from cxrlabel.evaluation.figures import loss_plot_png
from cxrlabel.evaluation.metrics import METRIC_NAMES, metrics_table
from cxrlabel.fileio import atomic_write_bytes
from cxrlabel.models.checkpoint import checkpoint_paths, load_weights_into
from cxrlabel.models.factory import (
    CXRModel,
    create_model,
    freeze_stages,
    masked_bce_loss,
    resolve_device,
)
from cxrlabel.models.run_folder import (
    RunFolder,
    json_value,
    read_metrics_until,
    write_metrics,
    write_summary,
)
from cxrlabel.models.thresholds import Thresholds, choose_thresholds
from cxrlabel.training.execution import ExecutionPlan, autocast, choose_execution, to_device
from cxrlabel.training.recipe import (
    LR_SCHEDULES,
    AucmObjective,
    param_groups,
    pos_weights,
    positive_fractions,
    scheduled_lr,
    set_lr,
)
from cxrlabel.training.saver import CheckpointSaver

log = logging.getLogger(__name__)

# Config keys that change when `last` is written, not what a run computes: a resumed run may
# use another value than the one it was started with.
RESUME_MAY_CHANGE = frozenset({"checkpoint_every_steps"})


@dataclass(frozen=True)
class TrainResult:
    """Where a run went and how its best epoch did on validation."""

    run_dir: Path
    best_checkpoint: Path  # the weights file; its metadata is the .json beside it
    last_checkpoint: Path
    metrics: Mapping[str, Any]  # summary.json's contents
    completed: bool = True  # False when `stop_after_steps` ended the run early


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    plan: ExecutionPlan,
    loss_fn: LossFn = masked_bce_loss,
    loss_scale: float = 1.0,
) -> float:
    """One optimisation step on a batch already on the device; returns the (unscaled) loss.

    loss_fn(logits, targets, mask): the method's masked BCE unless a recipe says otherwise.
    loss_scale: multiplies the loss before backward (a DDP rank's share of the global batch).
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast(plan):
        logits = model(batch["image"])
    # The loss in fp32: bf16 logits would round the small per-label terms away.
    loss = loss_fn(logits.float(), batch["target"], batch["mask"])
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    optimizer.step()
    return float(loss.detach())


BatchMover = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


def uint8_batches(device: str) -> bool:
    """Whether batches travel as uint8 films and are finished on the device (float
    conversion, augmentation, normalisation: `CXRDataset.model_input_batch`).

    On CUDA: a quarter of the bytes to copy and no per-image float work in the loader's
    workers. On the CPU the float path stays (the same arithmetic either way; the float path
    spreads it over the workers), so CPU results do not change.
    """
    return device == "cuda"


def loader_options(device: str, workers: int) -> dict[str, Any]:
    """DataLoader keyword arguments for a device and a worker count: pinned memory on CUDA
    (so `to_device`'s non_blocking copies overlap the step), and with workers, workers that
    live as long as the loader and keep 4 batches each in flight."""
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device == "cuda"}
    if workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def batch_to_device(
    raw: Mapping[str, torch.Tensor], plan: ExecutionPlan, dataset: CXRDataset
) -> dict[str, torch.Tensor]:
    """`to_device`, and uint8 films (a `uint8` dataset's) finished there by the dataset."""
    batch = to_device(raw, plan)
    if batch["image"].dtype == torch.uint8:
        image = dataset.model_input_batch(batch["image"], raw["index"])
        if plan.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        batch["image"] = image
    return batch


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: DataLoader,
    plan: ExecutionPlan,
    move: BatchMover | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Probabilities, targets and masks over a loader, and the mean masked BCE per image.

    move: puts a loader batch on the device as a model input (default `to_device`)."""
    scores, targets, masks, loss_sum, count = predict_parts(model, loader, plan, move)
    if not count:
        raise ValueError("validation set is empty")
    return scores, targets, masks, loss_sum / count


@torch.no_grad()
def predict_parts(
    model: torch.nn.Module,
    loader: DataLoader,
    plan: ExecutionPlan,
    move: BatchMover | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int]:
    """`predict`'s arrays (empty when the loader is), the summed masked BCE and the image
    count: what a DDP rank contributes to the whole validation set's predictions."""
    model.eval()
    labels = len(model.spec.labels) if hasattr(model, "spec") else 0
    scores, targets, masks = [np.zeros((0, labels), np.float32)], [], []
    loss_sum, count = 0.0, 0
    for raw in loader:
        if raw is None:  # every image of the batch was unreadable (and reported)
            continue
        batch = move(raw) if move is not None else to_device(raw, plan)
        with autocast(plan):
            logits = model(batch["image"]).float()
        n = logits.shape[0]
        loss_sum += float(masked_bce_loss(logits, batch["target"], batch["mask"])) * n
        count += n
        scores.append(torch.sigmoid(logits).cpu().numpy())
        targets.append(raw["target"].numpy())
        masks.append(raw["mask"].numpy())
    empty = np.zeros((0, labels), np.float32)
    return (
        np.concatenate(scores),
        np.concatenate(targets or [empty]),
        np.concatenate(masks or [empty]),
        loss_sum,
        count,
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _filtered(table: LabelTable, config: RunConfig, labels: Sequence[str]) -> LabelTable:
    table = filter_view(table, config.view)
    return filter_certain(table, labels) if config.require_certain else table


def filtered_table(config: RunConfig, csv: str | Path) -> LabelTable:
    """`csv` read in config.format and filtered as training filters it (view, and
    require_certain among config.labels). A HeadConfig has the same keys and works too."""
    table = load_table(Path(csv), config.format, allow_outside_paths=config.allow_outside_paths)
    return _filtered(table, config, resolve_labels(config.labels))


def load_tables(
    config: RunConfig, run_dir: Path, *, save: bool = True
) -> tuple[LabelTable, LabelTable]:
    """Training and validation tables, filtered; a split of train is saved under splits/
    (unless `save` is False: the ranks of a torchrun job other than 0)."""
    if not config.train_csv:
        raise ValueError("config.train_csv is empty: nothing to train on")
    train_table = filtered_table(config, config.train_csv)
    if config.valid_csv:
        valid_table = filtered_table(config, config.valid_csv)
    else:
        split = patient_split(train_table, config.valid_fraction, config.seed)
        if save:
            save_split(split, RunFolder(run_dir).split)
        train_table, valid_table = split.apply(train_table)
    return _checked_tables((train_table, valid_table), "after filtering")


def cache_dir_for(root: Path, paths: Sequence[Path], model: CXRModel) -> Path:
    """A cache folder keyed by resize geometry and the image list, so runs can share it."""
    geometry = model.preprocessing.geometry
    digest = hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()[:16]
    name = f"{geometry.size}px-{geometry.resize_mode}-{geometry.interpolation}-{digest}"
    return root / name


def make_dataset(
    table: LabelTable,
    model: CXRModel,
    config: RunConfig,
    cache_root: Path,
    *,
    augmentation: AugmentConfig | None,
    train: bool = True,
    uint8: bool = False,
) -> CXRDataset:
    """The dataset of a run's table; `train` draws LSR soft targets (validation: 0/1);
    `uint8`: items carry uint8 films, finished on the device (see `uint8_batches`)."""
    cache: ImageCache | None = None
    if config.use_cache:
        paths = table.image_paths()
        cache = prepare_cache(
            paths,
            cache_dir_for(cache_root, paths, model),
            model.preprocessing.geometry,
            workers=config.workers or None,
        )
    return CXRDataset(
        table,
        model.spec.labels,
        model.preprocessing,
        policy=config.policy,
        cache=cache,
        augmentation=augmentation,
        on_error="skip",
        seed=config.seed,
        smooth_labels=train,
        uint8=uint8,
    )


def augmentation_from(config: RunConfig) -> AugmentConfig | None:
    """config.augment's preset with the config's non-zero augmentation fields over it."""
    aug = augment_config(
        config.augment,
        rotation_deg=config.rotation_deg,
        scale=zoom_range(config.scale),
        translate=config.translate,
        brightness=config.brightness,
        contrast=config.contrast,
        hflip=config.hflip,
    )
    return aug if aug.enabled else None


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed for one epoch's order and augmentations: a function of (seed, epoch) only."""
    return (seed * 1_000_003 + epoch * 7_919 + 1) % (2**63)


def epoch_order(
    n: int,
    seed: int,
    epoch: int,
    *,
    positives: np.ndarray | None = None,
    pos_fraction: float = 0.5,
) -> list[int]:
    """One epoch's order of dataset indices: a pure function of its arguments, so a resumed
    run sees the very same order.

    Without `positives`: a permutation of range(n). With a bool [n] `positives` (the
    "oversample" sampler, LibAUC's DualSampler idea): n indices of which round(pos_fraction *
    n) are positives and the rest the other images, shuffled together. A group too small for
    its share is repeated (every member once per round, rounds drawn anew); a large enough
    one is drawn without replacement. LibAUC's DualSampler itself is not used: it draws from
    numpy's global RNG, so an epoch's order would not be a function of (seed, epoch).
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if positives is None:
        return torch.randperm(n, generator=generator).tolist()
    positives = np.asarray(positives, dtype=bool)
    if len(positives) != n:
        raise ValueError(f"positives has {len(positives)} entries for {n} images")
    n_pos = round(pos_fraction * n)
    pos, rest = np.flatnonzero(positives), np.flatnonzero(~positives)
    if (n_pos and not len(pos)) or (n - n_pos and not len(rest)):
        raise ValueError(
            f"oversample needs positives and other images; the training set has {len(pos)} "
            f"positives and {len(rest)} others"
        )
    picked = np.concatenate([_draw(pos, n_pos, generator), _draw(rest, n - n_pos, generator)])
    return picked[torch.randperm(n, generator=generator).numpy()].tolist()


def _draw(pool: np.ndarray, k: int, generator: torch.Generator) -> np.ndarray:
    """k indices from pool: whole shuffled rounds of it, the last one cut short."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    rounds = -(-k // len(pool))
    perms = [pool[torch.randperm(len(pool), generator=generator).numpy()] for _ in range(rounds)]
    return np.concatenate(perms)[:k]


def train_order(dataset: CXRDataset, config: RunConfig, epoch: int) -> list[int]:
    """`epoch_order` for a training set under config.sampler."""
    if config.sampler == "shuffle":
        return epoch_order(len(dataset), config.seed, epoch)
    label = config.sampler_label or dataset.labels[0]
    column = dataset.values[dataset.rows, dataset.labels.index(label)]
    positives = column == POSITIVE
    return epoch_order(
        len(dataset), config.seed, epoch, positives=positives, pos_fraction=config.pos_fraction
    )


def make_loader(
    dataset: CXRDataset,
    order: Sequence[int] | None,
    config: RunConfig,
    plan: ExecutionPlan,
    *,
    seed: int = 0,
    batches: Sequence[Sequence[int]] | None = None,
) -> DataLoader:
    """A loader over `order` (a list of dataset indices), or over the dataset in sequence;
    or, given `batches` (lists of dataset indices), those batches in turn."""
    # Its own generator: otherwise each new iterator draws its worker base seed from the
    # global RNG, and a resumed run (one more iterator) would drift from an uninterrupted one.
    options = loader_options(plan.device, config.workers)
    if batches is not None:
        return DataLoader(
            dataset,
            batch_sampler=[list(b) for b in batches],
            collate_fn=collate_skipping,
            generator=torch.Generator().manual_seed(seed),
            **options,
        )
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=list(order) if order is not None else None,
        shuffle=False,
        collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


# --------------------------------------------------------------------------------------------
# Run folder: plot and AUROCs
# --------------------------------------------------------------------------------------------


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def label_aurocs(table: pd.DataFrame) -> dict[str, float | None]:
    return {
        str(row["Label"]): None if _isnan(float(row["AUROC"])) else float(row["AUROC"])
        for _, row in table.iterrows()
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where training stands; saved in `last.json` (beside the saver's ranking) so a resumed
    run picks up here."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # optimisation steps done over the whole run

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def run_context(config: RunConfig) -> Iterator[None]:
    """Seed the global RNG and set determinism for the run; put everything back afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        try:
            if config.deterministic:
                torch.use_deterministic_algorithms(True)
                torch.backends.cudnn.benchmark = False
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
            torch.backends.cudnn.benchmark = cudnn_benchmark


def validation_source(config: RunConfig) -> str:
    """What the run validates on, in words (for thresholds' `chosen_on` and reports)."""
    if config.valid_csv:
        return Path(config.valid_csv).name
    return f"{config.valid_fraction:.0%} patient split of {Path(config.train_csv).name}"


def _checked_tables(
    tables: tuple[LabelTable, LabelTable], what: str = "given tables"
) -> tuple[LabelTable, LabelTable]:
    train_table, valid_table = tables
    if not len(train_table) or not len(valid_table):
        raise ValueError(
            f"{what}: {len(train_table)} training and {len(valid_table)} validation "
            "images; both must be non-empty"
        )
    log.info("%d training and %d validation images (%s)", len(train_table), len(valid_table), what)
    return train_table, valid_table


def _check_resumable(config: RunConfig, run_dir: Path) -> None:
    saved = RunFolder(run_dir).config
    if not saved.is_file():
        return
    old, new = load_config(saved).to_dict(), config.to_dict()
    changed = sorted(k for k in new if k not in RESUME_MAY_CHANGE and old.get(k) != new[k])
    if changed:
        raise ValueError(f"{run_dir}: cannot resume with a different config (changed: {changed})")


def sync_batchnorm(device: str, distributed: bool) -> bool:
    """Whether a run's BatchNorm layers become SyncBatchNorm (statistics over the global
    batch): under torchrun on CUDA only, since SyncBatchNorm needs CUDA and NCCL; gloo/CPU
    runs keep per-process BatchNorm."""
    return distributed and device == "cuda"


class _Run:
    """State shared by the steps of one `train` call."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        every: int | None,
        tables: tuple[LabelTable, LabelTable] | None = None,
        env: DistEnv | None = None,
    ) -> None:
        self.env = env = env or DistEnv.single()
        if env.distributed:
            if config.aucm_epochs:
                raise DistributedError("aucm_epochs is not supported under torchrun yet")
            self.rank_batch = per_process_batch(config.batch_size, env)
        self.config = config
        self.run_dir = run_dir
        self.folder = RunFolder(run_dir)
        self.every = every
        self.plan = choose_execution(config.device, config.precision)
        log.info("execution: %s", self.plan.to_dict())
        if tables is None:
            train_table, valid_table = load_tables(config, run_dir, save=env.is_main)
            self.valid_source = validation_source(config)
        else:
            train_table, valid_table = _checked_tables(tables)
            self.valid_source = valid_table.source
        self.model = create_model(
            config.backbone,
            config.head,
            resolve_labels(config.labels),
            weights=config.weights,
            hidden=config.hidden,
            size=config.size or None,
            resize_mode=config.resize_mode,
            equalize=config.equalize,
        ).to(self.plan.device)
        if self.plan.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        freeze_stages(self.model, config.freeze_stages)
        cache_root = self.folder.cache_root
        # Rank 0 builds the preprocessing caches; the others wait, then find them up to date.
        if not env.is_main:
            barrier(env)
        uint8 = uint8_batches(self.plan.device)
        log.info("batches: %s", "uint8, finished on the device" if uint8 else "float32")
        self.train_set = make_dataset(
            train_table, self.model, config, cache_root, augmentation=augmentation_from(config),
            uint8=uint8,
        )  # fmt: skip
        self.valid_set = make_dataset(
            valid_table, self.model, config, cache_root, augmentation=None, train=False,
            uint8=uint8,
        )  # fmt: skip
        if env.is_main:
            barrier(env)
        # What the steps run: DDP around the model under torchrun (it all-reduces the
        # gradients); checkpoints, EMA and validation use the model itself.
        self.step_model: torch.nn.Module = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            if sync_batchnorm(self.plan.device, env.distributed):
                # Before DDP and the optimizer; the parameters themselves are kept.
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            device = process_device(env, self.plan.device)
            self.step_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        if config.compile:
            # Around DDP, as PyTorch's DDP docs do (its optimizer splits the graph at the
            # gradient buckets). Only the step is compiled: checkpoints, EMA and validation
            # use self.model, whose state_dict has no "_orig_mod." prefixes.
            self.step_model = torch.compile(self.step_model)
        self.optimizer = torch.optim.Adam(
            param_groups(self.model, config.backbone_lr_scale),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        steps_per_epoch = math.ceil(len(self.train_set) / config.batch_size)
        self.total_steps = config.epochs * steps_per_epoch
        self.warmup_steps = (
            max(1, round(config.warmup_epochs * steps_per_epoch)) if config.warmup_epochs else 0
        )
        rows = self.train_set.rows  # the images the loss sees (unreadable ones left out)
        self.train_targets = self.train_set.targets[rows], self.train_set.mask[rows]
        self.pos_weight = pos_weights(
            config.pos_weight, self.model.spec.labels, *self.train_targets
        )
        self.loss_fn: LossFn = masked_bce_loss
        if self.pos_weight is not None:
            log.info("BCE pos_weight: %s", self.pos_weight)
            weights = torch.tensor(list(self.pos_weight.values()), device=self.plan.device)
            self.loss_fn = partial(masked_bce_loss, pos_weight=weights)
        self.ema = self.make_ema()
        # What validation and inference checkpoints use: the EMA weights when there are any.
        self.eval_model: CXRModel = self.ema.module if self.ema is not None else self.model
        self.aucm: AucmObjective | None = None  # built when the AUC-margin stage starts
        self.progress = Progress()
        self.rows: list[dict[str, Any]] = []
        self.images_per_s: list[float] = []
        self.saver = CheckpointSaver(
            self.folder, self.model, self.optimizer, select_best=config.select_best,
            keep_best=config.keep_best, config=config.to_dict(),
            extra={"execution": self.plan.to_dict()},
            ema=self.ema.module if self.ema is not None else None, writer=env.is_main,
        )  # fmt: skip

    def make_ema(self) -> Any:
        """timm's ModelEmaV3 of the weights when config.ema_decay > 0, else None."""
        if not self.config.ema_decay:
            return None
        from timm.utils import ModelEmaV3

        # Warm-up (decay grows with the step up to ema_decay): short CPU runs have too few
        # steps for a fixed 0.999 to forget the randomly initialised head.
        return ModelEmaV3(self.model, decay=self.config.ema_decay, use_warmup=True)

    def stage(self, epoch: int) -> str:
        """ "bce" for the first config.epochs epochs, "aucm" for the AUC-margin ones after."""
        return "aucm" if epoch >= self.config.epochs else "bce"

    def start_aucm(self) -> None:
        """Begin (or, after a resume, re-enter) the AUC-margin stage.

        At its very start the weights become the best BCE epoch's (best.*: the EMA weights
        when ema_decay is on). A run resumed inside the stage keeps `last`'s weights but starts
        PESG and the loss's a, b, alpha afresh: their state is not saved.
        """
        p, config = self.progress, self.config
        if (p.epoch, p.batch) == (config.epochs, 0):
            load_weights_into(self.folder.best, self.model)
            if self.ema is not None:
                self.ema.module.load_state_dict(self.model.state_dict())
            log.info("AUC-margin stage: from best epoch %s", self.saver.ranking.best_epoch)
        else:
            log.warning("resumed inside the AUC-margin stage: PESG state starts afresh")
        self.aucm = AucmObjective(
            self.model, positive_fractions(*self.train_targets), lr=config.aucm_lr,
            margin=config.aucm_margin, device=self.plan.device,
        )  # fmt: skip

    def resume(self) -> None:
        """Continue from `last` (see CheckpointSaver.resume), metrics.csv trimmed to match.

        Under torchrun rank 0 resumes (and settles the checkpoints) first; then every other
        rank reads the same `last`."""
        if not self.env.is_main:
            barrier(self.env)
        self.progress = Progress(**self.saver.resume())
        if self.env.is_main:
            barrier(self.env)
        self.rows = read_metrics_until(self.folder.metrics, self.progress.step, self.progress.epoch)
        log.info(
            "resumed %s at epoch %d, batch %d (step %d)",
            self.run_dir,
            self.progress.epoch,
            self.progress.batch,
            self.progress.step,
        )

    def save_last(self) -> None:
        # metrics.csv first: a resume trims it to what `last` covers (read_metrics_until),
        # whereas rows written after `last` would be lost to a kill in between.
        if self.env.is_main:
            write_metrics(self.folder.metrics, self.rows)
        self.saver.save_last(self.progress.to_dict())

    def run_epoch(self, stop_after_steps: int | None) -> bool:
        """Train the rest of the current epoch; False if `stop_after_steps` cut it short."""
        p, config = self.progress, self.config
        order = train_order(self.train_set, config, p.epoch)
        # Augmentation is seeded per (dataset seed, row): a per-epoch seed varies it by epoch.
        self.train_set.seed = epoch_seed(config.seed, p.epoch)
        steps = None
        if self.env.distributed:
            steps = step_batches(order, config.batch_size, self.env, start_step=p.batch)
        loader = make_loader(
            self.train_set,
            order[p.batch * config.batch_size :],
            config,
            self.plan,
            seed=self.train_set.seed,
            batches=None if steps is None else [s.indices for s in steps],
        )
        waited = time.perf_counter()
        for i, raw in enumerate(loader):
            loaded = time.perf_counter()
            scale, n_global = 1.0, None
            if steps is not None:
                raw, scale, n_global = self.rank_share(raw, steps[i].placeholder)
            if raw is None:  # every image of the batch was unreadable (and reported)
                p.batch += 1  # keeps a resume's position in the epoch's order right
                waited = time.perf_counter()
                continue
            batch = batch_to_device(raw, self.plan, self.train_set)
            if self.aucm is not None:
                lr = config.aucm_lr
                loss = train_step(
                    self.model, batch, self.aucm.optimizer, self.plan, loss_fn=self.aucm
                )
            else:
                lr = scheduled_lr(
                    config.lr, config.lr_schedule, p.step, self.total_steps,
                    warmup_steps=self.warmup_steps,
                )  # fmt: skip
                set_lr(self.optimizer, lr)
                loss = train_step(
                    self.step_model, batch, self.optimizer, self.plan, self.loss_fn, scale
                )
            done = time.perf_counter()
            n = int(raw["image"].shape[0])
            if n_global is not None:
                # The global batch's mean loss: what one process with batch B records.
                n_local = 0 if steps is not None and steps[i].placeholder else n
                loss = all_reduce_sum(self.env, [loss * n_local])[0] / n_global
            p.batch += 1
            p.step += 1
            if self.ema is not None:
                # By the global step, so a resumed run's EMA follows the same decay.
                self.ema.update(self.model, step=p.step)
            self.images_per_s.append(n / max(done - loaded, 1e-9))
            self.rows.append(
                {
                    "kind": "step",
                    "stage": self.stage(p.epoch),
                    "epoch": p.epoch,
                    "step": p.step,
                    "train_loss": loss,
                    "lr": lr,
                    "images_per_s": self.images_per_s[-1],
                    "loader_images_per_s": n / max(loaded - waited, 1e-9),
                }
            )
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {p.step}")
            stop = stop_after_steps is not None and p.step >= stop_after_steps
            if stop or (self.every and p.step % self.every == 0):
                self.save_last()
            if stop:
                return False
            waited = time.perf_counter()
        return True

    def rank_share(
        self, raw: Mapping[str, torch.Tensor] | None, placeholder: bool
    ) -> tuple[Mapping[str, torch.Tensor] | None, float, int]:
        """(this rank's batch, its loss scale, the global batch's image count) for one step.

        The masked BCE is a mean over a rank's images and DDP averages gradients over ranks,
        so scaling each rank's loss by n_rank * world / n_global makes the step's gradient the
        global batch's mean, also when the ranks' shares differ (the epoch's last batch,
        unreadable images). A placeholder share (no image of this step) gets scale 0.
        """
        n_local = 0 if raw is None or placeholder else int(raw["image"].shape[0])
        n_global = int(all_reduce_sum(self.env, [float(n_local)])[0])
        if n_global == 0:
            return None, 1.0, 0  # every rank skips this step alike
        if raw is None:
            raise DistributedError(
                f"rank {self.env.rank}: every image of its share of step {self.progress.step + 1}"
                " was unreadable; under torchrun each rank needs one readable image per step"
            )
        return raw, n_local * self.env.world_size / n_global, n_global

    def validate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """`predict` over the whole validation set; under torchrun each rank predicts its
        shard and every rank gets all the predictions, in dataset order."""
        config, env = self.config, self.env
        move = partial(batch_to_device, plan=self.plan, dataset=self.valid_set)
        if not env.distributed:
            loader = make_loader(self.valid_set, None, config, self.plan)
            return predict(self.eval_model, loader, self.plan, move)
        part = Subset(self.valid_set, list(shard(len(self.valid_set), env)))
        loader = make_loader(
            part, None, dataclasses.replace(config, batch_size=self.rank_batch), self.plan
        )
        parts = all_gather_objects(env, predict_parts(self.eval_model, loader, self.plan, move))
        count = sum(c for *_, c in parts)
        if not count:
            raise ValueError("validation set is empty")
        scores, targets, masks = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return scores, targets, masks, sum(p[3] for p in parts) / count

    def end_epoch(self) -> None:
        """Validate, record, keep the best, and move `last` to the next epoch's start."""
        p = self.progress
        scores, targets, masks, val_loss = self.validate()
        labels = self.model.spec.labels
        thresholds = self.choose_thresholds(scores, targets, masks)
        table = metrics_table(targets, scores, masks, labels, thresholds)
        aurocs = label_aurocs(table)
        mean_auroc = aurocs.pop("Mean")
        losses = [
            r["train_loss"] for r in self.rows if r["kind"] == "step" and r["epoch"] == p.epoch
        ]
        last_lr = next((r["lr"] for r in reversed(self.rows) if r["kind"] == "step"), None)
        self.rows.append(
            {
                "kind": "epoch",
                "stage": self.stage(p.epoch),
                "epoch": p.epoch,
                "step": p.step,
                "train_loss": float(np.mean(losses)) if losses else None,
                "val_loss": val_loss,
                "val_auroc": mean_auroc,
                "lr": last_lr,
            }
        )
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val AUROC %s",
            p.epoch,
            self.rows[-1]["train_loss"] or math.nan,
            val_loss,
            mean_auroc,
        )
        mean = table.set_index("Label").loc["Mean"]
        metrics = {
            "val_loss": val_loss,
            "val_auroc_mean": mean_auroc,
            "val_auroc": aurocs,
            "val_mean": {m: json_value(mean[m]) for m in METRIC_NAMES},
            "thresholds": thresholds.to_dict(),
        }
        ended = p.epoch
        p.epoch += 1
        p.batch = 0
        if self.aucm is not None:
            self.aucm.end_epoch()
        # metrics.csv before the saver commits the epoch in `last` (see save_last).
        if self.env.is_main:
            write_metrics(self.folder.metrics, self.rows)
        self.saver.end_epoch(ended, metrics, thresholds, p.to_dict())
        if self.env.is_main:
            atomic_write_bytes(self.folder.loss_plot, loss_plot_png(self.rows))
        barrier(self.env)  # the epoch's checkpoints are written before any rank reads them

    def choose_thresholds(
        self, scores: np.ndarray, targets: np.ndarray, masks: np.ndarray
    ) -> Thresholds:
        """This epoch's thresholds by config.threshold_rule on its validation predictions."""
        config = self.config
        chosen_on = (
            f"{self.valid_source} ({len(scores)} images, image level, epoch {self.progress.epoch})"
        )
        return choose_thresholds(
            targets, scores, masks, self.model.spec.labels, config.threshold_rule,
            chosen_on=chosen_on, band=config.uncertainty_band,
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        p, ranking = self.progress, self.saver.ranking
        best = ranking.best_metrics or {}
        speed = self.images_per_s[1:] or self.images_per_s  # the first step includes warm-up
        return {
            "labels": list(self.model.spec.labels),
            "epochs": p.epoch,
            "steps": p.step,
            "select_best": self.config.select_best,
            "best_epoch": ranking.best_epoch,
            "best_stage": None if ranking.best_epoch is None else self.stage(ranking.best_epoch),
            "pos_weight": self.pos_weight,
            "val_loss": best.get("val_loss"),
            "val_auroc_mean": best.get("val_auroc_mean"),
            "val_auroc": best.get("val_auroc"),
            "val_mean": best.get("val_mean"),
            "thresholds": best.get("thresholds"),
            "validation": self.valid_source,
            "keep_best": self.config.keep_best,
            "kept_checkpoints": self.saver.kept_checkpoints(),
            "images_per_s": float(np.median(speed)) if speed else None,
            "train_images": len(self.train_set),
            "valid_images": len(self.valid_set),
            "execution": self.plan.to_dict(),
        }


def train(
    config: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    checkpoint_every_steps: int | None = None,
    tables: tuple[LabelTable, LabelTable] | None = None,
) -> TrainResult:
    """Fine-tune `config`'s model end to end and write its run folder (see the module doc).

    resume: continue from ``checkpoints/last`` (same data order, optimizer and RNG state);
        the config must equal the saved one. Without a `last` checkpoint it starts afresh.
        Without `resume`, a run folder that already holds a checkpoint is an error.
    stop_after_steps: return after this many optimisation steps over the whole run, having
        saved `last` (simulates a kill; the result has ``completed=False``).
    checkpoint_every_steps: overrides config.checkpoint_every_steps (save `last` every this
        many steps as well as at epoch ends; 0: only at epoch ends); None: the config's.
    tables: explicit (train, valid) tables, already filtered, used instead of config's CSVs
        and its patient split (cross-validation folds: training.cv); the valid table's
        `source` is what thresholds' `chosen_on` and summary.json's "validation" name. The
        caller saves any split it made.
    The learning-rate schedule is config.lr_schedule: "constant" (the method: Adam at config.lr
    throughout) or "cosine" (decay to 0 over the run), after config.warmup_epochs of linear
    warm-up (see :func:`cxrlabel.training.recipe.scheduled_lr`). With config.aucm_epochs, that
    many AUC-margin epochs follow the BCE ones, from the best BCE epoch's weights.

    Under torchrun (see cxrlabel.distributed) every process calls this: they join one
    process group (gloo on CPU, NCCL on CUDA), train with DDP on their shares of each global
    batch of config.batch_size, and only rank 0 writes the run folder.
    """
    env = dist_env()
    owns_group = False
    if env.distributed:
        import torch.distributed as dist

        owns_group = not dist.is_initialized()
        init_process_group(env, resolve_device(config.device))
    try:
        return _train(
            config, env, run_dir=run_dir, resume=resume, stop_after_steps=stop_after_steps,
            checkpoint_every_steps=checkpoint_every_steps, tables=tables,
        )  # fmt: skip
    finally:
        if owns_group:
            destroy_process_group()


def _train(
    config: RunConfig,
    env: DistEnv,
    *,
    run_dir: Path | None,
    resume: bool,
    stop_after_steps: int | None,
    checkpoint_every_steps: int | None,
    tables: tuple[LabelTable, LabelTable] | None,
) -> TrainResult:
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, not {config.lr_schedule!r}")
    run_dir = Path(run_dir) if run_dir is not None else Path(config.runs_dir) / config.name
    folder = RunFolder(run_dir)
    last_meta = checkpoint_paths(folder.last)[2]
    if resume:
        _check_resumable(config, run_dir)
    elif last_meta.is_file():
        raise FileExistsError(f"{run_dir} holds a run already: resume it (--resume) or rename")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(folder.config)
    barrier(env)  # the run folder exists before any rank reads from it
    with run_context(config):
        every = (
            config.checkpoint_every_steps
            if checkpoint_every_steps is None
            else checkpoint_every_steps
        )
        run = _Run(config, run_dir, every, tables, env)
        if resume and last_meta.is_file():
            run.resume()
        elif resume:
            log.warning("%s: no checkpoint to resume from; starting afresh", run_dir)
        completed = _train_epochs(run, stop_after_steps)
    summary = run.summary()
    summary["completed"] = completed
    if env.is_main:
        write_summary(folder, summary)
    if completed:
        log.info("run %s done: best epoch %s", run_dir, summary["best_epoch"])
    return TrainResult(run_dir, folder.best, folder.last, summary, completed)


def _train_epochs(run: _Run, stop_after_steps: int | None) -> bool:
    config = run.config
    while run.progress.epoch < config.epochs + config.aucm_epochs:
        if stop_after_steps is not None and run.progress.step >= stop_after_steps:
            run.save_last()
            return False
        if run.aucm is None and run.stage(run.progress.epoch) == "aucm":
            run.start_aucm()
        if not run.run_epoch(stop_after_steps):
            return False
        run.end_epoch()
    return True
