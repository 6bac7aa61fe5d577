import pytest

from icd.config import Config, ConfigError, apply_override, load_config

PRESETS = ["jobs/configs/toy.yaml", "jobs/configs/sd15.yaml", "jobs/configs/sdxl.yaml"]


@pytest.mark.parametrize("path", PRESETS)
def test_presets_load(path):
    cfg = load_config(path)
    assert cfg.preset in path


def test_defaults_are_the_method_numbers():
    m = Config().method
    assert (m.beta_start, m.beta_end, m.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert m.guidance_scales == [0, 7, 11, 15, 19]
    assert m.reverse_timesteps == [999, 779, 519, 259]
    assert m.forward_timesteps == [19, 259, 519, 779]
    assert (m.huber_c, m.lambda_forward, m.lambda_reverse, m.dynamic_cfg_tau) == (0.001, 1.5, 1.5, 0.8)
    stage = Config().train.icd
    assert (stage.lr, stage.weight_decay, stage.grad_clip, stage.steps, stage.global_batch_size) == (8e-6, 0, 1.0, 6000, 512)


def test_toy_preset_runs_on_cpu_with_two_workers():
    cfg = load_config("jobs/configs/toy.yaml")
    assert cfg.model.base == "toy" and cfg.model.resolution == 32
    assert cfg.scaling.use_gpu is False and cfg.scaling.num_workers == 2


def test_overrides_are_typed_from_yaml():
    cfg = load_config("jobs/configs/toy.yaml", ["train.icd.lr=1e-3", "method.guidance_scales=[0, 7]",
                                                "model.gradient_checkpointing=true", "tracking.experiment=x y"])
    assert cfg.train.icd.lr == pytest.approx(1e-3)
    assert cfg.method.guidance_scales == [0.0, 7.0]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.tracking.experiment == "x y"


def test_override_creates_sections_in_an_empty_tree():
    tree = {}
    apply_override(tree, "a.b.c=3")
    assert tree == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override, field, expected", [
    ("train.icd.lr=abc", "train.icd.lr", "valid number"),
    ("scaling.num_workers=0", "scaling.num_workers", "greater than or equal to 1"),
    ("model.mixed_precision=fp8", "model.mixed_precision", "'no', 'fp16' or 'bf16'"),
    ("method.reverse_timesteps=[259, 519]", "method.reverse_timesteps", "strictly decreasing"),
    ("method.forward_timesteps=[19, 2000]", "method", "[0, 999]"),
    ("method.beta_end=0.0001", "method", "beta_end must exceed"),
])
def test_bad_values_name_the_field_and_the_expectation(override, field, expected):
    with pytest.raises(ConfigError) as info:
        load_config("jobs/configs/toy.yaml", [override])
    message = str(info.value)
    assert f"'{field}'" in message and expected in message and "toy.yaml" in message


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown field 'train.icd.lrr'; expected one of: steps, lr,"):
        load_config("jobs/configs/toy.yaml", ["train.icd.lrr=1"])


@pytest.mark.parametrize("override, expected", [
    ("train.icd.lr", "expected KEY=VALUE"),
    ("seed.x=1", "'seed' is a value"),
    ("a..b=1", "empty component"),
    ("train.icd.lr=[1", "not valid YAML"),
])
def test_malformed_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("jobs/configs/toy.yaml", [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {base: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_hash_is_stable_and_follows_the_values():
    a = load_config("jobs/configs/toy.yaml")
    assert a.hash() == load_config("jobs/configs/toy.yaml").hash()
    assert a.hash() != load_config("jobs/configs/toy.yaml", ["seed=1"]).hash()
    # Same values reached two ways hash the same.
    assert load_config("jobs/configs/toy.yaml", ["seed=0"]).hash() == a.hash()


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("jobs/configs/sd15.yaml", ["train.cycle.steps=10"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
