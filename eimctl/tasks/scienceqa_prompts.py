"""ScienceQA prompt formats: a problem as (instruction, response), the LaVIN way or the upstream ScienceQA way.

    format_problem(sample, "QCM-ALE", "lavin", use_caption=False)
    -> ("Question: ...\\nContext: N/A\\nOptions: (A) ... (B) ...\\nResponse:",
        "The answer is A. BECAUSE: {lecture} {solution}")

A format is INPUT-OUTPUT. The input letters give the lines in order: Q "Question: {question}",
C "Context: {context}", M "Options: (A) c0 (B) c1 ...", and a run of L (lecture) / E (solution)
becomes one "BECAUSE: {lecture} {solution}" line (the upstream QCML, QCME, QCMLE, QCLM, QCEM and
QCLEM inputs; any order of the letters works). The outputs are upstream's table, A, AL, AE, ALE,
AEL, LA, EA, LEA, ELA, including its quirk: AL gives the *solution* and AE the *lecture* after
"BECAUSE:".

Common to both templates: the context is `hint + " " + caption` (the caption only with
`use_caption`), stripped, or "N/A" when empty; lecture and solution have each newline replaced by
the two characters backslash-n; double spaces are replaced once (`str.replace("  ", " ")`) and
the text is stripped.

- `lavin` (LaVIN's util/base_prompt.py, what LaVIN trains on): the instruction ends with
  "Response:" and the response is the output; the LM sees them concatenated with no separator.
  LaVIN means to drop a trailing "BECAUSE:" (empty lecture and solution) but assigns the result
  to an unused variable, so its responses keep it ("The answer is B. BECAUSE:"). That is
  reproduced by default; `keep_empty_because=False` drops it as intended.
- `scienceqa` (upstream ScienceQA's models/base_prompt.py, used by GPT-3 and LLaMA-Adapter): the
  instruction is the test prompt, ending with "Answer:", and the response is the rest of the
  training example, so `instruction + response` is exactly upstream's example text "...\\nAnswer:
  The answer is A. BECAUSE: ..." (the response starts with a space). A trailing "BECAUSE:" is
  removed, as upstream does; upstream removes every "BECAUSE:" of the example in that case, which
  differs from this only for input formats that have a BECAUSE: line of their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from eimctl.evaluate.scienceqa_scoring import PARSE_MODES
from eimctl.runtime.errors import EimError

OPTIONS = ("A", "B", "C", "D", "E")
INPUT_FORMATS = ("CQM", "QCM", "QCML", "QCME", "QCMLE", "QCLM", "QCEM", "QCLEM")  # upstream's named inputs
# output format -> (texts before "The answer is X.", texts after "BECAUSE:"), as upstream's table has them
OUTPUT_FORMATS = {
    "A": ((), ()),
    "AL": ((), ("solution",)),   # sic (upstream): AL puts the solution after BECAUSE:
    "AE": ((), ("lecture",)),    # sic (upstream): AE puts the lecture after BECAUSE:
    "ALE": ((), ("lecture", "solution")),
    "AEL": ((), ("solution", "lecture")),
    "LA": (("lecture",), ()),
    "EA": (("solution",), ()),
    "LEA": (("lecture", "solution"), ()),
    "ELA": (("solution", "lecture"), ()),
}
TEMPLATES = ("lavin", "scienceqa")
PROMPT_FORMATS = frozenset(f"{i}-{o}" for i in INPUT_FORMATS for o in OUTPUT_FORMATS)


@dataclass
class ScienceQAConfig:
    """Config section `scienceqa`: how problems become text and generated text becomes an answer."""
    prompt_format: str = "QCM-ALE"   # INPUT-OUTPUT: QCM-ALE (LaVIN, EIM), QCM-A, CQM-A, QCM-LEA, ...
    template: str = "lavin"          # lavin (input ends "Response:") | scienceqa (upstream, ends "Answer:")
    parse: str = "official"          # official (exactly one "The answer is X." match) | lavin (the first match)
    parse_seed: int = 10             # seed of the random index given to an unparsable answer (upstream default)
    use_caption: bool = False        # append captions.json's caption to the context (LaVIN never does)

    CHOICES: ClassVar[dict] = {"prompt_format": PROMPT_FORMATS, "template": set(TEMPLATES),
                               "parse": set(PARSE_MODES)}


SECTION = ScienceQAConfig


def parse_format(prompt_format: str) -> tuple[str, str]:
    """(input letters, output format) of e.g. "QCM-ALE"; an unknown format is one EimError."""
    letters, _, output = prompt_format.partition("-")
    valid_input = sorted(letters.replace("L", "").replace("E", "")) == ["C", "M", "Q"] \
        and len(set(letters)) == len(letters) and set(letters) <= set("QCMLE")
    if not valid_input or output not in OUTPUT_FORMATS:
        raise EimError(f"unknown ScienceQA prompt format '{prompt_format}'", where="scienceqa.prompt_format",
                       hint=f"write INPUT-OUTPUT, e.g. QCM-ALE; inputs {', '.join(INPUT_FORMATS)}; "
                            f"outputs {', '.join(OUTPUT_FORMATS)}")
    return letters, output


def context_text(sample, use_caption: bool) -> str:
    context = " ".join([sample.hint, sample.caption if use_caption else ""]).strip()
    return context or "N/A"


def choice_text(choices) -> str:
    return " ".join(f"({OPTIONS[i]}) {choice}" for i, choice in enumerate(choices))


def escape_newlines(text: str) -> str:
    """A newline becomes the two characters backslash-n (upstream's lecture and solution)."""
    return text.replace("\n", "\\n")


def input_text(letters: str, texts: dict[str, str]) -> str:
    """The input lines, each ending with a newline; a run of L/E letters is one BECAUSE: line."""
    heads = {"Q": "Question: {Q}", "C": "Context: {C}", "M": "Options: {M}"}
    lines: list[str] = []
    because: list[str] = []
    for letter in letters + "$":   # "$" flushes a BECAUSE: run at the end
        if letter in "LE":
            because.append(texts[letter])
            continue
        if because:
            lines.append("BECAUSE: " + " ".join(because))
            because = []
        if letter != "$":
            lines.append(heads[letter].format(**texts))
    return "".join(line + "\n" for line in lines)


def output_text(output_format: str, letter: str, texts: dict[str, str]) -> str:
    before, after = OUTPUT_FORMATS[output_format]
    names = {"lecture": "L", "solution": "E"}
    text = " ".join([*(texts[names[part]] for part in before), f"The answer is {letter}."])
    if after:
        text += " BECAUSE: " + " ".join(texts[names[part]] for part in after)
    return text


def _clean(text: str) -> str:
    return text.replace("  ", " ").strip()


def format_problem(sample, prompt_format: str = "QCM-ALE", template: str = "lavin", use_caption: bool = False,
                   *, keep_empty_because: bool = True) -> tuple[str, str]:
    """(instruction, response) of a ScienceQA sample (see the module's docstring for both templates)."""
    letters, output_format = parse_format(prompt_format)
    if template not in TEMPLATES:
        raise EimError(f"unknown ScienceQA template '{template}'", where="scienceqa.template",
                       hint=f"one of {', '.join(TEMPLATES)}")
    texts = {"Q": sample.question, "C": context_text(sample, use_caption), "M": choice_text(sample.choices),
             "L": escape_newlines(sample.lecture), "E": escape_newlines(sample.solution)}
    body = input_text(letters, texts)
    output = output_text(output_format, OPTIONS[sample.answer], texts)
    if template == "lavin":
        response = _clean(output)
        if not keep_empty_because and response.endswith("BECAUSE:"):
            response = response.replace("BECAUSE:", "").strip()
        return _clean(body + "Response:"), response
    instruction = _clean(body + "Answer:")
    text = _clean(body + "Answer: " + output)
    response = text[len(instruction):]
    if text.endswith("BECAUSE:"):
        response = response.replace("BECAUSE:", "").rstrip()
    return instruction, response
