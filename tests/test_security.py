"""Nothing in the package can run code hidden in a data, weights or config file."""
import re
from pathlib import Path

import eimctl

PACKAGE = Path(eimctl.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _calls(pattern: str) -> list[str]:
    """`file:line: text` for every source line matching `pattern` (comments ignored)."""
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    return found


def test_sources_were_found():
    assert len(SOURCES) > 20


def test_no_pickle():
    assert _calls(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|allow_pickle\s*=\s*True") == []


def test_torch_load_only_with_weights_only():
    loads = _calls(r"torch\.load\(")
    assert loads, "the trainer state is loaded with torch.load"
    assert [line for line in loads if "weights_only=True" not in line] == []


def test_yaml_safe_load_only():
    assert _calls(r"yaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.Loader\b|yaml\.UnsafeLoader") == []
    assert _calls(r"yaml\.safe_load\(")


def test_remote_code_only_from_config():
    # every place that sets trust_remote_code takes it from model.lm.trust_remote_code (default false)
    sets = [u for u in _calls(r"\btrust_remote_code['\"]?\s*[:=]")
            if not re.search(r"trust_remote_code: bool = False", u) and "model.lm.trust_remote_code=true" not in u]
    assert sets and all(re.search(r"[:=]\s*cfg\.trust_remote_code\b", u) for u in sets), sets
    assert _calls(r"trust_remote_code['\"]?\s*[:=]\s*True") == []


def test_no_eval_or_exec():
    assert _calls(r"(?<![\w.])(eval|exec)\(") == []


def test_image_paths_confined_unless_allowed(tmp_path):
    from eimctl.config import DataConfig
    from eimctl.data.images import resolve_image
    import pytest
    from eimctl.runtime.errors import EimError

    assert DataConfig().allow_outside_root is False
    for escape in ("../x.png", "/etc/hostname", "a/../../x.png"):
        with pytest.raises(EimError, match="escapes the data root"):
            resolve_image(tmp_path / "root", escape)
    (tmp_path / "root").mkdir()
    (tmp_path / "root/link").symlink_to(tmp_path)
    with pytest.raises(EimError, match="escapes the data root"):   # a symlink out of the root is refused too
        resolve_image(tmp_path / "root", "link/x.png")
