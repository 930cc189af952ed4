"""`eimctl chat`: talk to a trained stage, with or without an image.

    eimctl chat --run-dir runs/demo --stage base                                  # interactive, streamed
    eimctl chat --run-dir runs/demo --stage base --image cat.png --instruction "What is this?"
    eimctl chat --run-dir runs/demo --stage base --batch questions.jsonl --out answers.jsonl

The stage's model is rebuilt from its manifest by `eimctl evaluate`'s loader, which the CLI passes in
(`load_trained(run_dir, stage, overrides, force=)`: only the CLI imports a step; a stage trained without
loss_base is refused unless --force). Each instruction is wrapped in the family's instruction template
(`instruction_prompt`); an image is preprocessed by the stage's CLIP and encoded, a text-only turn passes
zero features with has_image=False. Decoding is greedy unless a temperature > 0 is given (then top-p
sampling from a seeded generator: the same seed gives the same answers). Interactive and one-shot answers
are streamed token by token; a batch file is answered in batches of eval.batch_size, one JSON line each.
"""
from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from eimctl.data.images import load_image
from eimctl.runtime.atomic import write_text
from eimctl.runtime.device import resolve_device
from eimctl.runtime.errors import EimError

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
HELP = "empty line or Ctrl-D quits; /image PATH switches the image, /noimage drops it"


@dataclass
class Decoding:
    max_new_tokens: int = 128
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 0.9           # nucleus of the sampling (temperature > 0)
    seed: int = 0                # seeds the sampling generator

    def check(self) -> None:
        problems = [text for bad, text in ((self.max_new_tokens < 1, "--max-new-tokens must be >= 1"),
                                           (self.temperature < 0, "--temperature must be >= 0"),
                                           (not 0 < self.top_p <= 1, "--top-p must be in (0, 1]")) if bad]
        if problems:
            raise EimError("; ".join(problems), where="eimctl chat",
                           hint="e.g. --temperature 0.7 --top-p 0.9 --max-new-tokens 128")


def instruction_prompt(family: str, instruction: str) -> str:
    """The text the model continues: LaVIN's instruction template for lavin ("Instruction: {q}\\nResponse:",
    as its chatbot and MME code build it), Stanford Alpaca's no-input template otherwise (llama-adapter)."""
    if family == "lavin":
        return ("Instruction: " + instruction + "\n" + "Response: ").replace("  ", " ").strip()
    return ALPACA_NO_INPUT.format(instruction=instruction)


@dataclass
class Turn:
    instruction: str
    image: str | None = None       # as given (batch file: relative to the file's folder)
    path: Path | None = None       # resolved image file
    where: str = "eimctl chat"     # where an image problem is reported (file:line for a batch file)


def read_image(path: Path, where: str):
    """The image as RGB, or one EimError naming `where` (a batch file's line, or the --image option)."""
    try:
        return load_image(path.parent, path.name)
    except EimError as error:
        raise EimError(error.what, where=where, hint="check the image path (a batch file's paths are relative to "
                                                     "its folder)") from None


class Chat:
    """A trained stage ready to answer: the model on its device, its template, a seeded sampler."""

    def __init__(self, load_trained: Callable, run_dir: Path, stage: str, decoding: Decoding, *, force: bool = False):
        decoding.check()
        config, self.model, _ = load_trained(run_dir, stage, None, force=force)
        self.family, self.decoding, self.batch_size = config.model.family, decoding, config.eval.batch_size
        if "has_image" not in inspect.signature(self.model.generate).parameters:
            raise EimError(f"stage '{stage}' is a {self.family} model, which generates from the image alone and "
                           "cannot take instructions", where="model.family",
                           hint="chat with a stage of an instruction-following family (lavin, llama-adapter)")
        self.device = resolve_device(config.train.device)
        self.model.to(self.device)
        self.generator = torch.Generator().manual_seed(decoding.seed)

    def _visual(self, turns: list[Turn]) -> tuple[torch.Tensor, torch.Tensor]:
        """ST output [B, ...] and has_image [B]: the encoded image, or zero features for a text-only turn."""
        clip = self.model.clip
        features = torch.zeros(len(turns), clip.num_tokens, clip.feature_dim, device=self.device)
        rows = [row for row, turn in enumerate(turns) if turn.path is not None]
        if rows:
            pixels = torch.stack([clip.preprocess(read_image(turns[row].path, turns[row].where)) for row in rows])
            encoded = self.model.encode_images(pixels.to(self.device))
            features = features.to(encoded.dtype)
            features[rows] = encoded
        has_image = torch.zeros(len(turns), dtype=torch.bool, device=self.device)
        has_image[rows] = True
        return self.model.project(features), has_image

    def respond(self, turns: list[Turn], on_token: Callable[[int, int], None] | None = None) -> list[str]:
        """One answer per turn, decoded together; `on_token(row, token_id)` sees each token as it comes."""
        tokenizer, decoding = self.model.tokenizer, self.decoding
        prompts = tokenizer([instruction_prompt(self.family, turn.instruction) for turn in turns],
                            add_special_tokens=False)["input_ids"]
        sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p, "generator": self.generator,
                    "on_token": on_token}
        with torch.inference_mode():
            visual, has_image = self._visual(turns)
            ids = self.model.generate(visual, [list(p) for p in prompts], max_new_tokens=decoding.max_new_tokens,
                                      beam_size=1, has_image=has_image, sampling=sampling)
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


class Stream:
    """Prints one answer as its tokens arrive: the decoded text so far, minus what is already shown (held
    back while it ends in whitespace or a partial character), so the printed text is the final answer."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write, self.ids, self.shown = tokenizer, write, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if not text.endswith("\ufffd"):
            self._show(text)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text

    def finish(self, answer: str) -> None:
        self._show(answer)
        self.write("\n")


def _say(text: str) -> None:
    print(text, end="", flush=True)


def answer_streamed(chat: Chat, turn: Turn, write: Callable[[str], None] = _say) -> str:
    stream = Stream(chat.model.tokenizer, write)
    answer = chat.respond([turn], on_token=stream)[0]
    stream.finish(answer)
    return answer


def read_batch(path: Path) -> list[Turn]:
    """The turns of a JSONL file: {"instruction": str, "image": optional path relative to the file's folder};
    the first bad line is one EimError naming file:line."""
    if not path.is_file():
        raise EimError("batch file not found", where=str(path), hint="pass a JSONL file to --batch")
    turns = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            turns.append(_batch_turn(line, path, number))
    if not turns:
        raise EimError("batch file holds no instructions", where=str(path),
                       hint='one JSON object a line: {"instruction": "...", "image": "optional/path.png"}')
    return turns


def _batch_turn(line: str, path: Path, number: int) -> Turn:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise EimError(f"not JSON ({error.msg})", where=where, hint='write {"instruction": "...", "image": ...}') \
            from None
    if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        raise EimError("each line needs a non-empty string \"instruction\"", where=where,
                       hint='write {"instruction": "...", "image": "optional/path.png"}')
    image = row.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise EimError("\"image\" must be a path (a string) or null", where=where,
                       hint="paths are relative to the batch file's folder")
    resolved = (path.parent / image) if image else None
    if resolved is not None and not resolved.is_file():
        raise EimError(f"image not found: {image}", where=where, hint="paths are relative to the batch file's folder")
    return Turn(row["instruction"], image, resolved, where)


def answer_batch(chat: Chat, turns: list[Turn], out: Path | None, write: Callable[[str], None] = _say) -> None:
    """One JSON line {"instruction", "image", "response"} per turn, to `out` (atomically) or through `write`."""
    lines = []
    for start in range(0, len(turns), chat.batch_size):
        chunk = turns[start:start + chat.batch_size]
        for turn, response in zip(chunk, chat.respond(chunk)):
            line = json.dumps({"instruction": turn.instruction, "image": turn.image, "response": response},
                              ensure_ascii=False) + "\n"
            lines.append(line)
            if out is None:
                write(line)
    if out is not None:
        write_text(out, "".join(lines))


def _image_turn(image: Path | None, where: str = "--image") -> Path | None:
    if image is not None and not Path(image).is_file():
        raise EimError(f"image not found: {image}", where=where, hint="check the path")
    return Path(image) if image is not None else None


def converse(chat: Chat, image: Path | None, read_line: Callable[[], str], write: Callable[[str], None] = _say,
             warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)) -> None:
    """The interactive loop: read an instruction, stream the answer, until an empty line or end of input."""
    write(f"chatting with a {chat.family} stage — {HELP}\n")
    while True:
        write(f"[{image.name if image else 'no image'}] > ")
        line = read_line()
        text = line.strip()
        if not text:
            write("\n" if not line else "")
            return
        if text == "/noimage":
            image = None
        elif text == "/image" or text.startswith("/image "):
            try:
                chosen = _image_turn(Path(text[len("/image"):].strip() or "."), where="/image")
                read_image(chosen, "/image")   # a corrupt file is refused now, keeping the current image
                image = chosen
            except EimError as error:
                warn(f"Error: {error.line()}")
        elif text.startswith("/"):
            warn(f"unknown command {text.split()[0]} — {HELP}")
        else:
            answer_streamed(chat, Turn(text, str(image) if image else None, image, "/image"), write)


def chat(load_trained: Callable, run_dir: Path, stage: str, decoding: Decoding, *, instruction: str | None = None,
         image: Path | None = None, batch: Path | None = None, out: Path | None = None, force: bool = False,
         read_line: Callable[[], str] | None = None) -> None:
    """Interactive (no instruction, no batch), one-shot (`instruction`) or batch (`batch` JSONL -> `out`);
    `load_trained` rebuilds the stage's model (eimctl/steps/evaluate.py's)."""
    if batch is not None and (instruction is not None or image is not None):
        raise EimError("--batch takes its instructions and images from the file", where="eimctl chat",
                       hint="drop --instruction and --image, or drop --batch")
    if out is not None and batch is None:
        raise EimError("--out goes with --batch", where="eimctl chat", hint="pass --batch FILE.jsonl")
    turns = read_batch(Path(batch)) if batch is not None else None
    path = _image_turn(image)
    session = Chat(load_trained, run_dir, stage, decoding, force=force)
    if turns is not None:
        answer_batch(session, turns, Path(out) if out is not None else None)
    elif instruction is not None:
        answer_streamed(session, Turn(instruction, str(image) if image else None, path, "--image"))
    else:
        converse(session, path, read_line or (lambda: sys.stdin.readline()))
