"""`eimctl chat` on tiny lavin and llama-adapter stages trained 2 steps: batch answers (one JSON line per input),
greedy determinism, seeded sampling, a bad batch line named by file:line, one-shot streaming equal to the batch
answer, the interactive loop, the refusal of a family that takes no instructions, and the per-token callback."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.models.generate import generate_from_embeds
from eimctl.steps.chat import Stream

runner = CliRunner()
FAMILIES = ("lavin", "llama-adapter")
WORDS = ["Image", ":", "N", "/", "A"]   # "Image: N/A" in the tiny vocabulary (LaVIN's text-only block)


def family_overrides(family: str, assets: dict) -> list[str]:
    common = [f"model.clip.name={assets['clip']}", "model.clip.pretrained=", f"data.path={assets['data']}",
              "train.batch_size=8", "train.warmup_steps=0", "train.lr=1e-2", "train.max_steps=2",
              "train.checkpoint_every=100", "eval.diagnostics=false", "eval.batch_size=2"]
    if family == "lavin":
        return [*common, f"model.lm.name={assets['llama']}", "model.family=lavin", "model.clip.tokens=cls_every_k",
                "model.clip.cls_every=2", "model.lavin.adapter_dropout=0"]
    if family == "llama-adapter":
        return [*common, f"model.lm.name={assets['llama']}", "model.family=llama-adapter",
                "model.clip.remove_projection=true", "model.clip.tokens=full", "model.llama_adapter.layers=3",
                "model.llama_adapter.prompt_len=4", "model.llama_adapter.st_depth=1", "model.llama_adapter.st_heads=2"]
    return [*common, f"model.lm.name={assets['gpt2']}"]                                    # clipcap


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A `base` stage of each family (and of clipcap), trained 2 steps; a batch file next to two images."""
    root = tmp_path_factory.mktemp("chat")
    assets = {"clip": tiny.make_tiny_clip(root / "clip", layers=4), "llama": tiny.make_tiny_llama(root / "llama",
                                                                                                 words=WORDS),
              "gpt2": tiny.make_tiny_lm(root / "gpt2"), "data": tiny.make_tiny_data(root / "data", n_train=16)}
    found = {}
    for family in (*FAMILIES, "clipcap"):
        run = root / f"run-{family}"
        result = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q",
                                     *family_overrides(family, assets)])
        assert result.exit_code == 0, (family, result.output)
        found[family] = run
    questions = root / "questions"
    (questions / "pics").mkdir(parents=True)
    for name in ("train-0.png", "train-1.png"):
        shutil.copy(assets["data"] / "images" / name, questions / "pics" / name)
    lines = [{"instruction": "what is in the picture", "image": "pics/train-0.png"},
             {"instruction": "there is a red square"},
             {"instruction": "the big bar", "image": None},
             {"instruction": "a small picture", "image": "pics/train-1.png"}]
    (questions / "batch.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    found["batch"], found["lines"] = questions / "batch.jsonl", lines
    return found


@pytest.fixture(scope="module")
def greedy(runs) -> dict:
    """Each family's greedy answers to the batch file, on stdout."""
    found = {}
    for family in FAMILIES:
        result = chat(runs[family], "--batch", str(runs["batch"]))
        assert result.exit_code == 0, result.output
        found[family] = answers(result.output)
    return found


def chat(run: Path, *args: str):
    return runner.invoke(app, ["chat", "--run-dir", str(run), "--max-new-tokens", "6", *args])


def answers(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_answers_one_line_per_input_deterministically(runs, greedy, family, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = chat(runs[family], "--batch", str(runs["batch"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    written = answers(out.read_text())
    assert [(row["instruction"], row["image"]) for row in written] == \
        [(line["instruction"], line.get("image")) for line in runs["lines"]]
    assert all(isinstance(row["response"], str) for row in written)
    assert any(row["response"] for row in written)
    assert greedy[family] == written                                           # greedy: the same, on stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_streams_the_batch_answer(runs, greedy, family):
    for row in greedy[family][:2]:                                             # with an image, and text-only
        image = ["--image", str(runs["batch"].parent / row["image"])] if row["image"] else []
        result = chat(runs[family], "--instruction", row["instruction"], *image)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == row["response"]


def test_sampling_with_a_seed_is_reproducible(runs, greedy):
    run = runs["lavin"]
    sampled = [chat(run, "--batch", str(runs["batch"]), "--temperature", "1.5", "--top-p", "1", "--seed", seed)
               for seed in ("3", "3", "4")]
    assert all(result.exit_code == 0 for result in sampled), [r.output for r in sampled]
    first, same, other = (answers(result.output) for result in sampled)
    assert first == same
    assert first != greedy["lavin"] or other != greedy["lavin"]                # it did sample


def test_a_bad_batch_line_names_file_and_line(runs, tmp_path):
    cases = {'{"instruction": "a red square"}\n{"instruction": 3}\n': 2,
             '{"instruction": "a"}\n\n{"instruction": "b", "image": "missing.png"}\n': 3,
             'not json\n': 1}
    for text, number in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        result = chat(runs["lavin"], "--batch", str(bad))
        assert result.exit_code == 1 and f"{bad}:{number}" in result.output, result.output
        assert result.output.count("Error:") == 1


def test_the_interactive_loop_switches_images_and_quits(runs, greedy):
    image, expected = runs["batch"].parent / "pics" / "train-0.png", greedy["lavin"]
    session = f"what is in the picture\n/noimage\nthere is a red square\n/image {image.parent / 'none.png'}\n\n"
    result = runner.invoke(app, ["chat", "--run-dir", str(runs["lavin"]), "--max-new-tokens", "6",
                                 "--image", str(image)], input=session)
    assert result.exit_code == 0, result.output
    assert "[train-0.png] > " in result.output and "[no image] > " in result.output
    assert f"] > {expected[0]['response']}\n" in result.output                    # with the image
    assert f"] > {expected[1]['response']}\n" in result.output                    # after /noimage
    assert "image not found" in result.output                                    # a bad /image keeps going
    quits = runner.invoke(app, ["chat", "--run-dir", str(runs["lavin"])], input="")   # Ctrl-D at once
    assert quits.exit_code == 0, quits.output


def test_refusals(runs, tmp_path):
    clipcap = chat(runs["clipcap"], "--instruction", "hello")
    assert clipcap.exit_code == 1 and "cannot take instructions" in clipcap.output
    for args, message in ((["--instruction", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
                          (["--batch", str(runs["batch"]), "--instruction", "hi"], "--batch takes"),
                          (["--instruction", "hi", "--out", str(tmp_path / "x.jsonl")], "--out goes with --batch"),
                          (["--instruction", "hi", "--image", str(tmp_path / "none.png")], "image not found")):
        result = chat(runs["lavin"], *args)
        assert result.exit_code == 1 and message in result.output, result.output


def test_the_token_callback_sees_every_token_and_changes_nothing():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)).eval()
    embeds = torch.randn(3, 4, 16)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    eos = generate_from_embeds(lm, embeds, mask, eos_token_id=-1, max_new_tokens=5)[1][2]
    plain = generate_from_embeds(lm, embeds, mask, eos_token_id=eos, max_new_tokens=5)
    streamed = generate_from_embeds(lm, embeds, mask, eos_token_id=eos, max_new_tokens=5,
                                    on_token=lambda row, token: seen[row].append(token))
    assert streamed == plain and [seen[row] for row in range(3)] == plain


def test_the_stream_prints_each_piece_once_and_ends_with_the_answer():
    pieces = {5: "a", 6: "", 7: "red\ufffd", 8: "red", 9: "square"}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(pieces[i] for i in ids))
    shown: list[str] = []
    stream = Stream(tokenizer, shown.append)
    for token in (5, 6, 7):
        stream(0, token)
    assert shown == ["a"]                      # trailing whitespace and a partial character are held back
    stream.ids = [5, 8]
    stream(0, 9)
    stream.finish("a red square")
    assert shown == ["a", " red square", "\n"]
