"""The run's configuration: one frozen dataclass, validated at the boundary.

Defaults are the study's recipe (ResNeXt-101 64x4d, layer1 frozen, Adam 8e-5, 20 epochs,
9 bootstrap members). ``CPU_PRESET`` is what the bundled demo (no ``--data``) runs with.
Precedence when building a config: defaults < preset < --config YAML < command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

# ConfigError: raised by the checks below; many modules import it from here
from ensemble.errors import ConfigError, redact

ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
)
FREEZE_STAGES = ("none", "stem", "layer1", "layer2", "layer3", "layer4")
AUGMENTS = ("seed", "light", "none")
EVAL_RESIZES = ("squash", "short-side")
VOTES = ("soft", "hard")
TTAS = ("none", "hflip")
BAGGINGS = ("bootstrap", "full")
CALIBRATE_ON = ("val", "oob")
PRECISIONS = ("auto", "bf16", "fp32")
CACHE_TIERS = ("auto", "raw", "compressed")  # image_cache.TIERS, or the first that fits


def resize_side(image_size: int) -> int:
    """R, the size eval resizes to before its centre crop S: the study resizes to 256 before a 224
    crop; keep that ratio at other sizes. Also the default cache side (``cache_side``)."""
    return round(image_size * 256 / 224)


def cache_side(cfg: "EnsembleConfig") -> int:
    """The short side the run's cached train images keep, the source of every epoch's crops:
    ``--cache-side``, else R = ``resize_side(S)``, so a RandomResizedCrop of the whole image still
    downsamples to S."""
    return cfg.cache_side or resize_side(cfg.image_size)


@dataclass(frozen=True)
class EnsembleConfig:
    # --- data and outputs
    data: Optional[str] = None          # dataset root with train/ val/ test/; None = bundled digits
    val_fraction: Optional[float] = None  # share of each class's train images drawn (seeded) as val;
                                          # None = the data's val
    val_seed: Optional[int] = None      # seeds that draw; None = seed (a student keeps its teacher's val rows)
    output: Optional[str] = None        # results folder; None = runs/<timestamp>
    # --- ensemble
    members: int = 9                    # number of bagged models
    bootstrap_size: Optional[int] = None  # rows drawn with replacement per member; None = train size
    seed: int = 0                       # one seed; per-member seeds derive from it
    bagging: str = "bootstrap"          # bootstrap = sample with replacement; full = every member sees all rows
    vote: str = "soft"                  # soft = mean of probabilities; hard = majority of top-1 labels
    tta: str = "none"                   # none | hflip: average each member over the image and its mirror
    calibrate_on: str = "val"           # val | oob: the rows the ensemble's temperature is fitted on
    # --- model
    arch: str = "resnext101_64x4d"      # torchvision ResNet-family name (see ARCHS); several, comma-separated:
                                        # members take them in turn
    recipes: Optional[dict] = None      # per architecture, what differs from the flags:
                                        # {arch: {lr, weights, freeze, freeze_stem, batch_size}} (YAML)
    weights: str = "DEFAULT"            # "none", a torchvision weights name, or a state-dict file
    freeze: str = "layer1"              # freeze residual stages layer1..this one; "stem" = stem only
    freeze_stem: bool = False           # also freeze the stem (conv1 + bn1)
    num_classes: Optional[int] = None   # only for --dry-run without --data
    # --- training
    epochs: int = 20                    # passes over each member's bootstrap shard
    batch_size: int = 64                # images per optimizer step, per member
    lr: float = 8e-5                    # Adam learning rate
    image_size: int = 224               # training crop S; eval resizes to round(S*256/224) first
    augment: str = "seed"               # seed | light | none (see transforms.py)
    eval_resize: str = "squash"         # squash (the study's: S x S, then R x R, centre S) | short-side (keeps aspect)
    cache_side: Optional[int] = None    # short side of cached train images (augmentation source);
                                        # None = round(S*256/224)
    cache_share: float = 0.5            # the image cache may take this share of the object store; 0 = no cache
    cache_tier: str = "auto"            # auto = raw pixels if they fit, else compressed, else none; raw; compressed
    precision: str = "auto"             # auto = bf16 autocast on GPUs that support it; fp32; bf16
    # --- resources
    gpus_per_member: Optional[float] = None   # 0, a fraction (0.25, 0.5) or 1 GPU;
                                              # None = 1 if the cluster has GPUs else 0
    cpus_per_member: Optional[float] = None  # CPUs reserved per member (its torch threads);
                                             # None = 2, or a node's all if fewer
    infer_actors: int = 2               # soft-vote actor pool size
    infer_batch_size: int = 64          # images per soft-vote batch
    gpus_per_infer_actor: Optional[float] = None  # like gpus_per_member
    cpus_per_infer_actor: float = 1.0   # CPUs per soft-vote actor
    address: Optional[str] = None       # Ray address; None = join the local cluster if any, else start one
    strict: bool = False                # unreadable image files stop the run (default: skipped, listed)
    stall_timeout: float = 600.0        # seconds with no member able to start before the run stops, saying why
    # --- tracking (not in the fingerprint: a tracked run trains the same members, and resumes an untracked one)
    mlflow: bool = False                # log the run (a parent run) and its members (child runs) to MLflow
    mlflow_uri: Optional[str] = None    # tracking URI; None = MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db
    mlflow_experiment: str = "ensemble"  # the MLflow experiment the runs go to

    def __post_init__(self) -> None:
        for name, (low, high) in INT_RANGES.items():
            if getattr(self, name) is not None or name not in OPTIONAL:
                check_int(self, name, low=self.image_size if low is None else low, high=high)
        for name, (zero_ok, high) in NUMBER_RANGES.items():
            if getattr(self, name) is not None or name not in OPTIONAL:
                check_number(self, name, positive=not zero_ok, high=high)
        for name in ("gpus_per_member", "gpus_per_infer_actor"):
            check_gpus(self, name)
        for name in ("batch_size", "infer_batch_size"):
            check_batch_bytes(getattr(self, name), self.image_size, f"--{flag(name)}")
        check_archs(self)
        check_choice(self, "freeze", FREEZE_STAGES)
        check_choice(self, "augment", AUGMENTS)
        check_choice(self, "eval_resize", EVAL_RESIZES)
        check_choice(self, "cache_tier", CACHE_TIERS)
        check_choice(self, "vote", VOTES)
        check_choice(self, "precision", PRECISIONS)
        check_choice(self, "tta", TTAS)
        check_choice(self, "bagging", BAGGINGS)
        check_choice(self, "calibrate_on", CALIBRATE_ON)
        for name in ("freeze_stem", "strict", "mlflow"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"--{flag(name)} {getattr(self, name)!r}: must be true or false")
        for name in ("data", "output", "weights", "address", "mlflow_uri", "mlflow_experiment"):
            value = getattr(self, name)
            if (value is not None or name == "mlflow_experiment") and (not isinstance(value, str) or not value):
                raise ConfigError(f"--{flag(name)} {value!r}: must be a non-empty string")
        if not self.mlflow and (self.mlflow_uri is not None or self.mlflow_experiment != "ensemble"):
            name = "mlflow_uri" if self.mlflow_uri is not None else "mlflow_experiment"
            raise ConfigError(f"--{flag(name)} {getattr(self, name)}: needs --mlflow (tracking is off without it)")
        if self.val_fraction is not None and self.data is None:
            raise ConfigError(f"--val-fraction {self.val_fraction:g}: needs --data; the bundled digits come with "
                              f"their own val split")

    def replace(self, **changes: Any) -> "EnsembleConfig":
        return dataclasses.replace(self, **changes)

    @property
    def split_seed(self) -> int:
        """What seeds the --val-fraction draw: ``val_seed``, else ``seed``."""
        return self.seed if self.val_seed is None else self.val_seed

    @property
    def archs(self) -> tuple:
        """The architectures ``arch`` lists (one, or several comma-separated), in order."""
        return tuple(a.strip() for a in str(self.arch).split(","))

    def arch_of(self, member: int) -> str:
        """Member ``member``'s architecture: the listed ones in turn."""
        archs = self.archs
        return archs[member % len(archs)]

    def member_config(self, member: int) -> "EnsembleConfig":
        """What member ``member`` trains with: its architecture and that architecture's recipe
        (``recipes``) over the run's settings; the config itself when there is one architecture and
        no recipe."""
        if len(self.archs) == 1 and not self.recipes:
            return self
        arch = self.arch_of(member)
        recipe = {k: _coerce(k, v) for k, v in ((self.recipes or {}).get(arch) or {}).items()}
        return self.replace(arch=arch, recipes=None, **recipe)

    def to_dict(self) -> dict:
        """The settings as written to run.json, config.yaml, report.json and MLflow's params: a URL's
        user and password (``--mlflow-uri https://user:token@host``) replaced (errors.redact)."""
        return {k: redact(v) if isinstance(v, str) else v for k, v in dataclasses.asdict(self).items()}


# Every numeric setting's range, checked when a config is built (before anything is written), each
# refusal one line naming the flag and the bound. Whole numbers: (low, high); low None = --image-size.
INT_RANGES = {
    "members": (1, 1000),
    "epochs": (1, 1000),
    "batch_size": (1, 4096),
    "image_size": (16, 1024),
    "infer_actors": (1, 1024),
    "infer_batch_size": (1, 4096),
    "seed": (0, 2**32 - 1),
    "val_seed": (0, 2**32 - 1),
    "bootstrap_size": (1, 100_000_000),   # also at most 10 x the train split (driver)
    "num_classes": (2, 100_000),
    "cache_side": (None, 4096),           # at least the crop size S
}
# Numbers: (0 allowed, high); otherwise above 0. GPUs: 0 to 1 (check_gpus).
NUMBER_RANGES = {
    "lr": (False, 1.0),
    "cpus_per_member": (False, 1024.0),
    "cpus_per_infer_actor": (False, 1024.0),
    "stall_timeout": (False, 7 * 24 * 3600.0),  # a week
    "cache_share": (True, 1.0),                # a share of the object store; 0 = no cache
    # Half at most: rounded half up, a class of n >= 2 train images then always keeps one in train
    # (data.stratified_val_rows), and val is never larger than what the members train on.
    "val_fraction": (False, 0.5),
}
OPTIONAL = {f.name for f in fields(EnsembleConfig) if f.default is None}  # None = decided later (see each field)

# What the bundled digits demo runs with: every stage of the recipe, sized for 2 CPUs.
CPU_PRESET: Mapping[str, Any] = {
    "arch": "resnet18",
    "weights": "none",          # nothing to fine-tune from offline; trains from scratch
    "freeze": "none",
    "epochs": 2,                # 2 at lr 1e-3: ensemble 0.947 vs mean member 0.834 val acc, demo 54 s (3 at 3e-3: 64 s)
    "batch_size": 64,
    "lr": 1e-3,                 # from scratch, a higher rate than the fine-tuning recipe's 8e-5
    "image_size": 16,           # the digits are 8x8 scans: 16 px keeps every pixel, and trains fast
    "augment": "light",         # flips and heavy crops change what a digit means
    "cpus_per_member": 1.0,     # two members train at once on a 2-core laptop, one thread each
    "infer_actors": 2,
    "infer_batch_size": 128,
}

FIELD_NAMES = tuple(f.name for f in fields(EnsembleConfig))


def build_config(*, preset: Optional[Mapping[str, Any]] = None,
                 file_values: Optional[Mapping[str, Any]] = None,
                 flag_values: Optional[Mapping[str, Any]] = None) -> EnsembleConfig:
    """Defaults < preset < YAML file < flags. Unknown keys and bad values raise ConfigError."""
    merged: dict = {}
    for source, values in (("preset", preset), ("--config", file_values), ("flags", flag_values)):
        for key, value in (values or {}).items():
            name = key.replace("-", "_")
            if name not in FIELD_NAMES:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; known keys: {', '.join(FIELD_NAMES)}")
            merged[name] = value
    if isinstance(merged.get("arch"), (list, tuple)):  # YAML: arch: [resnet50, wide_resnet50_2]
        merged["arch"] = ",".join(map(str, merged["arch"]))
    merged = {k: _coerce(k, v) for k, v in merged.items()}
    return EnsembleConfig(**merged)


def config_with_preset(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> EnsembleConfig:
    """The config an entry point runs: the CPU preset applies to the bundled demo only (neither
    ``data`` nor ``num_classes`` named, in the file or the flags); --num-classes plans for your own data."""
    named = {k.replace("-", "_") for k, v in file_values.items() if v is not None} | set(flag_values)
    uses_bundled = not named & {"data", "num_classes"}
    return build_config(preset=CPU_PRESET if uses_bundled else None, file_values=file_values,
                        flag_values=flag_values)


def load_yaml(path: str) -> dict:
    """Read a --config file with a safe loader; one clear error for anything wrong."""
    import yaml

    try:
        with open(path, "r", encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: cannot read it as YAML ({exc.__class__.__name__})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


_FIELD_TYPES = {f.name: f.type for f in fields(EnsembleConfig)}


def _coerce(name: str, value: Any) -> Any:
    """YAML gives ints for floats ('lr: 1' is fine) and strings for everything else."""
    kind = _FIELD_TYPES[name]
    if value is None:
        return None
    if "float" in kind and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "float" in kind and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"--{flag(name)} {value!r}: must be a number") from None
    return value


def check_one_gpu(name: str, value: float) -> None:
    """A member (trial, voter) trains or predicts on one device: more than 1 GPU each would be
    reserved and left idle, so it is refused with the ways to use more GPUs instead."""
    if value > 1:
        raise ConfigError(f"--{flag(name)} {value:g}: each actor uses one GPU; to use more GPUs, run more of them "
                          f"at 1 GPU each (e.g. --members), or share GPUs with a fraction (0.5)")


def flag(name: str) -> str:
    """The command-line spelling of a field: batch_size -> batch-size."""
    return name.replace("_", "-")


# Each bound above holds alone; their product has its own: one batch as float32 (batch x S x S x 3
# x 4 bytes) at most 4 GiB. The study's batch (64 at 224 px) is 39 MB; 4096 at 1024 px was 51 GB.
MAX_BATCH_BYTES = 4 * 2**30


def check_batch_bytes(batch: int, image_size: int, what: str) -> None:
    """ConfigError when ``batch`` images of ``image_size`` px, as float32, take over MAX_BATCH_BYTES."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (batch, image_size)):
        return  # the per-value checks name a value that is not a whole number
    per_image = image_size * image_size * 3 * 4
    if batch * per_image > MAX_BATCH_BYTES:
        raise ConfigError(f"{what} {batch} at --image-size {image_size}: one batch is {batch * per_image / 2**30:.1f} "
                          f"GiB as float32, over {MAX_BATCH_BYTES / 2**30:g} GiB; use {what} "
                          f"{MAX_BATCH_BYTES // per_image} or less, or a smaller --image-size")


# The vote holds every member's probabilities of every scored row (val, test and, for out-of-bag
# scores, train) in the driver: rows x members x classes float32, at most 16 GiB (the study's
# 21k images x 9 members x 100 classes: 76 MB).
MAX_VOTE_BYTES = 16 * 2**30


def check_vote_size(rows: int, members: int, num_classes: int, where: str) -> None:
    """ConfigError when the data's classes (at most INT_RANGES' num_classes) or the vote's
    probabilities (``rows`` scored by ``members``) are beyond their bounds, before anything runs."""
    high = INT_RANGES["num_classes"][1]
    if num_classes > high:
        raise ConfigError(f"--data {where}: {num_classes} classes, over {high}; is a class folder level missing?")
    need = rows * members * num_classes * 4
    if need > MAX_VOTE_BYTES:
        raise ConfigError(f"--data {where}: the vote would hold {rows} rows x {members} members x {num_classes} "
                          f"classes = {need / 2**30:.1f} GiB of probabilities, over {MAX_VOTE_BYTES / 2**30:g} GiB; "
                          f"use fewer --members, or --bagging full (no out-of-bag rows), or a smaller test split")


def check_int(obj, name: str, *, low: int, high: Optional[int] = None) -> None:
    """``obj.<name>`` is a whole number from ``low`` to ``high``, or ConfigError naming the flag (any
    settings dataclass: the run's config, the server's options, a search's settings)."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{flag(name)} {value!r}: must be a whole number >= {low}")
    if value < low:
        raise ConfigError(f"--{flag(name)} {value}: must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"--{flag(name)} {value}: must be <= {high}")


def check_number(obj, name: str, *, positive: bool, high: Optional[float] = None) -> None:
    """``obj.<name>`` is a finite number, > 0 when ``positive``, else >= 0, and at most ``high``;
    or ConfigError."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"--{flag(name)} {value!r}: must be a number")
    if positive and value <= 0:
        raise ConfigError(f"--{flag(name)} {value}: must be > 0")
    if not positive and value < 0:
        raise ConfigError(f"--{flag(name)} {value}: must be >= 0")
    if high is not None and value > high:
        raise ConfigError(f"--{flag(name)} {value:g}: must be <= {high:g}")


def check_choice(obj, name: str, allowed: tuple) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"--{flag(name)} {value!r}: choose one of {', '.join(allowed)}")


# What an architecture's recipe (``recipes`` in a --config YAML) may set for its members.
RECIPE_KEYS = ("lr", "weights", "freeze", "freeze_stem", "batch_size")


def check_archs(cfg: "EnsembleConfig") -> None:
    """``arch``: one architecture or several, comma-separated, each listed once and at most as many
    as members; ``recipes``: per listed architecture, RECIPE_KEYS only, each value as valid as its
    flag's. One line (ConfigError) naming the entry otherwise."""
    archs = cfg.archs
    for arch in archs:
        if arch not in ARCHS:
            named = "" if arch == cfg.arch else f" ({arch!r} is not one)"
            raise ConfigError(f"--arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}, or several comma-separated "
                              f"(e.g. resnet50,wide_resnet50_2){named}")
    if len(set(archs)) != len(archs):
        raise ConfigError(f"--arch {cfg.arch!r}: lists an architecture twice; list each once")
    if len(archs) > cfg.members:
        raise ConfigError(f"--arch {cfg.arch!r}: {len(archs)} architectures for {cfg.members} member(s); list at most "
                          f"--members architectures")
    if cfg.recipes is None:
        return
    if not isinstance(cfg.recipes, dict):
        raise ConfigError(f"recipes: {cfg.recipes!r}: must map architectures to settings, e.g. "
                          f"{{resnet50: {{lr: 1.0e-4}}}}")
    for arch, recipe in cfg.recipes.items():
        if arch not in archs:
            raise ConfigError(f"recipes: {arch!r} is not one of --arch's ({', '.join(archs)})")
        if not isinstance(recipe, dict) or set(recipe) - set(RECIPE_KEYS):
            raise ConfigError(f"recipes.{arch}: {recipe!r}: may set only {', '.join(RECIPE_KEYS)}")
        try:
            cfg.member_config(archs.index(arch))
        except ConfigError as exc:
            raise ConfigError(f"recipes.{arch}: {exc.message}") from None


def check_gpus(obj, name: str) -> None:
    """``obj.<name>``: None (decided from the cluster), or 0, a fraction or 1 GPU (``check_one_gpu``)."""
    value = getattr(obj, name)
    if value is not None:
        check_number(obj, name, positive=False)
        check_one_gpu(name, value)
