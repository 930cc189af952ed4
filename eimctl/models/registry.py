"""The model families eimctl can build, by `model.family`.

    FAMILIES = {"clipcap": "eimctl.models.clipcap"}   # name -> module implementing FamilyModule

A family module (see protocol.FamilyModule) declares its trainable groups, its
default schedule, an optional config section (`SECTION`, a dataclass that
becomes `model.<name>`), and `build()`. Adding a family is one new module plus
one line here.
"""
from __future__ import annotations

import importlib

from eimctl.runtime.errors import EimError

FAMILIES: dict[str, str] = {"clipcap": "eimctl.models.clipcap", "llama-adapter": "eimctl.models.llama_adapter",
                            "lavin": "eimctl.models.lavin"}


def get_family(name: str):
    """The family module for `model.family`."""
    if name not in FAMILIES:
        raise EimError(f"unknown model family '{name}'", where="model.family",
                       hint=f"known families: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def family_sections() -> dict[str, type]:
    """{section name: dataclass} of the families that have options of their own."""
    sections = {}
    for name in FAMILIES:
        section = getattr(get_family(name), "SECTION", None)
        if section is not None:
            sections[name.replace("-", "_")] = section
    return sections
