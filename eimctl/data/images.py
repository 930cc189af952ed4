"""Image loading, confined to the data root unless explicitly allowed."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from eimctl.runtime.errors import EimError


def resolve_image(root: Path, relative: str, allow_outside_root: bool = False) -> Path:
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not allow_outside_root and not path.is_relative_to(root):
        raise EimError(f"image path escapes the data root: {relative}", where=str(root),
                       hint="keep images under data.image_root, or set data.allow_outside_root=true")
    return path


def load_image(root: Path, relative: str, allow_outside_root: bool = False) -> Image.Image:
    path = resolve_image(root, relative, allow_outside_root)
    if not path.is_file():
        raise EimError(f"image not found: {relative}", where=str(path),
                       hint="check data.image_root, or remove the sample")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except PermissionError:
        raise EimError(f"image not readable: {relative}", where=str(path), hint="fix the file's permissions") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise EimError(f"corrupt image: {relative}", where=str(path),
                       hint="replace the file or remove the sample") from None
