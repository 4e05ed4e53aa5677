"""Configuration: defaults, validation, precedence, YAML loading and the driver's CLI parsing."""

import dataclasses

import pytest

from ensemble.config import (CPU_PRESET, ConfigError, EnsembleConfig, FIELD_NAMES, build_config,
                             load_yaml)
from ensemble.cli import config_from_argv


# ------------------------------------------------------------------ defaults

def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_defaults_are_the_study_recipe():
    cfg = EnsembleConfig()
    assert cfg.arch == "resnext101_64x4d"
    assert cfg.lr == 8e-5
    assert cfg.epochs == 20
    assert cfg.members == 9
    assert cfg.freeze == "layer1"
    assert cfg.freeze_stem is False
    assert cfg.image_size == 224
    assert cfg.augment == "seed"
    assert cfg.batch_size == 64
    assert cfg.weights == "DEFAULT"
    assert cfg.data is None and cfg.bootstrap_size is None and cfg.gpus_per_member is None


def test_config_is_frozen_and_replace_validates():
    cfg = EnsembleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    assert cfg.replace(epochs=3).epochs == 3
    assert cfg.epochs == 20
    with pytest.raises(ConfigError, match="--epochs"):
        cfg.replace(epochs=0)


def test_to_dict_round_trips():
    cfg = EnsembleConfig(members=3, lr=1e-3)
    d = cfg.to_dict()
    assert set(d) == set(FIELD_NAMES)
    assert EnsembleConfig(**d) == cfg


# ------------------------------------------------------------------ validation

INVALID = [
    ("members", 0, "--members"),
    ("epochs", 0, "--epochs"),
    ("epochs", -1, "--epochs"),
    ("lr", 0, "--lr"),
    ("lr", -1e-3, "--lr"),
    ("lr", float("nan"), "--lr"),
    ("batch_size", 0, "--batch-size"),
    ("arch", "resnet9000", "--arch"),
    ("freeze", "layer5", "--freeze"),
    ("augment", "heavy", "--augment"),
    ("gpus_per_member", -1, "--gpus-per-member"),
    ("gpus_per_member", 1.5, "--gpus-per-member"),
    ("gpus_per_infer_actor", 2.5, "--gpus-per-infer-actor"),
    ("gpus_per_member", 2, "--gpus-per-member"),
    ("cpus_per_member", 0, "--cpus-per-member"),
    ("image_size", 8, "--image-size"),
    ("bootstrap_size", 0, "--bootstrap-size"),
    ("num_classes", 1, "--num-classes"),
    ("epochs", 2.5, "--epochs"),
    ("epochs", True, "--epochs"),
    ("seed", -1, "--seed"),
]


@pytest.mark.parametrize("name,value,flag", INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_invalid_value_raises_config_error_naming_flag(name, value, flag):
    with pytest.raises(ConfigError) as info:
        EnsembleConfig(**{name: value})
    msg = str(info.value)
    assert msg.startswith(flag + " "), msg
    assert "\n" not in msg


@pytest.mark.parametrize("name,value,flag", INVALID[:12], ids=[f"{n}={v!r}" for n, v, _ in INVALID[:12]])
def test_invalid_value_through_build_config(name, value, flag):
    with pytest.raises(ConfigError, match=flag):
        build_config(flag_values={name: value})


@pytest.mark.parametrize("name,value", [
    ("gpus_per_member", 0), ("gpus_per_member", 0.25), ("gpus_per_member", 1), ("gpus_per_member", 1.0),
    ("cpus_per_member", 0.5), ("members", 1), ("image_size", 16), ("freeze", "stem"), ("freeze", "none"),
    ("augment", "light"), ("augment", "none"), ("arch", "resnet18"),
])
def test_valid_edge_values_accepted(name, value):
    assert getattr(EnsembleConfig(**{name: value}), name) == value


@pytest.mark.parametrize("value,message", [
    (0, "--val-fraction 0: must be > 0"), (-0.1, "--val-fraction -0.1: must be > 0"),
    (0.51, "--val-fraction 0.51: must be <= 0.5"), (1, "--val-fraction 1: must be <= 0.5"),
    (float("nan"), "--val-fraction nan: must be a number"), ("0.1", "--val-fraction '0.1': must be a number"),
])
def test_val_fraction_bounds(value, message):
    with pytest.raises(ConfigError) as info:
        EnsembleConfig(data="X", val_fraction=value)
    assert str(info.value) == message


def test_val_fraction_edges_and_default():
    assert EnsembleConfig().val_fraction is None  # the data's own val split
    assert EnsembleConfig(data="X", val_fraction=0.5).val_fraction == 0.5
    assert EnsembleConfig(data="X", val_fraction=1e-6).val_fraction == 1e-6


def test_val_fraction_needs_data():
    with pytest.raises(ConfigError) as info:
        EnsembleConfig(val_fraction=0.2)
    assert str(info.value) == "--val-fraction 0.2: needs --data; the bundled digits come with their own val split"


# ------------------------------------------------------------------ build_config

def test_build_config_no_sources_is_defaults():
    assert build_config() == EnsembleConfig()


def test_build_config_precedence():
    preset = {"epochs": 2, "lr": 1e-2, "members": 3, "batch_size": 8}
    file_values = {"lr": 1e-3, "members": 5, "batch_size": 16}
    flag_values = {"members": 7, "batch_size": 32}
    cfg = build_config(preset=preset, file_values=file_values, flag_values=flag_values)
    assert cfg.image_size == 224      # default
    assert cfg.epochs == 2            # preset over default
    assert cfg.lr == 1e-3             # file over preset
    assert cfg.members == 7           # flag over file
    assert cfg.batch_size == 32       # flag over file over preset


def test_build_config_with_cpu_preset():
    cfg = build_config(preset=CPU_PRESET)
    for key, value in CPU_PRESET.items():
        assert getattr(cfg, key) == value
    assert cfg.members == 9


@pytest.mark.parametrize("source", ["preset", "file_values", "flag_values"])
def test_build_config_unknown_key_names_it(source):
    with pytest.raises(ConfigError, match="'no_such_key'"):
        build_config(**{source: {"no_such_key": 1}})


def test_build_config_hyphenated_keys_accepted():
    cfg = build_config(file_values={"batch-size": 16, "cpus-per-member": 1, "freeze-stem": True})
    assert cfg.batch_size == 16
    assert cfg.cpus_per_member == 1.0
    assert cfg.freeze_stem is True


def test_build_config_hyphen_and_underscore_same_field_later_wins():
    cfg = build_config(file_values={"batch-size": 16}, flag_values={"batch_size": 4})
    assert cfg.batch_size == 4


def test_build_config_yaml_int_for_float_field():
    cfg = build_config(file_values={"lr": 1, "cpus_per_member": 3, "gpus_per_member": 1})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert isinstance(cfg.cpus_per_member, float)
    assert isinstance(cfg.gpus_per_member, float)


def test_build_config_numeric_string_for_float_field():
    assert build_config(file_values={"lr": "1e-4"}).lr == 1e-4
    with pytest.raises(ConfigError, match="--lr"):
        build_config(file_values={"lr": "fast"})


def test_build_config_string_for_int_field_rejected():
    with pytest.raises(ConfigError, match="--epochs"):
        build_config(file_values={"epochs": "3"})


# ------------------------------------------------------------------ load_yaml

def test_load_yaml_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 1\nbatch-size: 16\narch: resnet18\n")
    values = load_yaml(str(path))
    assert values == {"epochs": 3, "lr": 1, "batch-size": 16, "arch": "resnet18"}
    cfg = build_config(file_values=values)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.arch) == (3, 1.0, 16, "resnet18")


def test_load_yaml_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(str(path)) == {}


def test_load_yaml_list_is_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="--config .*mapping"):
        load_yaml(str(path))


def test_load_yaml_missing_file_is_error(tmp_path):
    with pytest.raises(ConfigError, match="--config .*no such file"):
        load_yaml(str(tmp_path / "missing.yaml"))


def test_load_yaml_broken_yaml_is_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: [3\nlr: {\n")
    with pytest.raises(ConfigError, match="--config .*YAML"):
        load_yaml(str(path))


def test_load_yaml_is_safe(tmp_path):
    path = tmp_path / "unsafe.yaml"
    path.write_text("epochs: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="--config"):
        load_yaml(str(path))


# ------------------------------------------------------------------ driver CLI parsing

def test_cli_no_args_is_cpu_preset():
    cfg, dry, _ = config_from_argv([])
    assert dry is False
    assert cfg == build_config(preset=CPU_PRESET)
    assert cfg.arch == "resnet18"
    assert cfg.members == 9
    assert cfg.weights == "none"
    assert cfg.image_size == 16


def test_cli_data_gives_recipe_defaults():
    cfg, dry, _ = config_from_argv(["--data", "X"])
    assert dry is False
    assert cfg == EnsembleConfig(data="X")
    assert cfg.arch == "resnext101_64x4d"


def test_cli_num_classes_without_data_gives_recipe_defaults():
    cfg, dry, _ = config_from_argv(["--num-classes", "100", "--dry-run"])
    assert dry is True
    assert cfg == EnsembleConfig(num_classes=100)
    assert cfg.arch == "resnext101_64x4d"


def test_cli_flags_typed():
    cfg, _, _ = config_from_argv(["--data", "X", "--lr", "0.001", "--epochs", "3", "--gpus-per-member", "0.5",
                               "--freeze-stem", "--freeze", "layer2"])
    assert (cfg.lr, cfg.epochs, cfg.gpus_per_member, cfg.freeze_stem, cfg.freeze) == \
        (0.001, 3, 0.5, True, "layer2")


def test_cli_flags_override_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\nlr: 0.01\nmembers: 5\nbatch-size: 16\n")
    cfg, _, _ = config_from_argv(["--config", str(path), "--epochs", "7", "--members", "2"])
    assert cfg.epochs == 7          # flag over file
    assert cfg.members == 2         # flag over file
    assert cfg.lr == 0.01           # file over CPU preset (2e-3)
    assert cfg.batch_size == 16     # file over CPU preset (32)
    assert cfg.arch == "resnet18"   # no data anywhere: the CPU preset still applies


def test_cli_config_file_with_data_gives_recipe_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: /some/where\nepochs: 3\n")
    cfg, _, _ = config_from_argv(["--config", str(path)])
    assert cfg.data == "/some/where"
    assert cfg.epochs == 3
    assert cfg.arch == "resnext101_64x4d"
    assert cfg.lr == 8e-5


def test_cli_config_file_freeze_stem_not_overridden_by_absent_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("freeze_stem: true\n")
    cfg, _, _ = config_from_argv(["--config", str(path)])
    assert cfg.freeze_stem is True


def test_cli_config_file_hyphenated_num_classes_gives_recipe_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-classes: 100\n")
    cfg, _, _ = config_from_argv(["--config", str(path)])
    assert cfg.num_classes == 100
    assert cfg == EnsembleConfig(num_classes=100)


def test_cli_bad_config_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        config_from_argv(["--config", str(tmp_path / "nope.yaml")])


def test_more_than_one_gpu_per_member_is_refused_with_the_alternatives():
    """A member trains on one torch device: a second GPU would be reserved and idle."""
    with pytest.raises(ConfigError) as err:
        build_config(flag_values={"gpus_per_member": 2})
    assert str(err.value) == ("--gpus-per-member 2: each actor uses one GPU; to use more GPUs, run more of them "
                              "at 1 GPU each (e.g. --members), or share GPUs with a fraction (0.5)")


def test_cli_val_fraction(tmp_path):
    cfg, _, _ = config_from_argv(["--data", "X", "--val-fraction", "0.2"])
    assert cfg == EnsembleConfig(data="X", val_fraction=0.2)
    path = tmp_path / "run.yaml"
    path.write_text("data: X\nval-fraction: 0.1\n")
    assert config_from_argv(["--config", str(path)])[0].val_fraction == 0.1
    assert config_from_argv(["--config", str(path), "--val-fraction", "0.3"])[0].val_fraction == 0.3  # flag over file
    with pytest.raises(ConfigError, match=r"^--val-fraction 0.6: must be <= 0.5$"):
        config_from_argv(["--data", "X", "--val-fraction", "0.6"])


def test_several_architectures_take_turns_with_their_own_recipes():
    cfg = build_config(flag_values={"arch": ["resnet50", "wide_resnet50_2"], "members": 5, "lr": 1e-4,
                                    "recipes": {"wide_resnet50_2": {"lr": 0.5, "freeze": "layer2", "batch_size": 8}}})
    assert cfg.arch == "resnet50,wide_resnet50_2" and cfg.archs == ("resnet50", "wide_resnet50_2")
    assert [cfg.arch_of(i) for i in range(5)] == ["resnet50", "wide_resnet50_2"] * 2 + ["resnet50"]
    first, second = cfg.member_config(0), cfg.member_config(3)
    assert (first.arch, first.lr, first.freeze, first.batch_size, first.recipes) == (
        "resnet50", 1e-4, "layer1", 64, None)
    assert (second.arch, second.lr, second.freeze, second.batch_size) == ("wide_resnet50_2", 0.5, "layer2", 8)
    one = build_config(flag_values={"arch": "resnet18"})
    assert one.member_config(4) is one  # one architecture, no recipe: the config itself


@pytest.mark.parametrize("values, message", [
    ({"arch": "resnet18,vgg16"}, r"--arch 'resnet18,vgg16': choose one of resnet18, .*\('vgg16' is not one\)"),
    ({"arch": "resnet18, resnet18"}, "lists an architecture twice"),
    ({"arch": "resnet18,resnet34", "members": 1}, "2 architectures for 1 member"),
    ({"arch": "resnet18", "recipes": {"resnet50": {"lr": 0.1}}}, r"recipes: 'resnet50' is not one of --arch's"),
    ({"arch": "resnet18", "recipes": {"resnet18": {"epochs": 3}}}, r"recipes.resnet18: .* may set only lr, weights"),
    ({"arch": "resnet18", "recipes": {"resnet18": {"lr": 2}}}, r"recipes.resnet18: --lr 2: must be <= 1"),
    ({"arch": "resnet18", "recipes": ["resnet18"]}, "must map architectures to settings"),
])
def test_bad_architecture_lists_and_recipes_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(flag_values=values)


def test_bounds_that_multiply_have_a_bound_of_their_own():
    """--batch-size 4096 and --image-size 1024 each pass alone; together one float32 batch is 48 GiB
    (tried: 111 s, then a member out of memory): one line with the largest batch that fits. The
    data's classes and the vote's probabilities are bounded the same way."""
    from ensemble.config import check_vote_size

    with pytest.raises(ConfigError) as info:
        build_config(flag_values={"batch_size": 4096, "image_size": 1024})
    assert str(info.value) == ("--batch-size 4096 at --image-size 1024: one batch is 48.0 GiB as float32, over 4 GiB; "
                               "use --batch-size 341 or less, or a smaller --image-size")
    build_config(flag_values={"batch_size": 341, "image_size": 1024})  # 4 GiB less a little
    with pytest.raises(ConfigError, match="--infer-batch-size 2048 at --image-size 1024"):
        build_config(flag_values={"infer_batch_size": 2048, "image_size": 1024})
    build_config(flag_values={"batch_size": 4096, "infer_batch_size": 4096})  # at the study's 224 px: 2.3 GiB
    check_vote_size(21_000, 9, 100, "d")  # the study: 76 MB
    with pytest.raises(ConfigError, match="d: 100001 classes, over 100000"):
        check_vote_size(10, 1, 100_001, "d")
    with pytest.raises(ConfigError, match=r"the vote would hold 5000000 rows x 9 members x 100 classes = 16\.8 GiB"):
        check_vote_size(5_000_000, 9, 100, "d")
