"""The 14 CheXpert observations and pure label handling (no pixels).

Everything here works on label values only, so it is testable without images.
Label meaning is always by name, never by column position.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

# CheXpert's column order in train.csv / valid.csv.
OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# Label values as they appear in CheXpert CSVs. A blank cell is NaN.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0


def _swapped(names: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    i, j = names.index(a), names.index(b)
    out = list(names)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


# The CheXpert paper's Table 1 lists the observations in the CSV's order but for one pair:
# Lung Lesion comes before Lung Opacity.
TABLE1_ORDER: tuple[str, ...] = _swapped(OBSERVATIONS, "Lung Opacity", "Lung Lesion")

LABEL_SETS: dict[str, tuple[str, ...]] = {
    # The five observations of the CheXpert competition (and of the method's first experiment).
    "competition": (
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    ),
    # No Finding is the absence of the others, so the method's fine-tuning drops it.
    "all13": tuple(o for o in OBSERVATIONS if o != "No Finding"),
    "all14": OBSERVATIONS,
}

# Columns every table carries besides the observations (CheXpert's own names), plus ids.
META_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
ID_COLUMNS: tuple[str, ...] = ("patient_id", "study_id")
TABLE_COLUMNS: tuple[str, ...] = META_COLUMNS + ID_COLUMNS + OBSERVATIONS

_CELL_VALUES: dict[str, float] = {
    "": math.nan,
    "1": POSITIVE,
    "1.0": POSITIVE,
    "0": NEGATIVE,
    "0.0": NEGATIVE,
    "-1": UNCERTAIN,
    "-1.0": UNCERTAIN,
}

_CHEXPERT_PATH_RE = re.compile(r"(patient\d+)/(study\d+)/")


class LabelError(ValueError):
    """A label file or label value that cannot be used, with the place it came from."""


class BlankMeaning(enum.StrEnum):
    """What an empty label cell means; a per-dataset setting."""

    # CheXpert and MIMIC-CXR: the report did not mention the finding. The CheXpert paper trains
    # on these as negatives.
    NEGATIVE = "negative"
    # The dataset never labels that column (NIH has no Fracture): always masked out.
    UNKNOWN = "unknown"


class UncertaintyPolicy(enum.StrEnum):
    """How uncertain (-1) labels enter the loss (CheXpert paper, section 4; LSR: Pham et al.
    2020, "Interpreting chest X-rays via CNNs that exploit hierarchical disease dependencies
    and uncertainty labels")."""

    IGNORE = "U-Ignore"  # mask them out of the loss (the default and the method's choice)
    ZEROS = "U-Zeros"  # treat as negative
    ONES = "U-Ones"  # treat as positive
    # Label-smoothing regularisation: a soft target drawn once per (image, label) from a range.
    ONES_LSR = "U-Ones-LSR"  # uniform in [0.55, 0.85]
    ZEROS_LSR = "U-Zeros-LSR"  # uniform in [0, 0.3]

    @classmethod
    def parse(cls, name: str | UncertaintyPolicy) -> UncertaintyPolicy:
        """Accept 'U-Ignore', 'u_ignore', 'ignore', 'zeros', 'ones-lsr', ... ."""
        if isinstance(name, cls):
            return name
        key = str(name).strip().lower().replace("_", "-").removeprefix("u-")
        for policy in cls:
            if policy.value.lower().removeprefix("u-") == key:
                return policy
        choices = ", ".join(p.value for p in cls)
        raise ValueError(f"unknown uncertainty policy {name!r}; choose one of {choices}")

    @property
    def smoothing(self) -> tuple[float, float] | None:
        """The (low, high) range LSR targets are drawn from; None for the hard policies."""
        return _LSR_RANGES.get(self)

    @property
    def hard(self) -> UncertaintyPolicy:
        """The policy with 0/1 targets that this one smooths (itself when it is hard)."""
        return _LSR_BASE.get(self, self)


_LSR_RANGES: dict[UncertaintyPolicy, tuple[float, float]] = {
    UncertaintyPolicy.ONES_LSR: (0.55, 0.85),
    UncertaintyPolicy.ZEROS_LSR: (0.0, 0.3),
}
_LSR_BASE: dict[UncertaintyPolicy, UncertaintyPolicy] = {
    UncertaintyPolicy.ONES_LSR: UncertaintyPolicy.ONES,
    UncertaintyPolicy.ZEROS_LSR: UncertaintyPolicy.ZEROS,
}
WILDCARD = "*"


@dataclass(frozen=True)
class LabelPolicy:
    """An uncertainty policy per label: the one parser for every `policy` setting.

    Spelled as one policy name ("U-Ones": every label) or a mapping by label name,
    "Atelectasis=U-Ones,Edema=U-Ones,*=U-Zeros", where `*` stands for every label not named.
    Without `*`, a label not named gets U-Ignore. Names are checked against the 14
    observations, so a typo fails when the config is read.
    """

    rules: tuple[tuple[str, UncertaintyPolicy], ...] = ()
    default: UncertaintyPolicy = UncertaintyPolicy.IGNORE

    @classmethod
    def parse(cls, spec: str | UncertaintyPolicy | LabelPolicy) -> LabelPolicy:
        if isinstance(spec, LabelPolicy):
            return spec
        if isinstance(spec, UncertaintyPolicy) or "=" not in str(spec):
            return cls(default=UncertaintyPolicy.parse(spec))
        rules: dict[str, UncertaintyPolicy] = {}
        default = UncertaintyPolicy.IGNORE
        for item in (part.strip() for part in str(spec).split(",")):
            name, sep, value = (x.strip() for x in item.partition("="))
            if not sep or not name:
                raise ValueError(f"policy item {item!r} in {spec!r} must look like Label=Policy")
            if name in rules or (name == WILDCARD and WILDCARD in rules):
                raise ValueError(f"label {name!r} has two policies in {spec!r}")
            if name != WILDCARD and name not in OBSERVATIONS:
                raise ValueError(
                    f"unknown label {name!r} in policy {spec!r}; use names from "
                    f"{list(OBSERVATIONS)} or {WILDCARD!r} for every other label"
                )
            rules[name] = UncertaintyPolicy.parse(value)
        if WILDCARD in rules:
            default = rules.pop(WILDCARD)
        return cls(tuple(rules.items()), default)

    @property
    def names(self) -> tuple[str, ...]:
        """The labels given a policy by name (not through `*`)."""
        return tuple(name for name, _ in self.rules)

    def for_label(self, name: str) -> UncertaintyPolicy:
        return dict(self.rules).get(name, self.default)

    def for_labels(self, labels: Sequence[str]) -> tuple[UncertaintyPolicy, ...]:
        return tuple(self.for_label(name) for name in labels)

    def __str__(self) -> str:
        if not self.rules:
            return self.default.value
        items = [f"{name}={policy.value}" for name, policy in self.rules]
        return ",".join([*items, f"{WILDCARD}={self.default.value}"])


def smoothed_targets(n: int, label: str, low: float, high: float, seed: int) -> np.ndarray:
    """[n] LSR targets for one label: row r's value depends only on (seed, label, r).

    Each label has its own stream (keyed by its place among the 14 observations), so the
    values do not change with the table's length, the other labels or the epoch.
    """
    key = OBSERVATIONS.index(label) if label in OBSERVATIONS else len(OBSERVATIONS)
    rng = np.random.default_rng([seed % 2**63, key])
    return low + (high - low) * rng.random(n)


def resolve_labels(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Turn a label-set name ('competition', 'all13', 'all14'), a comma list or names into names.

    Every name is checked against the 14 observations so a typo fails here, not in training.
    """
    if isinstance(spec, str):
        if spec in LABEL_SETS:
            return LABEL_SETS[spec]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = tuple(spec)
    unknown = [n for n in names if n not in OBSERVATIONS]
    if unknown or not names:
        raise ValueError(
            f"unknown observation(s) {unknown or names!r}; use names from {list(OBSERVATIONS)} "
            f"or a set: {sorted(LABEL_SETS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"repeated observation in {names!r}")
    return names


def _invalid_value(source: str, line: int, column: str, text: str) -> LabelError:
    return LabelError(
        f"{source}: line {line}, column {column!r}: invalid label value "
        f"{text!r} (expected 1.0, 0.0, -1.0 or blank)"
    )


def parse_label_cell(text: str, column: str, *, source: str, line: int) -> float:
    """One raw CSV label cell -> 1.0, 0.0, -1.0 or NaN (blank); anything else is a LabelError
    naming the file, the line and the column (the rule of `parse_label_column`, for readers
    that stream rows)."""
    value = _CELL_VALUES.get(text.strip())
    if value is None:
        raise _invalid_value(source, line, column, text.strip())
    return value


def parse_label_column(cells: pd.Series, column: str, *, source: str = "<table>") -> np.ndarray:
    """Parse one column of raw CSV strings into floats: 1.0, 0.0, -1.0, or NaN for blank.

    Anything else is an error naming the file, the line and the column. Line numbers count the
    header as line 1, as an editor shows them.
    """
    text = cells.astype("string").fillna("").str.strip()
    values = text.map(_CELL_VALUES)
    bad = values.isna() & (text != "")
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise _invalid_value(source, pos + 2, column, text.iloc[pos])
    return values.to_numpy(dtype=np.float64)


def apply_policy(
    values: np.ndarray,
    policy: LabelPolicy | UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
    blank: BlankMeaning | str = BlankMeaning.NEGATIVE,
    labels: Sequence[str] | None = None,
    *,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map raw label values [N, K] (1, 0, -1, NaN) to training targets and a loss mask.

    Returns (targets float32 [N, K], mask bool [N, K]); masked entries have target 0 and must
    not contribute to the loss or to metrics. `labels` names the K columns; a policy that
    names labels needs it. LSR policies draw their soft targets from `seed` (see
    `smoothed_targets`); with no seed (evaluation, thresholds: metrics need 0/1 targets) an
    LSR label is scored as its hard policy, U-Ones-LSR as U-Ones and U-Zeros-LSR as U-Zeros.
    """
    label_policy = LabelPolicy.parse(policy)
    blank = BlankMeaning(blank)
    values = np.asarray(values, dtype=np.float64)
    if labels is None:
        if label_policy.rules:
            raise ValueError(f"policy {label_policy} names labels: pass the columns' labels")
        labels = [f"column {k}" for k in range(values.shape[1])]
    if len(labels) != values.shape[1]:
        raise ValueError(f"{len(labels)} label names for {values.shape[1]} columns")
    is_blank = np.isnan(values)
    is_uncertain = values == UNCERTAIN
    is_certain = (values == POSITIVE) | (values == NEGATIVE)
    if not np.all(is_blank | is_uncertain | is_certain):
        raise LabelError("label values must be 1, 0, -1 or NaN")

    targets = np.where(values == POSITIVE, 1.0, 0.0)
    mask = is_certain.copy()
    if blank is BlankMeaning.NEGATIVE:
        mask |= is_blank
    for k, (name, column_policy) in enumerate(
        zip(labels, label_policy.for_labels(labels), strict=True)
    ):
        uncertain = is_uncertain[:, k]
        if column_policy is UncertaintyPolicy.IGNORE:
            continue
        mask[:, k] |= uncertain
        smoothing = column_policy.smoothing
        if smoothing is not None and seed is not None:
            drawn = smoothed_targets(len(values), name, *smoothing, seed)
            targets[uncertain, k] = drawn[uncertain]
        elif column_policy.hard is UncertaintyPolicy.ONES:
            targets[uncertain, k] = 1.0
    return targets.astype(np.float32), mask


def chexpert_ids(path: str) -> tuple[str, str] | None:
    """Patient and study id from a CheXpert-style path '.../patient00001/study1/view1.jpg'."""
    match = _CHEXPERT_PATH_RE.search(path.replace("\\", "/"))
    if match is None:
        return None
    patient, study = match.groups()
    return patient, f"{patient}/{study}"


@dataclass(frozen=True)
class LabelTable:
    """One dataset's labels in CheXpert layout, whatever format they came from.

    `frame` has TABLE_COLUMNS: CheXpert's metadata columns, `patient_id`, `study_id` and the
    14 observations as floats (1, 0, -1, NaN). `root` is the folder `Path` entries are relative
    to; `blank` says what a NaN means for this dataset.
    """

    frame: pd.DataFrame
    root: Path
    blank: BlankMeaning = BlankMeaning.NEGATIVE
    source: str = "<table>"

    def __post_init__(self) -> None:
        missing = [c for c in TABLE_COLUMNS if c not in self.frame.columns]
        if missing:
            raise LabelError(f"{self.source}: table lacks columns {missing}")

    def __len__(self) -> int:
        return len(self.frame)

    def values(self, labels: Sequence[str] = OBSERVATIONS) -> np.ndarray:
        """Raw label values [N, K] for the named observations, in the order given."""
        return self.frame.loc[:, list(resolve_labels(labels))].to_numpy(dtype=np.float64)

    def targets(
        self,
        labels: Sequence[str] = OBSERVATIONS,
        policy: LabelPolicy | UncertaintyPolicy | str = UncertaintyPolicy.IGNORE,
        *,
        seed: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Targets and mask for the named observations under a policy (`apply_policy`; `seed`
        draws LSR targets, none scores LSR labels as their hard policy)."""
        names = resolve_labels(labels)
        return apply_policy(self.values(names), policy, self.blank, names, seed=seed)

    def image_paths(self) -> list[Path]:
        return [self.root / p for p in self.frame["Path"]]

    def subset(self, rows: np.ndarray | Sequence[int] | pd.Series) -> LabelTable:
        """A new table with the chosen rows (boolean mask or positions), index reset."""
        rows = np.asarray(rows)
        picked = self.frame[rows] if rows.dtype == bool else self.frame.iloc[rows]
        return replace(self, frame=picked.reset_index(drop=True))


def filter_view(table: LabelTable, view: str = "all") -> LabelTable:
    """Keep frontal films, lateral films, or all (CheXpert's Frontal/Lateral column)."""
    view = view.lower()
    if view == "all":
        return table
    if view not in ("frontal", "lateral"):
        raise ValueError(f"view must be frontal, lateral or all, not {view!r}")
    column = table.frame["Frontal/Lateral"].astype("string").str.lower()
    return table.subset((column == view).fillna(False).to_numpy())


def filter_certain(table: LabelTable, labels: Sequence[str]) -> LabelTable:
    """Keep an image only if at least one of `labels` is certain: an explicit 1 or 0.

    Blanks do not count as certain here, whatever the dataset's blank meaning: the method keeps
    images whose report actually said something about the selected findings.
    """
    values = table.values(labels)
    keep = np.any((values == POSITIVE) | (values == NEGATIVE), axis=1)
    return table.subset(keep)


def table_from_columns(
    frame: pd.DataFrame,
    *,
    root: Path,
    source: str,
    blank: BlankMeaning,
    label_values: Mapping[str, np.ndarray] | None = None,
) -> LabelTable:
    """Assemble a LabelTable from a frame with (some of) the canonical columns.

    Missing metadata columns become blank; observations without values become NaN.
    """
    out = pd.DataFrame(index=range(len(frame)))
    for column in META_COLUMNS + ID_COLUMNS:
        if column in frame.columns:
            out[column] = frame[column].astype("string").fillna("").to_numpy()
        else:
            out[column] = ""
    for name in OBSERVATIONS:
        if label_values is not None and name in label_values:
            out[name] = np.asarray(label_values[name], dtype=np.float64)
        else:
            out[name] = np.nan
    return LabelTable(frame=out, root=root, blank=blank, source=source)


def ensure_ids(table: LabelTable, *, fallback: str = "path") -> LabelTable:
    """Fill empty patient/study ids from CheXpert-style paths.

    Rows whose path does not follow the patient/study layout fall back to one patient and one
    study per image (`fallback='path'`: the path is the id), or raise (`fallback='error'`).
    """
    frame = table.frame.copy()
    paths = frame["Path"].astype("string").str.replace("\\", "/", regex=False)
    found = paths.str.extract(_CHEXPERT_PATH_RE)
    patient_from_path = found[0]
    study_from_path = found[0] + "/" + found[1]
    unmatched = patient_from_path.isna() & ((frame["patient_id"] == "") | (frame["study_id"] == ""))
    if unmatched.any() and fallback == "error":
        pos = int(np.flatnonzero(unmatched.to_numpy())[0])
        raise LabelError(f"{table.source}: line {pos + 2}: no patient/study in {paths.iloc[pos]!r}")
    patient = frame["patient_id"].where(frame["patient_id"] != "", patient_from_path)
    frame["patient_id"] = patient.fillna(paths).astype("string")
    study = frame["study_id"].where(frame["study_id"] != "", study_from_path)
    frame["study_id"] = study.fillna(paths).astype("string")
    return replace(table, frame=frame)
