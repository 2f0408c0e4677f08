import pytest
import torch
from safetensors.torch import save_file

from cxrlabel.models.factory import (
    BACKBONES,
    WeightsError,
    create_backbone,
    create_head,
    create_model,
    load_weights_file,
    make_keras_compatible,
    masked_bce_loss,
    model_display_name,
)
from tests.helpers import SHARED_DATA

LABELS = ("Cardiomegaly", "Edema")


def test_display_names():
    assert model_display_name("xception", "mlp3_dropout") == "Xception_3_D"
    assert model_display_name("mobilenet", "linear") == "MobileNet_1"
    assert model_display_name("densenet121", "mlp3") == "DenseNet121_3"
    with pytest.raises(ValueError):
        model_display_name("xception", "mlp9")


@pytest.mark.parametrize("backbone", ["tiny", "mobilenet", "resnet50"])
def test_model_outputs_one_logit_per_label(backbone):
    model = create_model(backbone, "mlp3_dropout", LABELS, weights="none", size=64)
    assert model.preprocessing.size == 64
    model.eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2)


def test_preprocessing_comes_from_the_backbone_config():
    _, prep = create_backbone("xception", "none")
    assert prep.size == 299 and prep.mean == (0.5, 0.5, 0.5)
    _, prep = create_backbone("densenet121", "none")
    assert prep.mean == pytest.approx((0.485, 0.456, 0.406))


def test_every_method_backbone_is_known():
    assert {"xception", "densenet121", "resnet50", "vgg19", "mobilenet"} <= set(BACKBONES)


def test_heads():
    assert isinstance(create_head("linear", 8, 3), torch.nn.Linear)
    mlp = create_head("mlp3_dropout", 8, 3)
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    assert [m.p for m in mlp if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


def test_masked_loss_ignores_masked_entries():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True]])
    loss = masked_bce_loss(logits, targets, mask)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = (bce(logits[0, 0], targets[0, 0]) + bce(logits[1], targets[1], reduction="sum")) / 2
    torch.testing.assert_close(loss, expected)
    # Changing a masked logit changes nothing.
    logits2 = logits.clone()
    logits2[0, 1] = 50.0
    torch.testing.assert_close(masked_bce_loss(logits2, targets, mask), loss)


def test_local_weights_round_trip_and_mismatch(tmp_path):
    net, _ = create_backbone("tiny", "none")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    other, _ = create_backbone("tiny", path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v)
    pth = tmp_path / "w.pth"
    torch.save(net.state_dict(), pth)
    load_weights_file(other, pth)

    bad = dict(net.state_dict())
    bad.pop(next(iter(bad)))
    bad["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing.*1 unexpected"):
        create_backbone("tiny", tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        create_backbone("tiny", "imagenet")


def test_shared_xception_weights_load():
    path = SHARED_DATA / "weights" / "legacy_xception_imagenet_keras.safetensors"
    if not path.is_file():
        pytest.skip(f"shared data absent: {path}")
    net, prep = create_backbone("xception", path)
    assert prep.size == 299
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 96, 96)).shape == (1, 2048)


def test_keras_compatibility_switch():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.MaxPool2d(3, 2)
    )
    make_keras_compatible(net)
    assert net[1].eps == 1e-3
    assert type(net[2]).__name__ == "MaxPool2dSame"
    # TensorFlow "same" padding: a 10 px map pooled 3/2 gives 5 px (symmetric timm pad: 4).
    assert net(torch.randn(1, 3, 12, 12)).shape[-1] == 5


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("random.safetensors", bytes(range(256)) * 4),
        ("empty.safetensors", b""),
        ("pickle.safetensors", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."),
        ("random.pth", bytes(range(256)) * 4),
        ("empty.pth", b""),
        ("not-a-state-dict.pth", None),
    ],
)
def test_poisoned_weights_file_is_a_weights_error(tmp_path, name, content):
    """A user-given weights= file that is not what it claims: WeightsError naming it."""
    path = tmp_path / name
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    net, _ = create_backbone("tiny", "none")
    with pytest.raises(WeightsError, match=str(path)):
        load_weights_file(net, path)


@pytest.mark.parametrize("kind", ["wrong shape", "wrong dtype"])
def test_weights_file_of_wrong_shapes_or_dtypes_is_refused(tmp_path, kind):
    net, _ = create_backbone("tiny", "none")
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.zeros(3, 3) if kind == "wrong shape" else state[key].to(torch.int64)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        if path.suffix == ".pth":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        with pytest.raises(WeightsError, match=kind):
            load_weights_file(net, path)


def test_offline_backbone_allows_known_names_only():
    from cxrlabel.models.factory import BackboneError, offline_backbone

    for name in (*BACKBONES, "resnet18", "resnet18.a1_in1k"):
        assert offline_backbone(name) == name
    for name in ("hf-hub:timm/resnet18", "local-dir:/tmp", "timm/resnet18", "x/../y", "nope"):
        with pytest.raises(BackboneError, match="not a known backbone"):
            offline_backbone(name)
