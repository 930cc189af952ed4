"""The run-directory contract (docs/architecture.md, "Artifacts").

    runs/<run>/stages/<stage>/{config.yaml, metrics.jsonl, checkpoints/, final/, manifest.json}
    runs/<run>/eval/<stage>-<benchmark>/{predictions.json, metrics.json, manifest.json}

A step reads upstream work only through upstream manifests. `manifest.json` is
written last, and names every output with its size, so a manifest never points
at a missing or partial file.
"""
from __future__ import annotations

import importlib.metadata
import platform
import time
from pathlib import Path

import json

from eimctl.runtime.atomic import write_json
from eimctl.runtime.device import writes_here
from eimctl.runtime.errors import EimError

MANIFEST = "manifest.json"
VERSIONED_PACKAGES = ("eimctl", "torch", "transformers", "open_clip_torch", "safetensors", "pyarrow")


def stage_dir(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "stages" / stage


def eval_dir(run_dir: Path, stage: str, benchmark: str) -> Path:
    return Path(run_dir) / "eval" / f"{stage}-{benchmark}"


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(step_dir: Path) -> dict | None:
    path = Path(step_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EimError("manifest is not valid JSON", where=str(path),
                       hint="the step was not written by eimctl or was edited; rerun it with --force") from None
    if not isinstance(manifest, dict):
        raise EimError("manifest is not a JSON object", where=str(path), hint="rerun the step with --force")
    return manifest


def outputs_intact(step_dir: Path, manifest: dict) -> list[str]:
    """Names of outputs the manifest lists that are missing or have another size."""
    broken = []
    for name, size in manifest.get("outputs", {}).items():
        path = Path(step_dir) / name
        if not path.is_file() or path.stat().st_size != size:
            broken.append(name)
    return broken


def list_outputs(step_dir: Path, names: list[str]) -> dict:
    return {name: (Path(step_dir) / name).stat().st_size for name in names}


def write_manifest(step_dir: Path, *, step: str, config: dict, fingerprints: dict,
                   outputs: list[str], started: float, extra: dict | None = None) -> dict:
    """Write `manifest.json` last, naming every output with its size (only the writing process)."""
    manifest = {
        "status": "complete",
        "step": step,
        "config": config,
        "fingerprints": fingerprints,
        "outputs": list_outputs(step_dir, outputs),
        "versions": package_versions(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 3),
        **(extra or {}),
    }
    if writes_here():
        write_json(Path(step_dir) / MANIFEST, manifest)
    return manifest


def step_status(step_dir: Path) -> tuple[dict | None, str]:
    """(manifest, "") for a complete, intact step, else (None, why not). An unreadable manifest raises."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        return None, "no manifest.json (not finished)"
    if manifest.get("status") != "complete":
        return None, f"status is {manifest.get('status')!r}, not 'complete'"
    broken = outputs_intact(step_dir, manifest)
    if broken:
        return None, f"{', '.join(broken)} missing or partial"
    return manifest, ""


def complete_manifest(step_dir: Path) -> dict | None:
    """The manifest of a complete, intact step, or None."""
    return step_status(step_dir)[0]


def require_upstream(step_dir: Path, label: str, how_to_make: str,
                     fingerprints: dict | None = None, missing: str = "has not been run") -> dict:
    """The manifest of an upstream step, or one clear error saying what is wrong and how to fix it."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        raise EimError(f"{label} {missing}", where=str(step_dir), hint=f"run `{how_to_make}` first")
    if manifest.get("status") != "complete":
        raise EimError(f"{label} is incomplete", where=str(step_dir),
                       hint=f"finish it with `{how_to_make} --resume auto`")
    broken = outputs_intact(step_dir, manifest)
    if broken:
        raise EimError(f"{label} is damaged: {', '.join(broken)} missing or partial", where=str(step_dir),
                       hint=f"rebuild it with `{how_to_make} --force`")
    for key, expected in (fingerprints or {}).items():
        found = manifest.get("fingerprints", {}).get(key)
        if found != expected:
            raise EimError(f"{label} do not match this config: {key} fingerprint {found}, expected {expected}"
                           if label.startswith("key queues") else
                           f"{label} was built from another {key} (fingerprint {found}, expected {expected})",
                           where=str(step_dir),
                           hint=f"rerun `{how_to_make} --force`, or use the config it was built with")
    return manifest


def skip_or_run(step_dir: Path, label: str, fingerprints: dict, *, force: bool,
                on_mismatch: str = "redo") -> str:
    """What to do with a step's folder before running it: 'skip' or 'run'.

    A complete, intact step with the same fingerprints is skipped (unless --force).
    One made from other fingerprints is redone (`on_mismatch="redo"`, for outputs
    that are derived and cheap to replace) or refused (`on_mismatch="refuse"`, so a
    run directory never mixes stages of two configs). Anything else runs.
    """
    manifest = complete_manifest(step_dir)
    if force or manifest is None:
        return "run"
    found = {key: manifest.get("fingerprints", {}).get(key) for key in fingerprints}
    if found == fingerprints:
        return "skip"
    if on_mismatch == "refuse":
        raise EimError(f"{label} in this run directory was built from another config", where=str(step_dir),
                       hint="use a new --run-dir, or --force to overwrite it")
    return "run"
