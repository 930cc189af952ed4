"""The training schedule: which stages exist, what each trains, with which losses, from where.

A stage is data, not code (config key `stages`, e.g. in examples/*.yaml):

    stages:
      st:      {init: pretrained, trainable: [projector],                 losses: {st: 1.0}}
      lm:      {init: st,         trainable: [lm],                        losses: {lm: 1.0}}
      base-ie: {init: lm,         trainable: [projector, lm, clip_prompts], losses: {base: 1.0, ie: 1.0}}

A config's `stages:` is the whole schedule (without one, the family's DEFAULT_STAGES);
`init` is `pretrained` (the configured CLIP/LM, fresh projector) or another stage
whose final weights this stage starts from; a stage updates only its `trainable`
groups (named by the family, e.g. ClipCap's projector, lm, clip_prompts, ie_head),
so no gradient crosses a stage boundary. Optional `train:` overrides
(e.g. `{epochs: 2, lr: 1e-4}`) apply to that stage only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from eimctl.eim.queue_kinds import KIND_OF_LOSS
from eimctl.models.registry import get_family
from eimctl.runtime.errors import EimError

LOSSES = ("base", *KIND_OF_LOSS)

@dataclass(frozen=True)
class StageSpec:
    name: str
    init: str
    trainable: tuple[str, ...]
    losses: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)

    @property
    def queues(self) -> list[str]:
        return [KIND_OF_LOSS[name].name for name in self.losses if name in KIND_OF_LOSS]


def resolve_schedule(config) -> dict[str, StageSpec]:
    """The config's `stages` (default: the family's DEFAULT_STAGES) as specs; every problem in one error."""
    family = get_family(config.model.family)
    merged = config.stages if config.stages else family.DEFAULT_STAGES
    modules, clip_side = tuple(family.TRAINABLE_GROUPS), family.CLIP_TUNING_GROUPS
    problems, specs = [], {}
    for name, spec in merged.items():
        where = f"stages.{name}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a mapping with init, trainable, losses")
            continue
        unknown = set(spec) - {"init", "trainable", "losses", "train"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)} (allowed: init, trainable, losses, train)")
        losses = spec.get("losses") or {}
        trainable = spec.get("trainable") or []
        if not isinstance(losses, dict) or not losses:
            problems.append(f"{where}.losses: give at least one of {list(LOSSES)} with a weight")
            losses = {}
        for loss, weight in losses.items():
            if loss not in LOSSES:
                problems.append(f"{where}.losses: unknown loss '{loss}' (known: {', '.join(LOSSES)})")
            elif not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
                problems.append(f"{where}.losses.{loss}: weight must be a number > 0, got {weight!r}")
        if not isinstance(trainable, list) or not trainable:
            problems.append(f"{where}.trainable: list the modules to train ({', '.join(modules)})")
            trainable = []
        for module in trainable:
            if module not in modules:
                problems.append(f"{where}.trainable: unknown module '{module}' (known: {', '.join(modules)})")
        if not isinstance(spec.get("train", {}), dict):
            problems.append(f"{where}.train: expected a mapping of train.* overrides")
        specs[name] = StageSpec(name, str(spec.get("init", "pretrained")), tuple(trainable),
                                {k: float(v) for k, v in losses.items() if isinstance(v, (int, float))},
                                dict(spec.get("train") or {}))
    for name, spec in specs.items():
        if spec.init != "pretrained" and spec.init not in specs:
            problems.append(f"stages.{name}.init: '{spec.init}' is neither 'pretrained' nor a stage")
        if "ie" in spec.losses and not set(clip_side) & set(spec.trainable):
            problems.append(f"stages.{name}: loss 'ie' needs a CLIP-side module in trainable "
                            f"({', '.join(clip_side)})")
    for name in specs:  # init chains must end at `pretrained`
        seen, current = [], name
        while current in specs and current not in seen:
            seen.append(current)
            current = specs[current].init
        if current in seen:
            problems.append(f"stages.{name}: init chain loops ({' -> '.join(seen + [current])})")
    if problems:
        raise EimError("invalid schedule: " + "; ".join(problems), where="config key `stages`",
                       hint="see eimctl/eim/schedule.py and examples/ for the format")
    return specs


def stage_spec(specs: dict[str, StageSpec], name: str) -> StageSpec:
    """The named stage of a resolved schedule, or one error listing the stages there are."""
    if name not in specs:
        raise EimError(f"unknown stage '{name}'", where="eimctl train-stage",
                       hint=f"stages in this config: {', '.join(specs)}")
    return specs[name]


def schedule_uses(specs: dict[str, StageSpec]) -> tuple[set[str], set[str]]:
    """(every trainable group, every loss) a resolved schedule uses: the model is built with the
    modules of all of them, so every stage of a run has the same architecture."""
    return ({g for s in specs.values() for g in s.trainable},
            {loss for s in specs.values() for loss in s.losses})


def training_order(config) -> list[StageSpec]:
    """Stages in an order that trains every stage after the one it starts from."""
    specs, ordered = resolve_schedule(config), []
    def visit(name: str) -> None:
        spec = specs[name]
        if spec.init != "pretrained":
            visit(spec.init)
        if spec not in ordered:
            ordered.append(spec)
    for name in specs:
        visit(name)
    return ordered


TORCHRUN_NAMES = ("torchrun", "torch.distributed.run", "torch.distributed.launch")


def launch_prefix(launcher: str = "") -> str:
    """How a compute step's command line starts: `eimctl`, or the launcher then the program it starts.
    torchrun starts a Python program unless told `--no-python`, so after a torchrun without it (or
    without its own `-m`) the step runs as the module, `-m eimctl`; after `--no-python`, `-m`, or any
    other launcher (srun, mpirun) it is the `eimctl` console script. `srun torchrun ...` follows torchrun."""
    import shlex
    try:
        words = shlex.split(launcher)
    except ValueError as error:
        raise EimError(f"--launcher {launcher!r} is not a valid shell command line: {error}",
                       where="eimctl schedule",
                       hint='quote it whole, e.g. --launcher "torchrun --nproc_per_node 8"') from None
    if not words:
        return "eimctl"
    at = next((i for i, word in enumerate(words) if word.rsplit("/", 1)[-1] in TORCHRUN_NAMES), None)
    own = set(words[at + 1:]) if at is not None else set()
    as_module = at is not None and not own & {"--no-python", "--no_python", "-m", "--module"}
    return f"{launcher.strip()} {'-m eimctl' if as_module else 'eimctl'}"


def recipe_commands(config, config_args: str, run_dir: str, launcher: str = "") -> list[str]:
    """The whole recipe as shell commands, in order: build-queues (when a stage reads a queue), every
    stage, the evaluation of every stage trained with loss_base (the others generate nothing), the
    report. `launcher` (e.g. "torchrun --nproc_per_node 8 --no-python", "srun") starts build-queues,
    every stage and every evaluation as many processes (`launch_prefix`); the report stays one process."""
    specs = training_order(config)
    run = launch_prefix(launcher)
    lines = [f"{run} build-queues{config_args}"] if any(spec.queues for spec in specs) else []
    for spec in specs:
        losses = " + ".join(f"{w:g}*loss_{n}" for n, w in spec.losses.items())
        lines.append(f"{run} train-stage {spec.name} --run-dir {run_dir}{config_args}"
                     f"    # from {spec.init}; trains {', '.join(spec.trainable)} by {losses}")
    for spec in specs:
        if "base" in spec.losses:
            lines.append(f"{run} evaluate {config.data.task} --run-dir {run_dir} --stage {spec.name}")
    lines.append(f"eimctl report {run_dir}")
    return lines
