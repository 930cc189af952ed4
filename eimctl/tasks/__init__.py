"""Tasks: a task reads its data, formats each sample into (instruction, response) and scores predictions.

    TASKS = {"coco": "eimctl.tasks.coco"}     # name -> module; the module's TASK implements tasks/protocol.py

`data.task` picks the task whose reader and prompt format training and the key
queues use; `eimctl evaluate TASK` scores a trained stage with it. Adding a task
is one new module plus one line here.
"""
from __future__ import annotations

import importlib

from eimctl.runtime.errors import EimError

TASKS: dict[str, str] = {"coco": "eimctl.tasks.coco"}


def get_task(name: str, where: str = "data.task"):
    if name not in TASKS:
        raise EimError(f"unknown task '{name}'", where=where, hint=f"known tasks: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK
