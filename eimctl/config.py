"""Configuration: defaults < YAML file < `key=value` overrides, validated up front.

Every problem (unknown key, wrong type, out-of-range value) is collected and
reported in one error, so a user fixes a config in one round trip.
"""
from __future__ import annotations

import copy
import difflib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from eimctl.models.clip import ClipConfig
from eimctl.models.lm import LMConfig
from eimctl.models.projectors import ProjectorConfig
from eimctl.models.registry import FAMILIES, family_sections
from eimctl.runtime.distributed import DistConfig
from eimctl.runtime.errors import EimError
from eimctl.tasks import TASKS, task_sections


@dataclass
class DataConfig:
    task: str = "coco"               # the task that reads and formats the data (eimctl/tasks/)
    format: str = "jsonl"            # jsonl | coco-karpathy
    path: str = ""                   # folder with {train,val,test}.jsonl, or dataset_coco.json
    image_root: str = ""             # images are resolved under this folder (default: next to `path`)
    allow_outside_root: bool = False  # allow image paths that escape image_root
    max_caption_tokens: int = 40     # longer captions are truncated (with a warning) or refused
    overlong: str = "truncate"       # truncate | refuse


# The parts every family shares, plus one section per family that has options of its own
# (declared by the family module as SECTION; see eimctl/models/registry.py).
FAMILY_SECTIONS = family_sections()
ModelConfig = dataclasses.make_dataclass("ModelConfig", [
    ("family", str, field(default="clipcap")),
    ("clip", ClipConfig, field(default_factory=ClipConfig)),
    ("projector", ProjectorConfig, field(default_factory=ProjectorConfig)),
    ("lm", LMConfig, field(default_factory=LMConfig)),
    *[(name, section, field(default_factory=section)) for name, section in FAMILY_SECTIONS.items()],
])


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 40
    lr: float = 2e-5
    blr: float = 0.0                 # base lr: when > 0, lr = blr * batch_size / 256 (LLaMA-Adapter/LaVIN's rule)
    warmup_steps: int = 5000
    warmup_epochs: float = 0.0       # when > 0, the warm-up is this many epochs (replaces warmup_steps)
    schedule: str = "linear"         # linear (warm-up, then linear decay to 0) | cosine (warm-up, then half-cycle cosine to 0)
    weight_decay: float = 0.0
    decay_1d: bool = True            # false: no weight decay on biases and other 1-D tensors (timm's grouping)
    adam_beta2: float = 0.999        # AdamW's second-moment decay (LLaMA-Adapter/LaVIN: 0.95)
    max_grad_norm: float = 0.0       # 0 = no clipping
    max_steps: int = 0               # 0 = epochs decide
    seed: int = 42
    checkpoint_every: int = 1000     # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    checkpoint_minutes: float = 0.0  # also checkpoint after this much wall time since the last one; 0 = off
    log_every: int = 50
    device: str = "auto"             # auto | cpu | cuda
    feature_cache: bool = True       # encode each image once when CLIP is frozen
    num_workers: int = 0             # worker processes: batches, image encoding, CLIP tokenising in build-queues
    pin_memory: bool = True          # page-locked batches for faster host-to-GPU copies (CUDA only)
    precision: str = "fp32"          # fp32 | bf16 (autocast to bfloat16; the InfoNCE stays float32)
    compile: bool = False            # torch.compile the projector and the LM (first steps compile)
    grad_checkpointing: bool = False  # recompute the LM's layer activations in the backward pass (less memory)
    micro_batch_size: int = 0        # per-rank micro-batch (gradient accumulation); 0 = the rank's whole share
    loggers: str = "jsonl"           # jsonl (metrics.jsonl only) | tensorboard (also <stage>/tensorboard/ events)


@dataclass
class EvalConfig:
    split: str = "test"
    beam_size: int = 1
    max_new_tokens: int = 40
    batch_size: int = 64
    fixed_caption_baseline: bool = True
    fixed_caption_candidates: int = 300
    diagnostics: bool = True          # val NLL, image-use gap, text-only NLL, cos(query, own key) (README: Diagnostics)
    diagnostic_samples: int = 500     # samples they use: a fixed, evenly spread subset of val (and of train)
    zero_images: bool = False         # score with every image replaced by a zero pixel tensor (the image-ablation
                                      # control; tasks that read images: scienceqa)


@dataclass
class EIMConfig:
    """The method's knobs, including the choices the paper leaves open (README: 'Interpretation choices')."""
    temperature: float = 0.07
    queues_dir: str = "queues"        # the queue store (queues/README.md)
    queue_dtype: str = "float16"      # float16 | float32 storage of the key queues
    chunk_rows: int = 0               # keys per chunk of the streaming InfoNCE; 0 = by device (eimctl/losses.py)
    queue_placement: str = "auto"     # auto | host | device: memory-map the queues, or copy them to the
                                      # training device once (auto: device on CUDA, host on CPU)
    device_queue_dtype: str = "float32"  # float32 | float16: the queues' type in device memory (float32 skips a
                                         # conversion per chunk and step; float16 halves the memory)
    ie_query: str = "frozen-projection"  # frozen-projection | linear-head: how the [CLS] meets the text space
    lm_query: str = "multimodal"      # multimodal (ST prefix + text) | text: the sequence loss_LM's query sees
    clip_tuning: str = "network"      # network | tokens: loss_IE's CLIP tuning module (eimctl/models/clip_tuning.py)
    prompt_tokens: int = 8            # clip_tuning=tokens: visual prompt tokens inserted after [CLS]
    prompt_hidden: int = 0            # clip_tuning=network: the generators' hidden width; 0 = CLIP's width
    prompt_depth: str = "deep"        # clip_tuning=network: deep (offsets before every block) | shallow (first)
    prompt_lr: float = 0.0            # learning rate of the CLIP tuning module; 0 = the stage's train.lr

    # Our extensions, NOT from the paper (off by default; README 'Interpretation choices'):
    same_image: str = "negative"      # negative | positive | masked: other captions of the sample's image
    same_text: str = "negative"       # negative | positive | masked: rows with the same normalised caption
    center_keys: bool = False         # subtract each queue's mean key and re-normalise (an in-memory copy)
    # Key-queue diagnostics printed by build-queues (eimctl/eim/queue_diagnostics.py):
    duplicate_cosine: float = 0.999   # a row is a near-duplicate when another row's cosine exceeds this
    diagnostic_rows: int = 4096       # rows sampled for near-duplicates and the floor loss (exact if N <= it)


# The shared sections, one section per task that has options of its own (declared by the task as SECTION;
# see eimctl/tasks/__init__.py, e.g. `scienceqa.prompt_format`), and the schedule.
TASK_SECTIONS = task_sections()
Config = dataclasses.make_dataclass("Config", [
    ("data", DataConfig, field(default_factory=DataConfig)),
    ("model", ModelConfig, field(default_factory=ModelConfig)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    ("eval", EvalConfig, field(default_factory=EvalConfig)),
    ("eim", EIMConfig, field(default_factory=EIMConfig)),
    ("dist", DistConfig, field(default_factory=DistConfig)),
    *[(name, section, field(default_factory=section)) for name, section in TASK_SECTIONS.items()],
    ("stages", dict, field(default_factory=dict)),  # the schedule (eimctl/eim/schedule.py); {} = the family's own
])


CHOICES = {
    "data.task": TASKS,          # the registries themselves, so a registered name is known at once
    "data.format": {"jsonl", "coco-karpathy"},
    "data.overlong": {"truncate", "refuse"},
    "model.family": FAMILIES,
    "model.clip.tokens": {"pooled", "full", "cls_every_k", "pooled_grid"},
    "model.projector.type": {"mlp", "ffn", "transformer"},
    "train.device": {"auto", "cpu", "cuda"},
    "train.precision": {"fp32", "bf16"},
    "train.schedule": {"linear", "cosine"},
    "train.loggers": {"jsonl", "tensorboard"},
    "eim.queue_placement": {"auto", "host", "device"},
    "eim.device_queue_dtype": {"float32", "float16"},
    "eval.split": {"train", "val", "test"},
    "eim.queue_dtype": {"float16", "float32"},
    "eim.ie_query": {"frozen-projection", "linear-head"},
    "eim.lm_query": {"multimodal", "text"},
    "eim.same_image": {"negative", "positive", "masked"},
    "eim.same_text": {"negative", "positive", "masked"},
    "eim.clip_tuning": {"network", "tokens"},
    "eim.prompt_depth": {"deep", "shallow"},
    "dist.strategy": {"auto", "ddp", "fsdp"},
    "dist.backend": {"auto", "nccl", "gloo"},
    "dist.checkpoint_format": {"full", "sharded"},
    **{f"{name}.{key}": allowed for name, section in TASK_SECTIONS.items()
       for key, allowed in getattr(section, "CHOICES", {}).items()},
}
POSITIVE = {"data.max_caption_tokens", "model.clip.cls_every", "train.adam_beta2", "model.projector.prefix_length", "model.projector.layers",
            "model.projector.heads", "train.epochs", "train.batch_size", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "eval.beam_size", "eval.max_new_tokens",
            "eval.batch_size", "eval.fixed_caption_candidates", "eim.temperature", "eim.duplicate_cosine",
            "eim.diagnostic_rows", "eval.diagnostic_samples", "dist.timeout_minutes"}
NON_NEGATIVE = {"model.projector.hidden", "train.warmup_steps", "train.warmup_epochs", "train.blr", "train.weight_decay",
                "train.max_grad_norm", "train.max_steps", "train.micro_batch_size", "train.num_workers", "train.seed",
                "train.checkpoint_minutes", "eim.prompt_tokens", "eim.chunk_rows", "eim.prompt_hidden", "eim.prompt_lr"}
# Keys that change how a step runs but not what it produces.
NOT_FINGERPRINTED = {"train.loggers",
                     "train.device", "train.log_every", "train.num_workers", "train.checkpoint_every",
                     "train.checkpoint_minutes", "train.keep_checkpoints", "train.pin_memory", "train.compile",
                     "train.grad_checkpointing", "train.micro_batch_size",
                     "eval.batch_size", "eim.queues_dir", "eim.chunk_rows", "eim.queue_placement",
                     "eim.device_queue_dtype", "eim.duplicate_cosine", "eim.diagnostic_rows"}


def _coerce(value: Any, kind: type, key: str, problems: list[str]) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is dict:
        if isinstance(value, dict):
            return value
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{key}: expected {kind.__name__}, got {value!r}")
    return None


def _merge(target: Any, updates: dict, prefix: str, problems: list[str], whole_dicts: bool = False,
           origin: dict | None = None, source: str = "") -> None:
    """Apply one layer. With `whole_dicts`, a mapping-typed key (the schedule) is replaced as a
    whole, so a file's `stages:` is the complete schedule; `key=value` overrides patch it instead.
    `origin` records, per dotted key, the `source` (a file or an override) that set it last."""
    hints = get_type_hints(type(target))
    names = {f.name for f in fields(target)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"unknown key '{dotted}'{hint}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a mapping, got {value!r}")
            else:
                _merge(getattr(target, key), value, dotted + ".", problems, whole_dicts, origin, source)
            continue
        coerced = _coerce(value, kind, dotted, problems)
        if kind is dict and coerced is not None and not whole_dicts:
            coerced = _deep_merge(getattr(target, key), coerced)
        if coerced is not None:
            setattr(target, key, coerced)
            if origin is not None:
                origin[dotted] = source


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_values(config: Config, problems: list[str], origin: dict | None = None) -> None:
    start = len(problems)
    _check_ranges(config, problems)
    for index in range(start, len(problems)):  # name the layer that set the bad value
        source = (origin or {}).get(problems[index].split(":")[0])
        if source:
            problems[index] += f" [{source}]"


def _check_ranges(config: Config, problems: list[str]) -> None:
    flat = flatten({k: v for k, v in to_dict(config).items() if k != "stages"})
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            problems.append(f"{key}: '{flat[key]}' is not one of {sorted(allowed)}")
    for key in POSITIVE:
        if flat[key] <= 0:
            problems.append(f"{key}: must be > 0, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            problems.append(f"{key}: must be >= 0, got {flat[key]}")
    if not 0 < config.train.lr < 1:
        problems.append(f"train.lr: must be in (0, 1), got {config.train.lr}")
    grid = config.model.clip.grid_tokens
    if grid < 2 or math.isqrt(grid - 1) ** 2 != grid - 1:
        problems.append(f"model.clip.grid_tokens: must be 1 + n*n (e.g. 50 = 1 + 7x7), got {grid}")
    if config.eim.duplicate_cosine > 1:
        problems.append(f"eim.duplicate_cosine: must be <= 1 (a cosine), got {config.eim.duplicate_cosine}")


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["train.lr=1e-4", "model.clip.tokens=full"] into a nested dict."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise EimError(f"override '{item}' is not key=value", hint="write e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise EimError(f"config file not found: {path}", hint="check the path given to --config")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise EimError("malformed YAML", where=where, hint="fix the syntax at that line") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise EimError("config file must hold a mapping at the top level", where=str(path),
                       hint="write sections such as `train:` and `model:`")
    return loaded


def load_config(path: Path | list[Path] | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """defaults < `base` (e.g. a saved config) < YAML file(s), in order < overrides; all problems in one error."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path] if path else [])]
    config = Config()
    problems: list[str] = []
    origin: dict[str, str] = {}
    layers = [(base or {}, "the saved config", True), *[(read_yaml(one), str(one), True) for one in paths],
              *[(parse_overrides([item]), f"override {item}", False) for item in overrides or []]]
    sources = []
    for layer, source, whole_dicts in layers:
        start = len(problems)
        _merge(config, layer, "", problems, whole_dicts, origin, source)
        problems[start:] = [f"{problem} [{source}]" for problem in problems[start:]]
        sources += [source] * (len(problems) > start)
    start = len(problems)
    _check_values(config, problems, origin)
    sources += [problem.rsplit("[", 1)[-1].rstrip("]") for problem in problems[start:] if problem.endswith("]")]
    if problems:
        raise EimError("invalid configuration: " + "; ".join(problems), where=", ".join(dict.fromkeys(sources))
                       or "the defaults", hint="see README.md 'Configuration' for every key and its default")
    return config


def with_overrides(config: Config, updates: dict, source: str) -> Config:
    """A copy of `config` with `updates` (a nested mapping, e.g. a stage's `{"train": {...}}`) applied
    and validated like any other layer."""
    updated, problems = copy.deepcopy(config), []
    _merge(updated, updates, "", problems)
    _check_values(updated, problems)
    if problems:
        raise EimError("invalid configuration: " + "; ".join(problems), where=source,
                       hint="see README.md 'Configuration' for every key and its default")
    return updated


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fingerprint(data: Any) -> str:
    """A short, stable hash of JSON-able data."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_fingerprint(config: Config, sections: tuple[str, ...] = ("data", "model", "train", "eim", "stages")) -> str:
    """Also covers the section of the task `data.task` names, when it has one (its prompt format shapes training)."""
    task = config.data.task.replace("-", "_")
    if "data" in sections and task in TASK_SECTIONS:
        sections = (*sections, task)
    flat = {k: v for k, v in flatten(to_dict(config)).items()
            if k.split(".")[0] in sections and k not in NOT_FINGERPRINTED and not _silent(k, v, config)}
    return fingerprint(flat)


# Keys added after run directories already existed: left out of the fingerprint while at their default, so a
# stage trained before they existed stays complete (and one trained with another value does not).
ADDED_LATER = {"train.blr": 0.0, "train.warmup_epochs": 0.0, "train.schedule": "linear", "train.decay_1d": True,
               "train.adam_beta2": 0.999, "model.clip.cls_every": 4, "model.clip.grid_tokens": 50,
               "model.lm.load_in_4bit": False}


def _silent(key: str, value: Any, config: Config) -> bool:
    """Keys that cannot change this run: another family's section, or a later key at its default."""
    parts = key.split(".")
    if parts[0] == "model" and parts[1] in FAMILY_SECTIONS and parts[1] != config.model.family.replace("-", "_"):
        return True
    return key in ADDED_LATER and value == ADDED_LATER[key]


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(copy.deepcopy(to_dict(config)), sort_keys=False)
