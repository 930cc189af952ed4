"""Tasks: a task reads its data, formats each sample into (instruction, response) and scores predictions.

    TASKS = {"coco": "eimctl.tasks.coco"}     # name -> module; the module's TASK implements tasks/protocol.py

`data.task` picks the task whose reader and prompt format training and the key
queues use; `eimctl evaluate TASK` scores a trained stage with it. Adding a task
is one new module plus one line here.

A task with options of its own names, in TASK_SECTIONS, the module that declares them as
`SECTION` (a dataclass, which becomes the top-level config section `<task>`, e.g.
`scienceqa.prompt_format`; its `CHOICES` class attribute lists allowed values). eimctl/config.py
imports that module, so it must not import eimctl.config; the task's TASK then offers
`configured(config)`, its `format` under that section (see `formatter`).
"""
from __future__ import annotations

import importlib

from eimctl.runtime.errors import EimError

TASKS: dict[str, str] = {"coco": "eimctl.tasks.coco", "scienceqa": "eimctl.tasks.scienceqa",
                         "instruct": "eimctl.tasks.instruct",
                         "mme": "eimctl.tasks.mme"}
TASK_SECTIONS: dict[str, str] = {"scienceqa": "eimctl.tasks.scienceqa_prompts",
                                 "instruct": "eimctl.tasks.instruct_prompts"}


def get_task(name: str, where: str = "data.task"):
    if name not in TASKS:
        raise EimError(f"unknown task '{name}'", where=where, hint=f"known tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


def task_sections() -> dict[str, type]:
    """{section name: dataclass} of the tasks that have options of their own."""
    return {name.replace("-", "_"): importlib.import_module(module).SECTION for name, module in TASK_SECTIONS.items()}


def formatter(task, config):
    """`sample -> (instruction, response)` for `config`: a task with a config section formats by it
    (`task.configured(config)`); any other task by `task.format`."""
    configured = getattr(task, "configured", None)
    return configured(config) if configured is not None else task.format
