"""Caption metrics (eimctl.evaluate.caption_metrics) on cases small enough to score by hand.

Java is slow to start (PTBTokenizer ~0.5 s, METEOR ~10 s on 2 cores), so only
one test runs METEOR; the others stub it out or avoid Java entirely.
"""
from __future__ import annotations

import json
import math
import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from eimctl.runtime.errors import EimError
from eimctl.evaluate import caption_metrics
from eimctl.evaluate.caption_metrics import (_FixedCaptionCider, _spice_unavailable_reason, best_fixed_caption,
                                             score_captions, write_coco_results)


def test_identical_captions_score_perfectly():
    # Case, punctuation and a stray line break are removed by the PTB tokenizer; a
    # line break left in would also shift every later caption by one line.
    predictions = {"1": "A man rides a red\r\nbicycle.", "2": "Two dogs play in the snow!"}
    references = {"1": ["a man rides a red bicycle", "A man rides a red bicycle ."],
                  "2": ["two dogs play in the snow"]}
    result = score_captions(predictions, references)
    metrics = result["metrics"]
    for n in range(1, 5):
        assert metrics[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ROUGE_L"] == pytest.approx(1.0, abs=1e-9)
    # Each image: cosine 1 for every n-gram order, no length penalty, times 10.
    assert metrics["CIDEr"] == pytest.approx(10.0, abs=1e-9)
    assert metrics["SPICE"] is None
    assert "--spice-jars" in result["unavailable"]["SPICE"]
    assert result["n_images"] == 2
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}


def test_hand_computed_bleu_rouge_cider(monkeypatch):
    monkeypatch.setattr(caption_metrics, "_meteor", lambda gts, res: -1.0)  # skip the 10 s METEOR start
    predictions = {"a": "A dog runs on the grass.", "b": "two birds fly"}
    references = {"a": ["a dog runs on the grass"], "b": ["a cat is sleeping"]}
    metrics = score_captions(predictions, references)["metrics"]
    # Unigrams: image a matches 6 of 6, image b 0 of 3 -> 6/9. Bigrams: 5 of 5 and 0 of 2 -> 5/7.
    # Brevity penalty: candidate length 9, closest reference lengths 6 + 4 = 10 -> exp(1 - 10/9).
    brevity = math.exp(1 - 10 / 9)
    assert metrics["Bleu_1"] == pytest.approx(6 / 9 * brevity, rel=1e-6)
    assert metrics["Bleu_2"] == pytest.approx(math.sqrt(6 / 9 * 5 / 7) * brevity, rel=1e-6)
    # ROUGE-L: LCS covers all of image a, nothing of image b.
    assert metrics["ROUGE_L"] == pytest.approx(0.5, abs=1e-9)
    # CIDEr: image a identical (10), image b shares no n-gram (0).
    assert metrics["CIDEr"] == pytest.approx(5.0, abs=1e-9)
    assert metrics["METEOR"] == -1.0


def test_key_mismatch_and_empty_references_raise():
    with pytest.raises(EimError, match="different images") as error:
        score_captions({"1": "a cat", "3": "a dog"}, {"1": ["a cat"], "2": ["a dog"]})
    assert "'2'" in error.value.what and "'3'" in error.value.what
    with pytest.raises(EimError, match="no reference captions"):
        score_captions({"1": "a cat"}, {"1": []})
    with pytest.raises(EimError, match="no predictions"):
        score_captions({}, {})


def test_spice_needs_both_corenlp_jars(tmp_path):
    assert "not given" in _spice_unavailable_reason(None)
    assert "not a directory" in _spice_unavailable_reason(tmp_path / "missing")
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    reason = _spice_unavailable_reason(tmp_path)
    assert "stanford-corenlp-3.6.0-models.jar" in reason and "stanford-corenlp-3.6.0.jar," not in reason
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert _spice_unavailable_reason(tmp_path) is None


def test_best_fixed_caption_picks_the_obvious_candidate():
    # Already lower-case and unpunctuated, so tokenization leaves the text unchanged.
    references = {
        "1": ["a man riding a horse", "a man on a horse at the beach"],
        "2": ["a man riding a horse", "a horse with a rider in a field"],
        "3": ["a bowl of fruit", "fruit in a bowl on a table"],
    }
    candidates = ["zebra", "a bowl of fruit", "A man riding a horse.", "a man riding a horse"]
    caption, score = best_fixed_caption(candidates, references, "Bleu_4")
    # Ties keep the earlier candidate: both spellings tokenize to the same text.
    assert caption == "A man riding a horse."
    fixed = {key: ["a man riding a horse"] for key in references}
    assert score == pytest.approx(Bleu(4).compute_score(references, fixed, verbose=0)[0][3], abs=1e-12)

    caption, score = best_fixed_caption(candidates, references, "CIDEr")
    assert caption == "A man riding a horse."
    assert score == pytest.approx(Cider().compute_score(references, fixed)[0], abs=1e-9)
    with pytest.raises(EimError, match="unsupported metric"):
        best_fixed_caption(candidates, references, "METEOR")


def test_fast_fixed_caption_cider_equals_pycocoevalcap():
    rng = random.Random(0)
    words = "a the dog cat man sitting on in with table street red blue small grass".split()

    def caption(low: int = 1) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, 12)))

    references = {str(i): [caption() for _ in range(rng.randint(1, 5))] for i in range(60)}
    fast = _FixedCaptionCider(references)
    for candidate in [caption() for _ in range(8)] + ["a", "zebra", ""]:
        expected = Cider().compute_score(references, {key: [candidate] for key in references})[0]
        assert fast.score(candidate) == pytest.approx(expected, abs=1e-9), candidate


def test_write_coco_results(tmp_path):
    path = tmp_path / "out" / "predictions.json"
    write_coco_results(path, {"391895": "a man on a bike", "img_7": "a cat", "007": "a dog"})
    assert json.loads(path.read_text()) == [
        {"image_id": 391895, "caption": "a man on a bike"},
        {"image_id": "img_7", "caption": "a cat"},
        {"image_id": 7, "caption": "a dog"},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["predictions.json"]  # no temporary file left


def test_spice_failure_is_reported_not_raised(tmp_path):
    # Empty stand-ins for the CoreNLP jars: spice-1.0.jar and its bundled lib/ load, CoreNLP classes don't.
    for name in caption_metrics.CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    score, reason = caption_metrics._spice({"1": ["a dog runs"]}, {"1": ["a dog runs"]}, tmp_path)
    assert score is None
    assert reason.startswith("SPICE failed (exit 1)") and "NoClassDefFoundError" in reason
