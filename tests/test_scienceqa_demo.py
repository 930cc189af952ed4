"""The synthetic ScienceQA-format demo set (official schema, coverage, no shortcuts) and its tiny LLaMA."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from eimctl.data.scienceqa_demo import (SUBJECT_TOPICS, SUMMARY, category_flags, generate_scienceqa_demo,
                                        problem_key)
from eimctl.demo.pretrain_llama import BOS, EOS, PAD, UNKNOWN, pretrain_demo_llama
from eimctl.runtime.errors import EimError

FIELDS = ["question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
          "skill", "lecture", "solution", "split"]
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SMALL = {"n_train": 60, "n_val": 12, "n_test": 24}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("sqa") / "data"
    summary = generate_scienceqa_demo(out)
    problems = json.loads((out / "problems.json").read_text(encoding="utf-8"))
    return out, problems, summary


def _split(problems: dict, split: str) -> list[dict]:
    return [p for p in problems.values() if p["split"] == split]


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value)}\b", text) is not None


def test_problems_follow_the_official_schema(default_set):
    out, problems, _ = default_set
    assert len(problems) == 2900 and sorted(problems, key=int) == [str(i) for i in range(1, 2901)]
    for qid, p in problems.items():
        assert list(p) == FIELDS, qid
        assert isinstance(p["question"], str) and p["question"].endswith("?")
        assert 2 <= len(p["choices"]) <= 5 and len(set(p["choices"])) == len(p["choices"])
        assert all(isinstance(c, str) and c for c in p["choices"])
        assert type(p["answer"]) is int and 0 <= p["answer"] < len(p["choices"])
        assert isinstance(p["hint"], str) and p["image"] in ("image.png", None)
        assert (out / "images" / p["split"] / qid / "image.png").is_file() == (p["image"] is not None)
        assert p["task"] == "closed choice" and p["grade"] in {f"grade{g}" for g in range(1, 13)}
        assert p["topic"] in SUBJECT_TOPICS[p["subject"]]
        assert all(isinstance(p[f], str) and p[f] for f in ("category", "skill", "lecture", "solution"))
        assert p["choices"][p["answer"]] in p["solution"]


def test_pid_splits_list_every_problem_once(default_set):
    out, problems, _ = default_set
    splits = json.loads((out / "pid_splits.json").read_text(encoding="utf-8"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 2000, "val": 300, "test": 600, "trainval": 2300,
                                                       "minitrain": 200, "minival": 30, "minitest": 60}
    assert sorted(splits["train"] + splits["val"] + splits["test"], key=int) == list(problems)
    for split in ("train", "val", "test"):
        assert all(problems[q]["split"] == split for q in splits[split])
        assert set(splits[f"mini{split}"]) <= set(splits[split])
    assert set(splits["trainval"]) == set(splits["train"]) | set(splits["val"])


def test_every_category_has_at_least_100_test_problems(default_set):
    out, problems, summary = default_set
    counts = Counter(flag for p in _split(problems, "test") for flag in category_flags(p))
    assert {c: counts[c] >= 100 for c in CATEGORIES} == {c: True for c in CATEGORIES}, counts
    assert all(summary["counts"]["test"][c] == counts[c] for c in CATEGORIES)
    assert json.loads((out / SUMMARY).read_text(encoding="utf-8")) == summary
    assert set(summary["topics"]["test"]) == {t for topics in SUBJECT_TOPICS.values() for t in topics}
    assert summary["counts"]["test"]["TXT+IMG"] > 0


def test_answer_position_and_choice_count_are_uniform_and_independent_of_category(default_set):
    _, problems, _ = default_set
    ps = list(problems.values())
    for position in range(5):
        expected = sum(1 / len(p["choices"]) for p in ps if len(p["choices"]) > position)
        observed = sum(p["answer"] == position for p in ps)
        assert abs(observed - expected) <= 4 * expected ** 0.5, (position, observed, expected)
    sizes = Counter(len(p["choices"]) for p in ps)
    assert all(sizes[k] >= 0.2 * len(ps) for k in range(2, 6)), sizes
    test = _split(problems, "test")
    for category in CATEGORIES:
        rows = [p for p in test if category in category_flags(p)]
        always_a = sum(p["answer"] == 0 for p in rows) / len(rows)
        chance = sum(1 / len(p["choices"]) for p in rows) / len(rows)
        assert abs(always_a - chance) < 0.12 and 0.25 < chance < 0.4, (category, always_a, chance)


def test_no_train_or_val_problem_repeats_a_test_problem(default_set):
    _, problems, _ = default_set
    test_keys = {problem_key(p) for p in _split(problems, "test")}
    for split in ("train", "val"):
        assert not test_keys & {problem_key(p) for p in _split(problems, split)}
    # With a picture the key holds the whole scene (the solution lists every object).
    test_scenes = {(p["question"], p["solution"]) for p in _split(problems, "test") if p["image"]}
    assert not test_scenes & {(p["question"], p["solution"]) for p in _split(problems, "train") if p["image"]}


def test_each_context_decides_the_answer_and_nothing_else_reveals_it(default_set):
    _, problems, _ = default_set
    for p in problems.values():
        answer = p["choices"][p["answer"]]
        if p["image"]:  # the hint never gives the answer away (IMG-only hints are empty)
            assert not _mentions(p["hint"], answer) and not _mentions(p["question"], answer), p
            assert p["solution"].startswith("The picture shows") or p["hint"]
        elif p["hint"]:  # TXT: a fact of the hint, stated next to other facts of the same kind
            assert _mentions(p["hint"], answer) and sum(_mentions(p["hint"], c) for c in p["choices"]) >= 2, p
        else:
            assert not _mentions(p["question"], answer), p
        if p["question"].startswith("What is") and " plus " in p["question"]:
            numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
            a, b = re.match(r"What is (\w+) plus (\w+)\?", p["question"]).groups()
            assert numbers.index(a) + numbers.index(b) + 1 == numbers.index(answer)


def test_generation_is_deterministic_and_cached(tmp_path):
    first = generate_scienceqa_demo(tmp_path / "a", seed=3, **SMALL)
    second = generate_scienceqa_demo(tmp_path / "b", seed=3, **SMALL)
    assert first == second
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    other = generate_scienceqa_demo(tmp_path / "c", seed=4, **SMALL)
    assert (tmp_path / "c" / "problems.json").read_bytes() != (tmp_path / "a" / "problems.json").read_bytes()
    assert other["parameters"]["seed"] == 4

    stamp = (tmp_path / "a" / "problems.json").stat().st_mtime_ns
    assert generate_scienceqa_demo(tmp_path / "a", seed=3, **SMALL) == first  # kept, not rebuilt
    assert (tmp_path / "a" / "problems.json").stat().st_mtime_ns == stamp
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("x")
    with pytest.raises(EimError, match="not a folder made by eimctl"):
        generate_scienceqa_demo(tmp_path / "foreign", **SMALL)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("sqa-llama")
    generate_scienceqa_demo(root / "data", n_train=48, n_val=8, n_test=8)
    lines: list[str] = []
    path = pretrain_demo_llama(root / "data", root / "models", epochs=3, batch_size=8, learning_rate=5e-3,
                               log=lines.append, log_every=1)
    return path, lines


def test_tokenizer_round_trips_the_prompt_strings(llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir[0])
    strings = ["\n", "(A)", "Question:", "Response:", "The answer is A. BECAUSE:", "Image: ", "N/A", "Image: N/A",
               "Question: Which shape is red?\nContext: N/A\nOptions: (A) circle (B) cross\nResponse:",
               "The answer is B. BECAUSE: Shapes have names.\\nLook. The picture shows a red cross.",
               "Answer: The answer is E.", "  two  spaces\tand tab ü"]
    for text in strings:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text, text
        assert ids and tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids  # none added
        framed = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]
        assert tokenizer.decode(framed, skip_special_tokens=True) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (BOS, EOS, PAD,
                                                                                                    UNKNOWN)
    assert tokenizer.convert_tokens_to_ids(UNKNOWN) == 0
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_llama_pretraining_runs_loads_back_and_lowers_the_loss(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    path, lines = llama_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (128, 4, 4, 2, 256, 512)
    losses = [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    metrics = json.loads((path / "pretrain.json").read_text())["metrics"]
    assert metrics["train_perplexity"] > 1 and metrics["val_perplexity"] > 1 and metrics["steps"] == len(losses)
    assert any("val" in line and "perplexity" in line for line in lines), lines

    again: list[str] = []
    assert pretrain_demo_llama(path.parent.parent / "data", path.parent, epochs=3, batch_size=8,
                               learning_rate=5e-3, log=again.append, log_every=1) == path
    assert again == [f"llama: already pretrained in {path}"]
    with pytest.raises(EimError, match="no demo set in"):
        pretrain_demo_llama(tmp_path / "nothing", tmp_path / "models")


def test_the_formatted_pretraining_pool_is_apart_from_the_set(default_set):
    """demo-pretrain's formatted documents: the LaVIN QCM-ALE prompt and target of problems drawn from another
    seed, none with the key of a val or test problem, deterministic."""
    from eimctl.data.scienceqa_demo import draw_text_problems, problem_key
    from eimctl.demo.pretrain_llama import format_documents, read_split

    root = default_set[0]
    held_out = {problem_key(p) for split in ("val", "test") for p in read_split(root, split)}
    pool = draw_text_problems(300, 1000, held_out)
    assert not {problem_key(p) for p in pool} & held_out
    assert pool == draw_text_problems(300, 1000, held_out) and pool != draw_text_problems(300, 1001, held_out)
    documents = format_documents(root, 300, 1000)
    assert len(documents) == 300
    for problem, document in zip(pool, documents):
        letter = "ABCDE"[problem["answer"]]
        assert document.startswith(f"Question: {problem['question']}\nContext: {problem['hint'] or 'N/A'}\n")
        assert f"\nResponse:The answer is {letter}. BECAUSE: " in document
