"""Chat transcripts for the report: each run's `chat/<stage>.jsonl` (written by `eimctl chat --batch`)."""
from __future__ import annotations

import json
from pathlib import Path


def transcripts_section(run_dirs: list[Path], limit: int = 6) -> list[str]:
    """Markdown lines: up to `limit` exchanges per transcript file, instruction, image and response."""
    lines = []
    for run_dir in run_dirs:
        for path in sorted((Path(run_dir) / "chat").glob("*.jsonl")):
            lines += [f"### {Path(run_dir).name} / {path.stem}", ""]
            for number, text in enumerate(path.read_text(encoding="utf-8").splitlines()[:limit], start=1):
                try:
                    turn = json.loads(text)
                except json.JSONDecodeError:
                    lines.append(f"- line {number}: unreadable")
                    continue
                image = f" (image `{Path(turn['image']).name}`)" if turn.get("image") else " (no image)"
                lines.append(f"- **{_one_line(turn.get('instruction', ''))}**{image} → "
                             f"{_one_line(turn.get('response', ''))}")
            lines.append("")
    return ["## Chat transcripts", "", *lines] if lines else []


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")
