import math

import numpy as np
import pandas as pd
import pytest

from cxrlabel.data.labels import (
    LABEL_SETS,
    OBSERVATIONS,
    TABLE1_ORDER,
    BlankMeaning,
    LabelError,
    UncertaintyPolicy,
    apply_policy,
    chexpert_ids,
    filter_certain,
    filter_view,
    parse_label_column,
    resolve_labels,
    table_from_columns,
)


def test_observations_and_sets():
    assert len(OBSERVATIONS) == 14 and OBSERVATIONS[0] == "No Finding"
    assert sorted(TABLE1_ORDER) == sorted(OBSERVATIONS)
    assert LABEL_SETS["competition"] == (
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    )
    assert "No Finding" not in LABEL_SETS["all13"] and len(LABEL_SETS["all13"]) == 13
    assert resolve_labels("all14") == OBSERVATIONS
    assert resolve_labels("Edema, Cardiomegaly") == ("Edema", "Cardiomegaly")
    with pytest.raises(ValueError, match="Cardiomegalyy"):
        resolve_labels(["Cardiomegalyy"])
    with pytest.raises(ValueError, match="repeated"):
        resolve_labels(["Edema", "Edema"])


def test_parse_every_cell_kind():
    cells = pd.Series(["1.0", "0.0", "-1.0", "", "1", "0", "-1", " 1.0 "])
    values = parse_label_column(cells, "Edema")
    assert values[:3].tolist() == [1.0, 0.0, -1.0]
    assert math.isnan(values[3])
    assert values[4:].tolist() == [1.0, 0.0, -1.0, 1.0]


@pytest.mark.parametrize("bad", ["2", "yes", "0.5", "nan", "1.0.0"])
def test_parse_rejects_bad_value_naming_line_and_column(bad):
    cells = pd.Series(["1.0", "0.0", bad])
    with pytest.raises(LabelError, match=r"train\.csv: line 4, column 'Edema'.*" + bad):
        parse_label_column(cells, "Edema", source="train.csv")


RAW = np.array([[1.0, 0.0, -1.0, np.nan]])


def test_policy_ignore_masks_uncertain():
    targets, mask = apply_policy(RAW, UncertaintyPolicy.IGNORE, BlankMeaning.NEGATIVE)
    assert targets.dtype == np.float32 and mask.dtype == bool
    assert targets.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert mask.tolist() == [[True, True, False, True]]


def test_policy_zeros_and_ones():
    t0, m0 = apply_policy(RAW, "U-Zeros", "negative")
    assert t0.tolist() == [[1, 0, 0, 0]] and m0.all()
    t1, m1 = apply_policy(RAW, "ones", "negative")
    assert t1.tolist() == [[1, 0, 1, 0]] and m1.all()


def test_blank_unknown_is_always_masked():
    for policy in UncertaintyPolicy:
        _, mask = apply_policy(RAW, policy, BlankMeaning.UNKNOWN)
        assert not mask[0, 3]


def test_policy_parse_names():
    assert UncertaintyPolicy.parse("u_ignore") is UncertaintyPolicy.IGNORE
    assert UncertaintyPolicy.parse("U-Ones") is UncertaintyPolicy.ONES
    with pytest.raises(ValueError, match="U-Ignore"):
        UncertaintyPolicy.parse("U-Maybe")


def test_apply_policy_rejects_other_values():
    with pytest.raises(LabelError):
        apply_policy(np.array([[0.5]]))


def test_chexpert_ids():
    path = "CheXpert-v1.0-small/train/patient00042/study3/view1_frontal.jpg"
    assert chexpert_ids(path) == ("patient00042", "patient00042/study3")
    assert chexpert_ids("images/00000001_000.png") is None


def _table(rows):
    frame = pd.DataFrame(rows)
    values = {k: frame[k].to_numpy(dtype=float) for k in ("Edema", "Cardiomegaly")}
    return table_from_columns(
        frame, root=".", source="t", blank=BlankMeaning.NEGATIVE, label_values=values
    )


def test_filters():
    nan = np.nan
    table = _table(
        [
            {"Path": "a", "Frontal/Lateral": "Frontal", "Edema": 1.0, "Cardiomegaly": nan},
            {"Path": "b", "Frontal/Lateral": "Lateral", "Edema": -1.0, "Cardiomegaly": nan},
            {"Path": "c", "Frontal/Lateral": "Frontal", "Edema": nan, "Cardiomegaly": 0.0},
            {"Path": "d", "Frontal/Lateral": "Frontal", "Edema": -1.0, "Cardiomegaly": nan},
        ]
    )
    assert filter_view(table, "frontal").frame["Path"].tolist() == ["a", "c", "d"]
    assert filter_view(table, "lateral").frame["Path"].tolist() == ["b"]
    assert len(filter_view(table, "all")) == 4
    certain = filter_certain(table, ["Edema", "Cardiomegaly"])
    assert certain.frame["Path"].tolist() == ["a", "c"]
    assert filter_certain(table, ["Edema"]).frame["Path"].tolist() == ["a"]
    with pytest.raises(ValueError):
        filter_view(table, "oblique")


def test_targets_follow_names_not_positions():
    table = _table([{"Path": "a", "Edema": 1.0, "Cardiomegaly": 0.0}])
    targets, _ = table.targets(["Cardiomegaly", "Edema"])
    assert targets.tolist() == [[0.0, 1.0]]


# --------------------------------------------------------------------------------------------
# Per-label and label-smoothing policies


def test_label_policy_parses_one_name_or_a_mapping():
    from cxrlabel.data.labels import LabelPolicy

    one = LabelPolicy.parse("u_ones")
    assert one.rules == () and one.default is UncertaintyPolicy.ONES
    mapped = LabelPolicy.parse("Atelectasis=U-Ones, Edema=ones-lsr, *=U-Zeros")
    assert mapped.for_labels(["Atelectasis", "Edema", "Cardiomegaly"]) == (
        UncertaintyPolicy.ONES,
        UncertaintyPolicy.ONES_LSR,
        UncertaintyPolicy.ZEROS,
    )
    assert LabelPolicy.parse(str(mapped)) == mapped
    # No `*`: a label without a policy is U-Ignore.
    assert LabelPolicy.parse("Edema=U-Ones").for_label("Cardiomegaly") is UncertaintyPolicy.IGNORE
    with pytest.raises(ValueError, match="Edemaa"):
        LabelPolicy.parse("Edemaa=U-Ones")
    with pytest.raises(ValueError, match="two policies"):
        LabelPolicy.parse("Edema=U-Ones,Edema=U-Zeros")
    with pytest.raises(ValueError, match="unknown uncertainty policy"):
        LabelPolicy.parse("Edema=U-Twos")
    with pytest.raises(ValueError, match="Label=Policy"):
        LabelPolicy.parse("Edema=U-Ones,U-Zeros")


def test_apply_policy_per_label_mapping():
    values = np.array([[-1.0, -1.0, -1.0], [1.0, 0.0, np.nan]])
    labels = ["Atelectasis", "Edema", "Cardiomegaly"]
    targets, mask = apply_policy(values, "Atelectasis=U-Ones,Edema=U-Zeros", "negative", labels)
    assert targets[0].tolist() == [1.0, 0.0, 0.0]
    assert mask[0].tolist() == [True, True, False]  # Cardiomegaly: no policy, no `*` -> ignored
    assert targets[1].tolist() == [1.0, 0.0, 0.0] and mask[1].all()
    targets, mask = apply_policy(values, "Edema=U-Zeros,*=U-Ones", "negative", labels)
    assert targets[0].tolist() == [1.0, 0.0, 1.0] and mask[0].all()
    with pytest.raises(ValueError, match="names labels"):
        apply_policy(values, "Edema=U-Zeros")


def _uncertain_table(n: int = 200) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    values = rng.choice([1.0, 0.0, -1.0, np.nan], size=(n, 2))
    values[:3] = -1.0  # enough uncertain entries in both columns
    return values, ["Edema", "Atelectasis"]


@pytest.mark.parametrize(
    "policy, low, high", [("U-Ones-LSR", 0.55, 0.85), ("U-Zeros-LSR", 0.0, 0.3)]
)
def test_lsr_draws_reproducible_soft_targets_in_range(policy, low, high):
    values, labels = _uncertain_table()
    targets, mask = apply_policy(values, policy, "negative", labels, seed=7)
    uncertain = values == -1.0
    soft = targets[uncertain]
    assert np.all((soft >= low) & (soft <= high)) and len(np.unique(soft)) > 10
    assert mask[uncertain].all()
    # Certain labels keep their 0/1 targets.
    assert np.array_equal(targets[values == 1.0], np.ones((values == 1.0).sum()))
    assert np.array_equal(targets[values == 0.0], np.zeros((values == 0.0).sum()))
    again, _ = apply_policy(values, policy, "negative", labels, seed=7)
    assert np.array_equal(again, targets)
    # A function of (seed, row, label): a table's first rows get the same values alone.
    head, _ = apply_policy(values[:50], policy, "negative", labels, seed=7)
    assert np.array_equal(head, targets[:50])
    other, _ = apply_policy(values, policy, "negative", labels, seed=8)
    assert not np.array_equal(other[uncertain], soft)
    # The two labels draw from different streams.
    assert targets[0, 0] != targets[0, 1]


def test_lsr_without_a_seed_scores_as_the_hard_policy():
    values, labels = _uncertain_table()
    for lsr, hard in (("U-Ones-LSR", "U-Ones"), ("U-Zeros-LSR", "U-Zeros")):
        got = apply_policy(values, lsr, "negative", labels)
        want = apply_policy(values, hard, "negative", labels)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_lsr_in_a_mapping_smooths_only_its_label():
    values, labels = _uncertain_table()
    targets, _ = apply_policy(values, "Edema=U-Ones-LSR,*=U-Ones", "negative", labels, seed=1)
    uncertain = values == -1.0
    assert np.all((targets[uncertain[:, 0], 0] >= 0.55) & (targets[uncertain[:, 0], 0] <= 0.85))
    assert np.all(targets[uncertain[:, 1], 1] == 1.0)
