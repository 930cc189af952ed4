"""Task `instruct`: Alpaca and LLaVA-Instruct readers (LaVIN's conversion rules), the LaVIN and Alpaca prompt
templates as golden strings, the response-only loss mask, mixed text-only/image samples, COCO image naming,
bad rows as one error naming file and row, and a tiny LaVIN `train-stage base` through the CLI."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from transformers import AutoTokenizer
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import load_config
from eimctl.data.tokens import pad_batch, tokenize_pairs
from eimctl.runtime.errors import EimError
from eimctl.tasks import formatter, get_task
from eimctl.tasks.instruct_data import InstructSample, read_instruct

TASK = get_task("instruct")
ALPACA = [{"instruction": "Give three tips.", "input": "", "output": "Eat well."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
DETAIL = [{"id": "d1", "image": "000000000001.jpg",
           "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                             {"from": "gpt", "value": "A red square."},
                             {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]}]
CONVERSATION = [{"id": "c1", "image": "b.png",
                 "conversations": [{"from": "human", "value": "What colour is it?\n<image>"},
                                   {"from": "gpt", "value": "It is blue."},
                                   {"from": "human", "value": "Is it  big?"}, {"from": "gpt", "value": "Yes."}]}]
LAVIN_GOLDEN = {
    "alpaca_0": "Instruction: Give three tips. \nResponse:",            # empty input: a space before the newline
    "alpaca_1": "Instruction: Add the numbers. 2 and 3\nResponse:",
    "gpt4_0": "Instruction: What is in the picture?\nResponse:",       # "<image>\n" prefix removed
    "gpt4_2_0_0": "Instruction: What colour is it?\nResponse:",        # "\n<image>" suffix removed
    "gpt4_2_0_2": "Instruction: Is it big?\nResponse:",                # a later pair, no history; "  " -> " "
}
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{}\n\n### Response:")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n"
              "{}\n\n### Response:")
ALPACA_GOLDEN = {
    "alpaca_0": NO_INPUT.format("Give three tips."),
    "alpaca_1": WITH_INPUT.format("Add the numbers.", "2 and 3"),
    "gpt4_0": NO_INPUT.format("What is in the picture?"),
    "gpt4_2_0_0": NO_INPUT.format("What colour is it?"),
    "gpt4_2_0_2": NO_INPUT.format("Is it  big?"),
}
RESPONSES = {"alpaca_0": "Eat well.", "alpaca_1": "5", "gpt4_0": "A red square.", "gpt4_2_0_0": "It is blue.",
             "gpt4_2_0_2": "Yes."}


def write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def make_set(root: Path, alpaca=ALPACA, detail=DETAIL, conversation=CONVERSATION) -> Path:
    """LaVIN's files in root/data; COCO images in root/coco, one under each naming form."""
    folder = root / "data"
    write(folder / "alpaca_data.json", alpaca)
    write(folder / "detail_23k.json", detail)
    write(folder / "conversation_58k.json", conversation)
    image(root / "coco/train2014/COCO_train2014_000000000001.jpg")
    image(root / "coco/b.png", (30, 60, 220))
    return folder


def data(path, image_root="", **extra):
    return SimpleNamespace(path=str(path), image_root=str(image_root), allow_outside_root=False, **extra)


@pytest.fixture
def split(tmp_path):
    return read_instruct(data(make_set(tmp_path), tmp_path / "coco"), "train")


def test_samples_follow_lavins_conversion(split, tmp_path):
    ids = [s.sample_id for s in split.samples]
    # alpaca, then the first-turn file (detail: its first pair only), then every pair of the conversation
    assert ids == ["alpaca_0", "alpaca_1", "gpt4_0", "gpt4_2_0_0", "gpt4_2_0_2"]
    assert {s.sample_id: s.response for s in split.samples} == RESPONSES
    assert [s.has_image for s in split.samples] == [False, False, True, True, True]
    assert [s.image for s in split.samples] == [None, None, "train2014/COCO_train2014_000000000001.jpg",
                                                "b.png", "b.png"]
    assert split.images() == [("000000000001.jpg", "train2014/COCO_train2014_000000000001.jpg"), ("b.png", "b.png")]
    assert split.image_root == tmp_path / "coco"
    assert split.samples[4].instruction == "Is it  big?"    # no history from the first pair


@pytest.mark.parametrize("template, golden", [("lavin", LAVIN_GOLDEN), ("alpaca", ALPACA_GOLDEN)])
def test_golden_prompts(split, template, golden):
    config = load_config(overrides=["data.task=instruct", f"instruct.template={template}"])
    pairs = {s.sample_id: formatter(TASK, config)(s) for s in split.samples}
    assert pairs == {qid: (golden[qid], RESPONSES[qid]) for qid in golden}


def test_the_family_template_and_the_lavin_formula(split):
    lavin = formatter(TASK, load_config(overrides=["data.task=instruct", "model.family=lavin"]))
    other = formatter(TASK, load_config(overrides=["data.task=instruct", "model.family=llama-adapter"]))
    assert [lavin(s)[0] for s in split.samples] == list(LAVIN_GOLDEN.values())
    assert [other(s)[0] for s in split.samples] == list(ALPACA_GOLDEN.values())
    instr, given = "Give three tips.", ""   # LaVIN's own expression, executed
    assert ("Instruction: " + instr + " " + given + "\n" + "Response: ").replace("  ", " ").strip() == \
        LAVIN_GOLDEN["alpaca_0"]
    with pytest.raises(EimError, match="instruct.template"):
        load_config(overrides=["instruct.template=chatml"])


def test_clip_text_is_the_response_of_an_image_sample_and_the_instruction_otherwise(split):
    assert [TASK.clip_text(s) for s in split.samples] == ["Give three tips.", "Add the numbers. 2 and 3",
                                                          "A red square.", "It is blue.", "Yes."]
    long = InstructSample("x", "i.png", "i.png", "q", "", "w" * 500, "llava")
    assert TASK.clip_text(long) == "w" * 200


def test_the_loss_mask_covers_exactly_the_response_and_eos(split, tmp_path):
    words = ["Instruction", "Response", ":", ".", "Give", "three", "tips", "Eat", "well", "What", "in"]
    tokenizer = AutoTokenizer.from_pretrained(tiny.make_tiny_llama(tmp_path / "llama", words=words))
    pairs = [TASK.format(s, load_config(overrides=["model.family=lavin"])) for s in split.samples[:3]]
    tokens, cut = tokenize_pairs(tokenizer, pairs, 200)
    batch = pad_batch(tokens, tokenizer.pad_token_id)
    assert cut == 0
    for row, (instruction, response) in enumerate(pairs):
        ids = batch["input_ids"][row]
        mask = batch["loss_mask"][row].bool()
        prompt = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any()
        assert ids[mask].tolist() == answer + [tokenizer.eos_token_id]
        assert int(mask.sum()) == len(answer) + 1 == int(batch["attention_mask"][row].sum()) - len(prompt)


@pytest.mark.parametrize("name, rows, row, message", [
    ("alpaca_data.json", [ALPACA[0], {"instruction": "x", "output": "y"}], 1, "lacks key"),
    ("alpaca_data.json", [ALPACA[0], {"instruction": "x", "input": 3, "output": "y"}], 1, "must be strings"),
    ("alpaca_data.json", [ALPACA[0], ALPACA[1], "text"], 2, "not a JSON object"),
    ("detail_23k.json", [DETAIL[0], {"image": "b.png"}], 1, "lacks key"),
    ("detail_23k.json", [{"image": "b.png", "conversations": [{"from": "human", "value": "q"}]}], 0,
     "no gpt turn"),
    ("conversation_58k.json", [CONVERSATION[0], {"image": "b.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}]}], 1,
     "no gpt turn"),
    ("conversation_58k.json", [{"image": "b.png", "conversations": [
        {"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}], 0, "expected 'human'"),
    ("conversation_58k.json", [{"image": 7, "conversations": []}], 0, "image must be a file name"),
    ("detail_23k.json", [{"image": "b.png", "conversations": [{"from": "human", "value": None}]}], 0,
     "string 'value'"),
    ("detail_23k.json", [{"question": "q"}], 0, "neither an Alpaca row nor a LLaVA"),
])
def test_a_bad_row_is_one_error_naming_file_and_row(tmp_path, name, rows, row, message):
    make_set(tmp_path)
    path = write(tmp_path / "data" / name, rows)
    with pytest.raises(EimError, match=message) as error:
        read_instruct(data(tmp_path / "data", tmp_path / "coco"), "train")
    assert error.value.where == f"{path}, row {row}"


def test_a_missing_image_names_file_row_and_both_forms(tmp_path):
    folder = make_set(tmp_path, conversation=[CONVERSATION[0], {**CONVERSATION[0], "image": "gone.jpg"}])
    with pytest.raises(EimError, match="image not found: gone.jpg") as error:
        read_instruct(data(folder, tmp_path / "coco"), "train")
    assert error.value.where == f"{folder / 'conversation_58k.json'}, row 1"
    assert "COCO_train2014_gone.jpg" in error.value.hint
    escape = make_set(tmp_path, detail=[{**DETAIL[0], "image": "../../outside.jpg"}])
    with pytest.raises(EimError, match="escapes") as error:
        read_instruct(data(escape, tmp_path / "coco"), "train")
    assert error.value.where.endswith("detail_23k.json, row 0")


def test_file_lists_splits_and_fingerprints(tmp_path):
    folder = make_set(tmp_path)
    listed = data(f"{folder / 'conversation_58k.json'}, {folder / 'alpaca_data.json'}", tmp_path / "coco")
    assert [s.sample_id for s in read_instruct(listed, "train").samples] == \
        ["gpt4_2_0_0", "gpt4_2_0_2", "alpaca_0", "alpaca_1"]
    text_only = read_instruct(data(folder / "alpaca_data.json"), "train")   # no images, no image root needed
    assert text_only.images() == [] and len(text_only.samples) == 2
    before = read_instruct(data(folder, tmp_path / "coco"), "train").fingerprint
    write(folder / "alpaca_data.json", ALPACA[:1])
    assert read_instruct(data(folder, tmp_path / "coco"), "train").fingerprint != before
    with pytest.raises(EimError, match="no val split"):
        read_instruct(data(folder, tmp_path / "coco"), "val")
    write(folder / "val/alpaca_data.json", ALPACA[1:])
    val = read_instruct(data(folder, tmp_path / "coco"), "val")
    assert [s.sample_id for s in val.samples] == ["val:alpaca_0"] and val.name == "val"
    with pytest.raises(EimError, match="no benchmark; evaluate with mme"):
        read_instruct(data(folder, tmp_path / "coco"), "test")
    with pytest.raises(EimError, match="no instruction files"):
        read_instruct(data(tmp_path / "coco"), "train")
    with pytest.raises(EimError, match="no instruction data given"):
        read_instruct(data(""), "train")


def test_evaluation_is_refused_clearly():
    with pytest.raises(EimError, match="instruct has no benchmark; evaluate with mme or chat"):
        TASK.predict(None, None, None, None, Path("."), False)
    assert TASK.summary({"stage": "base", "split": "train", "metrics": {"nll": 1.5}}) == ["base on train: nll 1.5"]


WORDS = ["Instruction", "Response", ":", ".", "?", "Give", "three", "tips", "Eat", "well", "Add", "numbers", "2",
         "and", "3", "5", "What", "in", "A", "colour", "it", "It", "blue", "Is", "Yes", "No"]


def test_a_mixed_lavin_run_through_the_cli(tmp_path):
    folder = make_set(tmp_path)
    overrides = [f"model.clip.name={tiny.make_tiny_clip(tmp_path / 'clip', layers=4)}", "model.clip.pretrained=",
                 f"model.lm.name={tiny.make_tiny_llama(tmp_path / 'llama', words=WORDS)}", "model.family=lavin",
                 "model.clip.tokens=cls_every_k", "model.clip.cls_every=2", "model.lavin.adapter_dropout=0",
                 "data.task=instruct", f"data.path={folder}", f"data.image_root={tmp_path / 'coco'}",
                 f"eim.queues_dir={tmp_path / 'queues'}", "train.max_steps=2", "train.batch_size=4",
                 "train.warmup_steps=0", "train.log_every=1", "eval.diagnostics=false"]
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *overrides])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "stages/base/metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2]
    assert (run / "stages/base/manifest.json").is_file()
