"""One entry point for every family: build the model a config names, with trained weights loaded.

    model, loaded = build_model(config, groups={"projector", "lm"}, losses={"base"},
                                trained_now={"projector", "lm"}, weights=None)

`groups`/`losses` are everything the config's schedule uses (so optional modules,
such as ClipCap's visual prompts, exist with the same shapes in every stage);
`trained_now` are the groups the current stage trains. A group is active when it
is trained now or its tensors are inherited from `weights`.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from eimctl.models.registry import get_family
from eimctl.runtime.errors import EimError
from eimctl.runtime.weights import load_weights, weight_names


def groups_in(names: set[str], family) -> set[str]:
    """The family's trainable groups that have tensors among `names`."""
    return {group for group, prefix in family.TRAINABLE_GROUPS.items() if any(n.startswith(prefix) for n in names)}


def build_model(config, *, groups: set[str], losses: set[str], trained_now: set[str] = frozenset(),
                weights: Path | None = None):
    """(model, names of the tensors loaded from `weights`)."""
    family = get_family(config.model.family)
    inherited = groups_in(weight_names(weights), family) if weights is not None else set()
    model = family.build(config, groups=set(groups), losses=set(losses), active=set(trained_now) | inherited)
    loaded = load_weights(model, weights) if weights is not None else set()
    return model, loaded


def set_trainable(model: nn.Module, family_name: str, trainable: tuple[str, ...]) -> None:
    """Only the parameters of the named groups train; everything else is frozen."""
    prefixes = get_family(family_name).TRAINABLE_GROUPS
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if any(name.startswith(prefixes[group]) for group in trainable):
            param.requires_grad_(True)
    for group in trainable:
        if not any(name.startswith(prefixes[group]) for name, _ in model.named_parameters()):
            raise EimError(f"trainable group '{group}' has no parameters in this model",
                           where="config key `stages`", hint="check the family's options for that module")


def learning_rates_by_prefix(config, trainable: tuple[str, ...]) -> dict[str, float]:
    """{parameter-name prefix: learning rate} for groups trained at a rate of their own: the CLIP tuning
    module (group `clip_prompts`) at eim.prompt_lr when that is set; {} = every group at train.lr."""
    prefix = get_family(config.model.family).TRAINABLE_GROUPS.get("clip_prompts")
    if config.eim.prompt_lr and prefix and "clip_prompts" in trainable:
        return {prefix: config.eim.prompt_lr}
    return {}
