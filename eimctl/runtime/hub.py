"""Offline-aware access to the Hugging Face hub (open_clip tags, `hf-hub:` names, LM hub ids).

Before anything is fetched, `hub_online()` decides once per process whether the hub can be reached
(HF_HUB_OFFLINE set, or a ~3 s TCP connect to the configured endpoint fails); when it cannot,
offline mode is switched on so the loaders look only at the local cache and fail at once instead
of retrying for a minute. `quiet_loading()` mutes third-party retry logs and progress bars unless
EIMCTL_VERBOSE=1 (`eimctl --verbose`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 3.0
LOGGERS = ("huggingface_hub", "transformers", "open_clip", "timm", "urllib3", "filelock")
_decided: dict[str, bool] = {}


def verbose() -> bool:
    return os.environ.get("EIMCTL_VERBOSE", "") not in ("", "0")


def _offline_set() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _reachable(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_online() -> bool:
    """Whether the hub can be reached; if not, switch this process to offline mode (cache only)."""
    if "online" not in _decided:
        from huggingface_hub import constants

        _decided["user_offline"] = _offline_set() or bool(constants.HF_HUB_OFFLINE)
        online = not _decided["user_offline"] and _reachable(constants.ENDPOINT)
        if not online:
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True  # read once at import time by huggingface_hub
        _decided["online"] = online
    return _decided["online"]


def offline_reason() -> str:
    """Why nothing can be downloaded, for an error line."""
    if _decided.get("user_offline"):
        return "offline mode is on (HF_HUB_OFFLINE)"
    return "the hub is unreachable"


def short(text: str, limit: int = 160) -> str:
    """The first line of `text`, shortened at a word boundary (never mid-word)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,.:;") + " …"


@contextlib.contextmanager
def quiet_loading():
    """Mute third-party loggers (and the root logger open_clip writes to) and hub progress bars
    while loading, unless EIMCTL_VERBOSE=1; the failure is reported once, by us."""
    if verbose():
        yield
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with contextlib.suppress(Exception):
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    root = logging.getLogger()
    level, null = root.level, logging.NullHandler()
    root.addHandler(null)  # so logging.error() does not install a stderr handler (basicConfig)
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(null)
