"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

    from eimctl.evaluate.caption_metrics import score_captions
    result = score_captions({"42": "a dog runs"}, {"42": ["a dog is running", ...]})
    result["metrics"]["CIDEr"]   # 0-1 scale (CIDEr can exceed 1), as pycocoevalcap returns

Scores follow the coco-caption protocol: every caption is lower-cased and split by
Stanford's PTBTokenizer (a Java process, ~0.5 s per call, so we batch all text
into one call), punctuation is dropped, and the scorers see the tokenized text.

pycocoevalcap quirks handled here:
- `PTBTokenizer` writes its input to a temporary file inside its own package
  folder (site-packages must be writable) and aligns output lines with input
  captions, so any line break inside a caption would shift every later caption;
  we collapse all whitespace first.
- `Bleu.compute_score` prints its statistics unless `verbose=0`.
- `Meteor` keeps a Java process behind a lock; if Java fails mid-call the lock
  stays held and the object's `__del__` deadlocks, so we release it ourselves.
- `Spice()` downloads Stanford CoreNLP (~400 MB) from nlp.stanford.edu when
  `spice/lib/stanford-corenlp-3.6.0.jar` is missing, and writes tmp/cache folders
  into site-packages. We never construct it: we run `spice-1.0.jar` ourselves with
  the user's CoreNLP jars on the class path (the jar's manifest lists its other
  dependencies in `spice/lib/`, which the package ships). We also leave out
  SPICE's `-cache` option: that cache (LMDB + FST serialisation) fails on Java >= 16
  and needs a native library; without it SPICE just re-parses every run.
Neither the tokenizer nor METEOR downloads anything (METEOR's paraphrase table
ships in the wheel).
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from pycocoevalcap.bleu import bleu as _bleu_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.cider.cider_scorer import precook as cider_precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from eimctl.runtime.atomic import write_json
from eimctl.runtime.errors import EimError

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# pycocoevalcap is a namespace package (no __file__), so locate it through a submodule.
SPICE_JAR = Path(_bleu_module.__file__).parent.parent / "spice" / "spice-1.0.jar"


def _tokenize(groups: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    """PTB-tokenize several {id: [captions]} dicts with a single Java call.

    The tokenizer's dict keys are only used on the Python side, so (group, id)
    tuples let unrelated dicts share one call.
    """
    merged = {
        (group, key): [{"caption": " ".join(caption.split())} for caption in captions]
        for group, by_id in groups.items()
        for key, captions in by_id.items()
    }
    if merged and shutil.which("java") is None:
        raise EimError("java not found", "caption metrics",
                       "install a Java runtime (8 or newer): pycocoevalcap's tokenizer and METEOR run on it")
    tokenized = PTBTokenizer().tokenize(merged) if merged else {}
    result: dict[str, dict[str, list[str]]] = {group: {} for group in groups}
    for group, by_id in groups.items():
        for key, captions in by_id.items():
            # An empty caption list never reaches the tokenizer, so it has no entry there.
            result[group][key] = tokenized.get((group, key), [])
            if len(result[group][key]) != len(captions):  # output lines out of step with input captions
                raise EimError(f"PTBTokenizer returned {len(result[group][key])} line(s) for the "
                               f"{len(captions)} caption(s) of {key!r}", "caption metrics",
                               "report this caption text as a bug")
    return result


def _check_inputs(predictions: dict[str, str], references: dict[str, list[str]]) -> None:
    if not predictions:
        raise EimError("no predictions to score", "score_captions", "generate captions for at least one image")
    missing = sorted(set(references) - set(predictions))
    extra = sorted(set(predictions) - set(references))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) have references but no prediction (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} prediction(s) have no references (e.g. {extra[:3]})")
        raise EimError("predictions and references cover different images: " + "; ".join(parts),
                       "score_captions", "score the same image ids on both sides")
    empty = sorted(key for key, refs in references.items() if not refs)
    if empty:
        raise EimError(f"{len(empty)} image(s) have no reference captions (e.g. {empty[:3]})",
                       "score_captions", "drop those images or add their references")


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    # METEOR's line protocol uses ' ||| ' as a separator, so it must not appear in the text.
    gts = {key: [ref.replace("|||", "") for ref in refs] for key, refs in gts.items()}
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    finally:
        if meteor.lock.locked():  # compute_score failed between acquire() and release()
            meteor.lock.release()
        del meteor  # __del__ stops the Java process
    return float(score)


def _spice_unavailable_reason(spice_jars: Path | None) -> str | None:
    if spice_jars is None:
        return "Stanford CoreNLP 3.6.0 jars not given; pass --spice-jars DIR"
    spice_jars = Path(spice_jars)
    if not spice_jars.is_dir():
        return f"--spice-jars {spice_jars} is not a directory"
    missing = [name for name in CORENLP_JARS if not (spice_jars / name).is_file()]
    if missing:
        return f"--spice-jars {spice_jars} lacks {', '.join(missing)} (from stanford-corenlp-full-2015-12-09)"
    if not SPICE_JAR.is_file():
        return f"pycocoevalcap has no {SPICE_JAR}"
    return None


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]], spice_jars: Path) -> tuple[float | None, str | None]:
    """Run SPICE on tokenized captions; returns (score, None) or (None, why it failed)."""
    class_path = ":".join([str(SPICE_JAR)] + [str(Path(spice_jars).resolve() / name) for name in CORENLP_JARS])
    with tempfile.TemporaryDirectory(prefix="eimctl-spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_file.write_text(json.dumps(
            [{"image_id": key, "test": res[key][0], "refs": gts[key]} for key in sorted(gts)]))
        command = ["java", "-Xmx8G", "-cp", class_path, "edu.anu.spice.SpiceScorer",
                   str(in_file), "-out", str(out_file), "-subset", "-silent"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0 or not out_file.is_file():
            # A Java stack trace: its first line names the exception, the rest are frames.
            lines = [line.strip() for line in completed.stderr.splitlines() if line.strip()]
            cause = next((line for line in lines if "Exception" in line or "Error" in line),
                         lines[-1] if lines else "no output")
            return None, f"SPICE failed (exit {completed.returncode}): {cause}"
        results = json.loads(out_file.read_text())

    def as_float(value) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    # Like pycocoevalcap: the mean over images of the 'All' F-score (NaN propagates).
    scores = [as_float(item["scores"]["All"]["f"]) for item in results]
    return (sum(scores) / len(scores) if scores else None), None


def score_captions(predictions: dict[str, str], references: dict[str, list[str]], *,
                   spice_jars: Path | None = None) -> dict:
    """Score one predicted caption per image against its reference captions.

    Returns {"metrics": {name: float | None}, "unavailable": {name: reason}, "n_images": int}.
    """
    _check_inputs(predictions, references)
    tokenized = _tokenize({"gts": references, "res": {key: [text] for key, text in predictions.items()}})
    gts, res = tokenized["gts"], tokenized["res"]

    metrics: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        metrics[f"Bleu_{n}"] = float(value)
    metrics["METEOR"] = _meteor(gts, res)
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])

    unavailable: dict[str, str] = {}
    reason = _spice_unavailable_reason(spice_jars)
    spice_score = None
    if reason is None:
        spice_score, reason = _spice(gts, res, Path(spice_jars))
    metrics["SPICE"] = spice_score
    if reason is not None:
        unavailable["SPICE"] = reason
    return {"metrics": metrics, "unavailable": unavailable, "n_images": len(predictions)}


class _FixedCaptionCider:
    """CIDEr of one caption predicted for every image, for many candidate captions.

    `Cider().compute_score` rebuilds document frequencies and every reference's
    tf-idf vector on each call (~0.2 s for 300 images), too slow for hundreds of
    candidates. The references are fixed here, so we build those once with
    pycocoevalcap's own `CiderScorer` (same n-gram counting, same document
    frequencies) and redo only `compute_cider`'s arithmetic, vectorised over
    references. `tests/test_caption_metrics.py` checks it against `Cider`.
    """

    def __init__(self, gts: dict[str, list[str]], n: int = 4, sigma: float = 6.0):
        scorer = CiderScorer(n=n, sigma=sigma)
        keys = list(gts)
        for key in keys:
            scorer += (None, gts[key])
        scorer.compute_doc_freq()
        self.n, self.sigma = n, sigma
        self.document_frequency = scorer.document_frequency
        self.log_images = np.log(float(len(keys)))
        refs = [ref for cooked in scorer.crefs for ref in cooked]
        self.image_of_ref = np.repeat(np.arange(len(keys)), [len(cooked) for cooked in scorer.crefs])
        self.refs_per_image = np.array([len(cooked) for cooked in scorer.crefs], dtype=float)
        self.ref_norm = np.zeros((len(refs), n))
        self.ref_length = np.zeros(len(refs))
        postings: dict[tuple, tuple[list[int], list[float]]] = {}
        for index, counts in enumerate(refs):
            vector, norm, length = self._tfidf(counts)
            self.ref_norm[index], self.ref_length[index] = norm, length
            for ngram, weight in vector.items():
                rows, weights = postings.setdefault(ngram, ([], []))
                rows.append(index)
                weights.append(weight)
        # n-gram -> (reference rows containing it, their tf-idf weights)
        self.postings = {ngram: (np.array(rows), np.array(weights)) for ngram, (rows, weights) in postings.items()}

    def _tfidf(self, counts: dict[tuple, int]) -> tuple[dict[tuple, float], np.ndarray, int]:
        vector, norm, length = {}, np.zeros(self.n), 0
        for ngram, term_freq in counts.items():
            weight = float(term_freq) * (self.log_images - np.log(max(1.0, self.document_frequency.get(ngram, 0.0))))
            vector[ngram] = weight
            norm[len(ngram) - 1] += weight ** 2
            if len(ngram) == 2:  # pycocoevalcap's "length" counts bigrams (its n == 1); kept for equal scores
                length += term_freq
        return vector, np.sqrt(norm), length

    def score(self, caption: str) -> float:
        vector, norm, length = self._tfidf(cider_precook(caption, self.n))
        overlap = np.zeros_like(self.ref_norm)  # sum over shared n-grams of min(h, r) * r
        for ngram, weight in vector.items():
            if ngram in self.postings:
                rows, ref_weights = self.postings[ngram]
                overlap[rows, len(ngram) - 1] += np.minimum(weight, ref_weights) * ref_weights
        denominator = norm[None, :] * self.ref_norm
        cosine = np.divide(overlap, denominator, out=np.zeros_like(overlap), where=denominator != 0)
        penalty = np.exp(-((length - self.ref_length) ** 2) / (2 * self.sigma ** 2))
        per_ref = (cosine * penalty[:, None]).mean(axis=1)
        per_image = 10.0 * np.bincount(self.image_of_ref, weights=per_ref) / self.refs_per_image
        return float(per_image.mean())


def best_fixed_caption(candidates: list[str], references: dict[str, list[str]], metric: str) -> tuple[str, float]:
    """The single caption that scores highest when predicted for every image.

    A floor for captioning results: a model must beat "say the same thing for
    every image". All text is tokenized in one Java call; references are cooked
    once and each candidate is scored against them (BLEU through pycocoevalcap's
    `BleuScorer.retest`, CIDEr through `_FixedCaptionCider`). Ties go to the
    earlier candidate.
    """
    if metric not in ("Bleu_4", "CIDEr"):
        raise EimError(f"unsupported metric {metric!r} for the fixed-caption baseline", "best_fixed_caption",
                       "use Bleu_4 or CIDEr")
    if not candidates:
        raise EimError("no candidate captions", "best_fixed_caption", "pass at least one candidate")
    if not references or any(not refs for refs in references.values()):
        raise EimError("every image needs at least one reference caption", "best_fixed_caption")
    tokenized = _tokenize({"gts": references, "candidates": {str(i): [c] for i, c in enumerate(candidates)}})
    gts = tokenized["gts"]

    if metric == "Bleu_4":
        bleu = BleuScorer(n=4)
        for key in gts:
            bleu += (None, gts[key])

        def score_of(tokens: str) -> float:
            # 'closest' reference length, as Bleu.compute_score uses.
            return float(bleu.retest([tokens] * len(gts)).compute_score(option="closest")[0][3])
    else:
        score_of = _FixedCaptionCider(gts).score

    best_caption, best_score = candidates[0], -math.inf
    scored: dict[str, float] = {}  # several raw captions can tokenize to the same text
    for index, caption in enumerate(candidates):
        tokens = tokenized["candidates"][str(index)][0]
        if tokens not in scored:
            scored[tokens] = score_of(tokens)
        if scored[tokens] > best_score:
            best_caption, best_score = caption, scored[tokens]
    return best_caption, best_score


def write_coco_results(path: str | Path, predictions: dict[str, str]) -> None:
    """Write predictions in the COCO results format [{"image_id", "caption"}], atomically.

    COCO image ids are integers; ids that are all digits are written as ints so the
    file loads with pycocotools, anything else stays a string.
    """
    def image_id(key: str) -> int | str:
        key = str(key)
        return int(key) if key.isascii() and key.isdigit() else key

    write_json(path, [{"image_id": image_id(key), "caption": caption} for key, caption in predictions.items()])
