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


def test_head_config_layers_lists_and_round_trip(tmp_path):
    from cxrlabel.config import HeadConfig

    assert HeadConfig.build() == HeadConfig()
    table1 = HeadConfig.build("table1-heads")
    assert table1.backbones == ("xception", "densenet121", "resnet50", "vgg19", "mobilenet")
    assert table1.heads == ("linear", "mlp3", "mlp3_dropout")
    assert (table1.size, table1.labels, table1.weights) == (0, "competition", "imagenet")
    cfg = HeadConfig.build("tiny-heads", ["backbones=tiny,mobilenet", "lr=1e-2", "heads=[mlp3]"])
    assert cfg.backbones == ("tiny", "mobilenet") and cfg.heads == ("mlp3",)
    assert cfg.lr == pytest.approx(1e-2) and cfg.weights == "none"
    with pytest.raises(AttributeError):
        cfg.lr = 1.0  # type: ignore[misc]
    cfg.save(tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().startswith("kind: heads\n")
    assert HeadConfig.load(tmp_path / "config.yaml") == cfg


def test_head_config_errors_name_key_kind_and_file(tmp_path):
    from cxrlabel.config import HeadConfig

    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['backbone'\]"):
        HeadConfig.build(None, ["backbone=tiny"])  # RunConfig's key, not this kind's
    with pytest.raises(ConfigError, match="backbones must be a list of names"):
        HeadConfig.build(None, {"backbones": 3})
    with pytest.raises(ConfigError, match="epochs must be int"):
        HeadConfig.build("tiny-heads", ["epochs=1.5"])
    with pytest.raises(ConfigError, match="threshold_rule must be one of"):
        HeadConfig.build(None, ["threshold_rule=median"])
    with pytest.raises(ConfigError, match="at least one"):
        HeadConfig.build(None, {"heads": []})
    # Presets and saved configs of the other kind are refused by name, both ways.
    with pytest.raises(ConfigError, match=r"tiny-cpu\.yaml is a 'finetune' config"):
        HeadConfig.build("tiny-cpu")
    with pytest.raises(ConfigError, match=r"table1-heads\.yaml is a 'heads' config"):
        build_config("table1-heads")
    HeadConfig.build("tiny-heads").save(tmp_path / "heads.yaml")
    with pytest.raises(ConfigError, match=r"heads\.yaml is a 'heads' config .* not a 'finetune'"):
        load_config(tmp_path / "heads.yaml")
    build_config("tiny-cpu").save(tmp_path / "run.yaml")
    assert "kind" not in (tmp_path / "run.yaml").read_text()  # fine-tuning files unchanged
    with pytest.raises(ConfigError, match=r"run\.yaml is a 'finetune' config"):
        HeadConfig.load(tmp_path / "run.yaml")
    (tmp_path / "odd.yaml").write_text("kind: bananas\n")
    with pytest.raises(ConfigError, match="unknown config kind 'bananas'"):
        HeadConfig.load(tmp_path / "odd.yaml")


def test_data_recipe_defaults_keep_todays_behaviour_and_validate():
    cfg = build_config()
    assert (cfg.sampler, cfg.sampler_label, cfg.pos_fraction) == ("shuffle", "", 0.5)
    assert (cfg.augment, cfg.scale, cfg.equalize, cfg.policy) == ("none", 0.0, "none", "U-Ignore")
    cfg = build_config(
        "tiny-cpu",
        [
            "policy=Atelectasis=U-Ones-LSR,*=U-Zeros",
            "sampler=oversample",
            "sampler_label=Edema",
            "pos_fraction=0.3",
            "augment=cxr-mild",
            "scale=0.1",
            "equalize=hist",
        ],
    )
    assert cfg.policy == "Atelectasis=U-Ones-LSR,*=U-Zeros" and cfg.sampler_label == "Edema"
    bad = {
        "policy": ("Edemaa=U-Ones", "Edemaa"),
        "sampler": ("dual", "sampler"),
        "sampler_label": ("Fracture", "sampler_label"),
        "pos_fraction": (1.0, "pos_fraction"),
        "augment": ("cxr-wild", "augment"),
        "scale": (1.5, "scale"),
        "equalize": ("gamma", "equalize"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            build_config(None, {key: value})
    # A policy naming a label outside the run's labels is a mistake too.
    with pytest.raises(ConfigError, match="Fracture"):
        build_config(None, {"policy": "Fracture=U-Ones"})


def test_head_config_checks_its_policy_with_the_same_parser():
    from cxrlabel.config import HeadConfig

    assert HeadConfig.build(None, {"policy": "Edema=U-Ones-LSR,*=U-Zeros"}).policy.startswith(
        "Edema"
    )
    with pytest.raises(ConfigError, match="Edemaa"):
        HeadConfig.build(None, {"policy": "Edemaa=U-Ones"})


def test_config_class_follows_the_kind_of_a_preset_or_saved_config(tmp_path) -> None:
    from cxrlabel.config import HeadConfig, config_class

    assert config_class("tiny-heads") is HeadConfig
    assert config_class("tiny-cpu") is RunConfig
    assert config_class() is RunConfig
    saved = tmp_path / "config.yaml"
    HeadConfig.build("tiny-heads").save(saved)
    assert config_class("tiny-cpu", saved) is HeadConfig  # the saved config decides
    (tmp_path / "odd.yaml").write_text("kind: other\n")
    with pytest.raises(ConfigError, match="unknown config kind 'other'"):
        config_class(None, tmp_path / "odd.yaml")
