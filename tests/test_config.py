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


def test_evaluation_options_defaults_presets_and_errors(tmp_path):
    cfg = build_config()
    assert (cfg.threshold_rule, cfg.uncertainty_band, cfg.keep_best) == ("fixed", 0.0, 1)
    cfg = build_config("tiny-cpu", ["threshold_rule=youden", "uncertainty_band=0.1", "keep_best=3"])
    assert (cfg.threshold_rule, cfg.uncertainty_band, cfg.keep_best) == ("youden", 0.1, 3)
    assert build_config("finetune-densenet121").keep_best == 3
    with pytest.raises(ConfigError, match="threshold_rule must be one of"):
        build_config(None, ["threshold_rule=median"])
    with pytest.raises(ConfigError, match="uncertainty_band"):
        build_config(None, ["uncertainty_band=0.6"])
    with pytest.raises(ConfigError, match="keep_best"):
        build_config(None, ["keep_best=0"])
    with pytest.raises(ConfigError, match="keep_best must be int"):
        build_config(None, ["keep_best=two"])
    # A saved config.yaml is checked the same way.
    (tmp_path / "config.yaml").write_text("threshold_rule: best\n")
    with pytest.raises(ConfigError, match="threshold_rule"):
        load_config(tmp_path / "config.yaml")
