import pytest

from cxrlabel.config import ConfigError, RunConfig, build_config, load_config


def test_layers_apply_in_order():
    assert build_config().lr == pytest.approx(1e-4) and build_config().batch_size == 16
    cfg = build_config("tiny-cpu", ["lr=1e-2", "epochs=5"])
    assert cfg.backbone == "tiny" and cfg.lr == pytest.approx(1e-2) and cfg.epochs == 5
    assert build_config("finetune-densenet121").size == 320
    assert build_config("finetune-mobilenet").labels == "competition"


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(None, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="epochs must be int"):
        build_config(None, ["epochs=three"])
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("no-such-preset")
    preset = tmp_path / "p.yaml"
    preset.write_text("backbone: tiny\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="batchsize"):
        build_config(str(preset))


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = build_config("tiny-cpu", ["name=x", "hflip=true"])
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert isinstance(load_config(tmp_path / "config.yaml"), RunConfig)
