"""Typed configuration: strict YAML loading, dotted overrides, validation, the resolved file.

    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "model.arch=resnet34"])
    save_config(cfg, run_dir / "config.yaml")

Every section is a dataclass whose fields carry a one-line comment. A key that is not a field, or a
value of the wrong type, is a :class:`UserError` naming the key path and the file it came from
(or the command-line override). Override values are parsed as YAML (``train.epochs=3`` is an
int, ``model.weights=null`` is None). Numbers are read as users write them: ``1e-3`` and ``5e-5`` are
floats in files and overrides (PyYAML follows YAML 1.1, which wants ``1.0e-3``; :class:`_Loader`
adds the YAML 1.2 float rule). A misspelt key, choice or ``model.arch`` gets a "did you mean".

    print(describe(cfg))      # the resolved config, each key with its comment (invasive-dist config)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torchvision
import yaml

from .archs import model_problems
from .data.dali import DaliConfig
from .data.gpu_cache import GpuCacheConfig
from .data.torch_backend import TorchConfig
from .errors import UserError
from .files import write_text


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # folder in the Kaggle layout: train/, test/, train_labels.csv
    labels_csv: str = "train_labels.csv"  # label file inside root (name,invasive)
    backend: Literal["auto", "torch", "dali", "gpu_cache", "synthetic"] = "torch"  # input pipeline
    n_folds: int = 5  # stratified folds of the train set
    fold_seed: int | None = None  # seeds the folds (null = `seed`); set it to vary `seed` over fixed folds
    fold: int = 0  # the fold used for validation (0 <= fold < n_folds)
    limit: int = 0  # use only the first N labelled images (0 = all); for quick experiments
    image_size: int | list[int] = 224  # model input: one side (square) or [height, width]
    eval_geometry: Literal["center_crop", "full"] = "full"  # eval/predict: the whole frame, or center_crop
    eval_crop_pct: float = 0.875  # eval center_crop: the crop's share of the resized image
    scale_min: float = 0.35  # train: random-resized-crop area fraction lower bound
    hflip: bool = True  # train: random horizontal flip
    vflip: bool = True  # train: random vertical flip (the photos have no canonical "up")
    rot90: bool = False  # train: random 90 degree rotations
    batch_size: int = 32  # per-device micro-batch
    global_batch_size: int = 0  # if set: batch_size = this / (processes x grad_accum), must divide
    eval_batch_size: int = 0  # per-device batch for validation/prediction (0 = 2 x batch_size)
    on_bad_file: Literal["error", "skip"] = "error"  # bad images: refuse to train, or exclude them
    check_cache: bool = True  # cache the data check by file sizes and mtimes
    pseudo_csv: str = ""  # name,invasive rows of test/ images added to the training folds only
    # Each backend's own settings, declared beside the backend (data/torch_backend.py, dali.py, gpu_cache.py).
    torch: TorchConfig = field(default_factory=TorchConfig)
    dali: DaliConfig = field(default_factory=DaliConfig)
    gpu_cache: GpuCacheConfig = field(default_factory=GpuCacheConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet18"  # any torchvision classification model name (resnet18 ... resnet152, ...)
    weights: str | None = None  # None, "imagenet" (torchvision weights API) or a state-dict file
    channels_last: bool = True  # NHWC memory format on GPU (ignored on CPU)
    aux_loss_weight: float = 0.0  # inception_v3/googlenet: weight of each aux head's loss (0 = heads off)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.1  # peak learning rate (before lr_scaling)
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = True  # sgd Nesterov momentum
    weight_decay: float = 5e-5  # decoupled for adamw, L2 for sgd; not applied to norms and biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw betas
    warmup_epochs: float = 1.0  # linear warmup length, then cosine decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr x global_batch / base_batch
    base_batch: int = 256  # reference global batch of lr for lr_scaling=linear
    backbone_lr_mult: float = 1.0  # lr multiplier of everything but the head (fine-tuning)


@dataclass
class TrainConfig:
    epochs: int = 5  # training epochs
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast precision
    grad_accum: int | Literal["auto"] = (
        1  # micro-batches per optimizer step; auto: the fewest keeping the per-device batch <= data.batch_size (elastic resume)
    )
    compile: bool = False  # torch.compile the model
    label_smoothing: float = 0.0  # BCE targets become y(1-s) + s/2
    clip_grad_norm: float = 0.0  # clip the global gradient norm (0 = measure only)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when world_size > 1
    ema_decay: float = 0.0  # EMA of weights + BatchNorm stats (0 = off); epochs keep the better of raw/EMA
    mixup_alpha: float = 0.0  # mixup Beta(alpha, alpha) (0 = off)
    cutmix_alpha: float = 0.0  # cutmix Beta(alpha, alpha) (0 = off); with both, each batch picks one
    mix_prob: float = 1.0  # probability that a batch is mixed when mixup/cutmix is on
    early_stop_patience: int = 0  # stop after N epochs without a better val/auc (0 = off)
    nonfinite: Literal["skip", "stop"] = "stop"  # non-finite loss/grad: skip the step or stop
    log_every: int = 10  # optimizer steps between metric reductions and log lines
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = run all epochs)
    deterministic: bool = False  # deterministic kernels (CPU resume is bit-exact either way)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save `last` every N optimizer steps (0 = at epoch ends only)
    keep_last: int = 2  # step checkpoints kept besides `last` and `best`


@dataclass
class OutputConfig:
    root: str = "runs"  # parent folder of run directories
    name: str = ""  # run directory name ("" = the config file's stem)
    tensorboard: bool = True  # write TensorBoard event files under tb/


@dataclass
class PredictConfig:
    tta: Literal["none", "flips", "dihedral"] = "none"  # test-time views averaged per image
    checkpoint: Literal["best", "last"] = "best"  # which checkpoint predict loads
    ensemble: Literal["mean", "rank_mean"] = "mean"  # how fold predictions are combined


@dataclass
class ProfileConfig:
    enabled: bool = False  # record a torch.profiler window
    wait: int = 5  # steps skipped before the window
    warmup: int = 2  # profiler warm-up steps (recorded, then discarded)
    active: int = 3  # steps recorded
    ranks: list[int] = field(default_factory=lambda: [0])  # ranks that write a trace


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU
    timeout_s: int = 600  # collective timeout: a dead peer ends the job instead of hanging it


@dataclass
class Config:
    seed: int = 0  # seeds weights (same on all ranks), data order, augmentation; folds unless data.fold_seed
    resume: str = ""  # "" (fresh), "auto" (continue from checkpoints/last if present) or a path
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.root) / (self.output.name or "run")

    @property
    def split_seed(self) -> int:
        """The seed of the fold split: ``data.fold_seed``, or ``seed`` when that is null."""
        return self.seed if self.data.fold_seed is None else self.data.fold_seed


# ----------------------------------------------------------------------------------------------
# YAML as users write it.


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3``, ``5E-5`` and ``2e+3`` as floats (the YAML 1.2 rule)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats (``1e-3``); what config files and overrides use."""
    return yaml.load(text, Loader=_Loader)


def _did_you_mean(word: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Strict conversion of plain YAML values into the dataclasses.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise UserError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alt in inner[1:]:  # e.g. int | Literal["auto"]: the first type that takes the value
            try:
                return _coerce(value, alt, where)
            except UserError:
                pass
        size = re.fullmatch(r"\s*(\d+)\s*[xX*,]\s*(\d+)\s*", value) if isinstance(value, str) else None
        if size and list[int] in inner:  # data.image_size=128x96: a size written as synth --size takes it
            w, h = size.groups()
            raise UserError(
                f"{where}: {value!r} is not a size this key reads: give one side (224) or "
                f"[height, width], e.g. {where}='[{h}, {w}]' for {w} wide and {h} high "
                "(synth --size is WIDTHxHEIGHT; image_size is [height, width])"
            )
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads an unquoted `no` as false
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            hint = _did_you_mean(value, args) if isinstance(value, str) else ""
            raise UserError(f"{where}: {value!r} is not one of {choices}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {where}")  # a bug, not user error


# Keys that moved into a backend's own section: an old config gets told where they went.
MOVED = {
    "data.num_workers": "data.torch.num_workers",
    "data.dali_hw_decoder_load": "data.dali.hw_decoder_load",
    "data.dali_threads": "data.dali.threads",
    "data.dali_hybrid_huffman_threshold": "data.dali.hybrid_huffman_threshold",
    "data.dali_prefetch": "data.dali.prefetch",
    "data.cache_short_side": "data.gpu_cache.short_side",
}


def _build(cls: type, raw: dict, where: str, problems: list[str] | None = None) -> Any:
    """``cls`` from ``raw``. Every unknown key and bad value is a problem: with a ``problems`` list
    they are appended there (the key keeps its default) so that one run reports them all; without
    one, they are raised together as one UserError."""
    collect = [] if problems is None else problems
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(raw) - names):
        path = f"{where}.{key}" if where else key
        if path in MOVED:
            collect.append(f"config key {path!r} is now {MOVED[path]!r} (each backend has its own section)")
            continue
        collect.append(
            f"unknown config key {path!r}{_did_you_mean(key, names, f'{where}.' if where else '')}; "
            f"valid keys{' of ' + where if where else ''}: " + ", ".join(sorted(names))
        )
    kwargs = {}
    for k, v in raw.items():
        if k not in names:
            continue
        key_where = f"{where}.{k}" if where else k
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            kwargs[k] = _build(tp, v, key_where, collect)
            continue
        try:
            kwargs[k] = _coerce(v, tp, key_where)
        except UserError as e:
            collect.append(str(e))
    if problems is None and collect:
        raise UserError("; ".join(collect))
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise UserError(f"override {dotted!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r} is not of the form key.path=value (e.g. train.epochs=3)")
    try:
        parsed = yaml_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key.strip(), parsed


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    try:
        cfg = _build(Config, raw, "")
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    validate(cfg, source)
    return cfg


def with_keys(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """A new validated config: ``cfg`` with dotted keys set, e.g. ``{"data.dali.threads": 8}``;
    ``cfg`` is left alone. Errors name ``source``."""
    raw = to_dict(cfg)
    for key, value in values.items():
        _set_dotted(raw, key, value)
    return config_from_dict(raw, source)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply dotted overrides, validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist")
        try:
            raw = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{p}: the top level must be a mapping of sections")
    file_problems: list[str] = []  # reported against the file, all at once, before overrides apply
    from_file = _build(Config, raw, "", file_problems)
    if file_problems:
        # The file's impossible values too, except those about a key already reported (it holds
        # its default here).
        bad = [p.split(":", 1)[0] for p in file_problems if not p.startswith(("unknown", "config key"))]
        file_problems += [p for p in config_problems(from_file) if not any(k in p for k in bad)]
        raise UserError(f"{source}: " + "; ".join(file_problems))
    steps = [copy.deepcopy(raw)]  # the raw config after 0, 1, 2, ... overrides
    override_problems: list[str] = []
    before: set[str] = set()
    for ov in overrides:
        try:
            key, value = parse_override(ov)
            _set_dotted(raw, key, value)
        except UserError as e:
            override_problems.append(str(e))
            steps.append(copy.deepcopy(raw))
            continue
        now: list[str] = []
        _build(Config, raw, "", now)
        new = [p for p in now if p not in before]  # what this override broke
        override_problems += [f"command-line override {ov!r}: {p}" for p in new]
        before |= set(now)
        steps.append(copy.deepcopy(raw))
    if override_problems:
        raise UserError("; ".join(override_problems))
    try:
        cfg = config_from_dict(raw, source)
    except UserError as e:
        raise _blame(e, steps, list(overrides), source) from None
    if not cfg.output.name:
        cfg.output.name = Path(path).stem if path is not None else "run"
    return cfg


def _blame(err: UserError, steps: list[dict], overrides: list[str], source: str) -> UserError:
    """An impossible combination: name the first override that made it, else the file."""
    if not overrides:
        return err
    for i, raw in enumerate(steps):
        try:
            config_from_dict(raw, source)
        except UserError:
            if i == 0:
                return err  # the file alone is already impossible
            msg = str(err).removeprefix(f"{source}: ")
            return UserError(f"command-line override {overrides[i - 1]!r}: {msg}")
    return err


def validate(cfg: Config, source: str = "<config>") -> None:
    """Impossible combinations fail here, before any work, with one message."""
    problems = config_problems(cfg)
    if problems:
        raise UserError(f"{source}: " + "; ".join(problems))


def config_problems(cfg: Config) -> list[str]:
    """Every impossible value or combination of ``cfg``, each naming its key."""
    d, t = cfg.data, cfg.train
    problems = []
    if d.n_folds < 2:
        problems.append(f"data.n_folds={d.n_folds} must be at least 2")
    if not 0 <= d.fold < d.n_folds:
        problems.append(f"data.fold={d.fold} must satisfy 0 <= fold < data.n_folds={d.n_folds}")
    if d.batch_size < 1:
        problems.append(f"data.batch_size={d.batch_size} must be >= 1")
    sides = [d.image_size] if isinstance(d.image_size, int) else d.image_size
    if len(sides) != 2 and not isinstance(d.image_size, int):
        problems.append(f"data.image_size={d.image_size} must be one side or [height, width]")
        sides = [16]
    if min(sides) < 16:
        problems.append(f"data.image_size={d.image_size} must be >= 16 on each side")
    if not 0.0 < d.eval_crop_pct <= 1.0:
        problems.append(f"data.eval_crop_pct={d.eval_crop_pct} must be in (0, 1]")
    if not 0.0 < d.scale_min <= 1.0:
        problems.append(f"data.scale_min={d.scale_min} must be in (0, 1]")
    problems += d.torch.problems() + d.dali.problems()
    if not any("data.image_size" in p for p in problems):
        problems += d.gpu_cache.problems(d.image_size)
    if t.grad_accum != "auto" and t.grad_accum < 1:
        problems.append(f"train.grad_accum={t.grad_accum} must be >= 1")
    if t.epochs < 1:
        problems.append(f"train.epochs={t.epochs} must be >= 1")
    if t.log_every < 1:
        problems.append(f"train.log_every={t.log_every} must be >= 1")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if not 0.0 <= t.label_smoothing < 1.0:
        problems.append(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
    if t.mixup_alpha < 0 or t.cutmix_alpha < 0 or not 0 <= t.mix_prob <= 1:
        problems.append("train.mixup_alpha/cutmix_alpha must be >= 0 and train.mix_prob in [0, 1]")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr={cfg.optim.lr} must be > 0")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas={cfg.optim.betas} must have two values")
    arch_problem = _check_arch(cfg.model.arch)
    if arch_problem:
        problems.append(arch_problem)
    if cfg.resume not in ("", "auto") and not Path(cfg.resume).exists():
        problems.append(f"resume={cfg.resume!r}: no such checkpoint (use '', 'auto' or a path)")
    m = cfg.model
    problems += model_problems(m.arch, d.image_size, m.aux_loss_weight, m.weights)
    return problems


def _check_arch(arch: str) -> str:
    """'' when torchvision has the classification model ``arch``, else the problem with a hint."""
    available = torchvision.models.list_models(module=torchvision.models)
    if arch in available:
        return ""
    close = difflib.get_close_matches(arch, available, n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"model.arch={arch!r} is not a torchvision classification model{hint} "
        "(the list: python -c 'import torchvision; print(torchvision.models.list_models())')"
    )


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys a run may change when it continues (resume=auto, a path, a torchrun restart): where and how
# it runs, logs and saves, and how long it trains. Every other key (model.arch, optim.*, seed,
# data.image_size, the folds, augmentation, ...) changes what is trained: a continued run that
# changes one is refused by name (checkpoint.refuse_mixed_run). A key added later is frozen unless
# it is listed here. The per-device batch and accumulation may change with the process count
# (elastic resume); the global batch they make is checked against the checkpoint's
# (build.resolve_batch).
RESUME_MAY_CHANGE = (
    "resume",
    "output.",
    "predict.",
    "profile.",
    "dist.",
    "checkpoint.",
    "data.root",  # the same images elsewhere (a node-local copy)
    "data.backend",
    "data.torch.",
    "data.dali.",
    "data.gpu_cache.",
    "data.check_cache",
    "data.eval_batch_size",
    "data.batch_size",
    "data.global_batch_size",
    "train.grad_accum",
    "train.epochs",
    "train.max_steps",
    "train.early_stop_patience",
    "train.log_every",
    "train.nonfinite",
    "train.compile",
    "model.weights",  # the initial weights: a continued run's come from its checkpoint
    "model.channels_last",
)


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_differences(saved: dict, cfg: Config) -> list[str]:
    """``key=new (the run has old)`` for each key outside :data:`RESUME_MAY_CHANGE` in which ``cfg``
    differs from a run's saved ``config.yaml`` (``saved``, as loaded). A key the file lacks (a run
    written before the key existed) counts as its default."""
    old = flat_keys(to_dict(Config())) | flat_keys(saved)
    new = flat_keys(to_dict(cfg))
    diffs = []
    for key, value in new.items():
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE):
            continue
        if key in old and old[key] != value:
            diffs.append(f"{key}={_flow(value)} (the run has {_flow(old[key])})")
    return diffs


def field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` of each field line of a config dataclass (its documentation)."""
    comments = {}
    lines = inspect.getsource(cls).splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\s+(\w+): [^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
        # A default that ruff wraps in parentheses: the comment is on the line after "= (".
        m = re.match(r"^\s+(\w+): [^#]*= \($", line)
        if m and i + 1 < len(lines) and "#" in lines[i + 1]:
            comments[m.group(1)] = lines[i + 1].split("#", 1)[1].strip()
    return comments


def _flow(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]


def describe(cfg: Config) -> str:
    """The resolved config as YAML, each key with its comment, and its default when it differs.

    The text loads back as a config file (``invasive-dist config ... > my.yaml``)."""
    lines: list[str] = []

    def walk(obj: Any, default: Any, indent: str) -> None:
        comments = field_comments(type(obj))
        rows = []
        for f in dataclasses.fields(obj):
            value, dflt = getattr(obj, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                rows.append((f"{indent}{f.name}:", "", value, dflt))
                continue
            note = comments.get(f.name, "")
            if value != dflt:
                note += f" [default {_flow(dflt)}]"
            rows.append((f"{indent}{f.name}: {_flow(value)}", note, None, None))
        width = max(len(r[0]) for r in rows if r[2] is None)
        for text, note, sub, sub_default in rows:
            if sub is not None:
                lines.append(text)
                walk(sub, sub_default, indent + "  ")
            else:
                lines.append(f"{text:<{width}}  # {note}" if note else text)

    walk(cfg, Config(), "")
    return "\n".join(lines) + "\n"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (``files.write_text``)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
