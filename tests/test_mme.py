"""The mme task: the official calculation.py rules (answer parsing, acc, acc+, scores) against hand-made
pairs and LaVIN's published answer files (tests/fixtures/mme-lavin, whose official totals are
perception 963.6114, cognition 249.6429), bad answer files, the readers of the MME release layout and of
answer templates, the prompts, the score-only CLI path, and generation with a tiny LaVIN."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tiny
from eimctl.cli import app
from eimctl.config import DataConfig, load_config
from eimctl.evaluate.mme_scoring import (SUBTASKS, always_yes, answer_line, parse_prediction, read_answer_dir,
                                         score_answer_dir, score_subtask, score_tables)
from eimctl.runtime.errors import EimError
from eimctl.tasks import formatter, get_task
from eimctl.tasks.mme import clean_prediction, mme_length, prompt
from eimctl.tasks.mme_data import read_mme

FIXTURE = Path(__file__).parent / "fixtures" / "mme-lavin"
TASK = get_task("mme")
runner = CliRunner()
# calculation.py on the fixture, as printed to 2 decimals
EXPECTED = {"existence": 185.00, "count": 88.33, "position": 63.33, "color": 75.00, "posters": 79.59,
            "celebrity": 47.35, "scene": 136.75, "landmark": 93.50, "artwork": 87.25, "OCR": 107.50,
            "commonsense_reasoning": 87.14, "numerical_calculation": 65.00, "text_translation": 47.50,
            "code_reasoning": 50.00}


# ---------------------------------------------------------------- the official rules

@pytest.mark.parametrize("pred, label", [
    ("Yes", "yes"), ("no", "no"), ("NO.", "no"), ("not sure", "no"), (" yes", "yes"), ("  yes", "other"),
    ("noyes", "no"), ("y", "other"), ("none", "no"), ("yes\n", "yes"), ("\n", "other"), ("", "other"),
    ("I think yes", "other"), ("nope, yes", "no"), ("yesno", "yes"), ("knob", "no"), ("eyes", "yes"),
])
def test_parse_prediction(pred, label):
    assert parse_prediction(pred) == label


def lines(*rows) -> list[str]:
    return [answer_line(image, f"Q{n}?", gt, pred) for n, (image, gt, pred) in enumerate(rows)]


def test_acc_plus_needs_both_questions_of_an_image():
    answers = lines(("a.jpg", "Yes", "yes"), ("a.jpg", "No", "no"),       # both right
                    ("b.jpg", "Yes", "yes"), ("b.jpg", "No", "yes"),      # one right
                    ("c.jpg", "Yes", "maybe"), ("c.jpg", "No", "no"),     # "other" is wrong
                    ("d.jpg", "Yes", "no"), ("d.jpg", "No", "yes"))       # none right
    scored = score_subtask(answers, "t.txt")
    assert scored["acc"] == 4 / 8 and scored["acc_plus"] == 1 / 4 and scored["other"] == 1
    assert scored["score"] == pytest.approx(75.0) and (scored["questions"], scored["images"]) == (8, 4)


def test_groups_sum_their_subtasks_and_always_yes_scores_50_each():
    perfect = lines(("a.jpg", "Yes", "yes"), ("a.jpg", "No", "No"))
    tables = {task: (perfect, task) for task in ("existence", "count", "code_reasoning")}
    result = score_tables(tables)
    assert (result["perception"], result["cognition"]) == (400.0, 200.0)
    assert result["missing_subtasks"] == [t for t in SUBTASKS if t not in tables]
    control = score_tables(always_yes(tables))
    assert (control["perception"], control["cognition"], control["metrics"]["existence"]) == (100.0, 50.0, 50.0)
    only_ocr = score_tables({"OCR": (perfect, "OCR")})
    assert only_ocr["perception"] == 200.0 and "cognition" not in only_ocr


def test_lavin_fixture_gives_the_official_scores():
    result = score_answer_dir(FIXTURE)
    assert result["perception"] == pytest.approx(963.6114445778312, abs=1e-9)
    assert result["cognition"] == pytest.approx(249.64285714285714, abs=1e-9)
    assert result["printed"]["perception"] == "963.61" and result["printed"]["cognition"] == "249.64"
    assert {task: round(entry["score"], 2) for task, entry in result["subtasks"].items()} == EXPECTED
    assert {task: result["printed"][task] for task in EXPECTED} == {t: f"{v:.2f}" for t, v in EXPECTED.items()}
    assert sum(entry["questions"] for entry in result["subtasks"].values()) == 2374
    assert sum(entry["images"] for entry in result["subtasks"].values()) == 1187
    subset = score_answer_dir(FIXTURE, tasks=["existence", "count", "position", "color"])
    assert subset["perception"] == pytest.approx(185.0 + 88.3333333 + 63.3333333 + 75.0)
    assert "cognition" not in subset and len(subset["missing_subtasks"]) == 10


# ---------------------------------------------------------------- bad answer files

def answer_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "answers"
    folder.mkdir()
    for path in FIXTURE.glob("*.txt"):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_bad_answer_files_give_one_error_naming_file_and_line(tmp_path):
    folder = answer_folder(tmp_path)
    (folder / "count.txt").unlink()
    with pytest.raises(EimError, match="no answer file for MME subtask 'count'") as missing:
        score_answer_dir(folder)
    assert str(folder / "count.txt") in missing.value.line()
    score_answer_dir(folder, tasks=["existence"])  # a subset asked for does not need the others
    with pytest.raises(EimError, match="unknown MME subtask"):
        score_answer_dir(folder, tasks=["existance"])

    ocr = folder / "OCR.txt"
    rows = FIXTURE.joinpath("OCR.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    ocr.write_text("".join(rows[:-1]), encoding="utf-8")
    with pytest.raises(EimError, match="39 lines, an odd number") as odd:
        score_answer_dir(folder, tasks=["OCR"])
    assert str(ocr) in odd.value.line()

    ocr.write_text("".join(rows[:4] + ["0003.jpg\tIs it?\tYes\n"] + rows[5:]), encoding="utf-8")
    with pytest.raises(EimError, match="3 tab-separated fields, not 4") as malformed:
        score_answer_dir(folder, tasks=["OCR"])
    assert f"{ocr}:5" in malformed.value.line()

    ocr.write_text("".join(rows[:6] + ["0004.jpg\tIs it?\tMaybe\tyes\n"] + rows[7:]), encoding="utf-8")
    with pytest.raises(EimError, match="ground truth 'Maybe' is not yes or no") as bad_gt:
        score_answer_dir(folder, tasks=["OCR"])
    assert f"{ocr}:7" in bad_gt.value.line()

    ocr.write_text("", encoding="utf-8")
    with pytest.raises(EimError, match="no lines"):
        score_answer_dir(folder, tasks=["OCR"])
    with pytest.raises(EimError, match="answer folder not found"):
        read_answer_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------- the CLI's score-only path

def test_cli_scores_an_answer_folder(tmp_path):
    done = runner.invoke(app, ["evaluate", "mme", "--answers", str(FIXTURE), "--out", str(tmp_path / "scores")])
    assert done.exit_code == 0, done.output
    assert "perception 963.61" in done.output and "cognition 249.64" in done.output
    assert "existence" in done.output and "185.00" in done.output and "always-yes control" in done.output
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert metrics["subtasks"]["OCR"]["score"] == pytest.approx(107.5)
    assert metrics["controls"]["always_yes"]["metrics"]["perception"] == 500.0

    folder = answer_folder(tmp_path)
    (folder / "scene.txt").unlink()
    failed = runner.invoke(app, ["evaluate", "mme", "--answers", str(folder), "--out", str(tmp_path / "s2")])
    assert failed.exit_code == 1 and "no answer file for MME subtask 'scene'" in failed.output
    assert "Traceback" not in failed.output
    no_out = runner.invoke(app, ["evaluate", "mme", "--answers", str(FIXTURE)])
    assert no_out.exit_code == 1 and "--answers needs --out" in no_out.output
    wrong = runner.invoke(app, ["evaluate", "coco", "--answers", str(FIXTURE), "--out", str(tmp_path / "s3")])
    assert wrong.exit_code == 1 and "task 'coco' cannot score --answers" in wrong.output
    root = runner.invoke(app, ["evaluate", "coco", "--run-dir", str(tmp_path), "--mme-root", str(tmp_path)])
    assert root.exit_code == 1 and "--mme-root goes with the mme task" in root.output


# ---------------------------------------------------------------- readers

def image(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def question_file(path: Path, subject: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"Is there a {subject} in the image? Please answer yes or no.\tYes\n"
                    f"Is there a cat in the image? Please answer yes or no.\tNo\n", encoding="utf-8")


def make_release(root: Path) -> Path:
    """A tiny MME release: existence side by side (2 images), artwork nested, code_reasoning with a .png."""
    for name, colour in (("0002.jpg", (200, 30, 30)), ("0001.jpg", (30, 30, 200))):
        image(root / "existence" / name, colour)
        question_file(root / "existence" / name.replace(".jpg", ".txt"), "red square" if name == "0002.jpg" else "bar")
    image(root / "artwork" / "images" / "10002.jpg", (30, 200, 30))
    question_file(root / "artwork" / "questions_answers_YN" / "10002.txt", "painting")
    image(root / "code_reasoning" / "0001.png", (230, 220, 40))
    question_file(root / "code_reasoning" / "0001.txt", "python code")
    return root


def test_reader_of_the_release_layout(tmp_path):
    split = read_mme(DataConfig(task="mme", path=str(make_release(tmp_path / "MME"))), "test")
    assert split.missing == tuple(t for t in SUBTASKS if t not in ("existence", "artwork", "code_reasoning"))
    assert [s.sample_id for s in split.samples] == [
        "existence/0001.jpg/0", "existence/0001.jpg/1", "existence/0002.jpg/0", "existence/0002.jpg/1",
        "artwork/10002.jpg/0", "artwork/10002.jpg/1", "code_reasoning/0001.png/0", "code_reasoning/0001.png/1"]
    assert [s.gt for s in split.samples[:2]] == ["Yes", "No"]
    assert split.samples[0].question == "Is there a bar in the image? Please answer yes or no."
    assert split.images() == [("existence/0001.jpg", "existence/0001.jpg"),
                              ("existence/0002.jpg", "existence/0002.jpg"),
                              ("artwork/10002.jpg", "artwork/images/10002.jpg"),
                              ("code_reasoning/0001.png", "code_reasoning/0001.png")]
    assert split.image_root == tmp_path / "MME" and split.subtasks == ["existence", "artwork", "code_reasoning"]
    (tmp_path / "MME" / "existence" / "0001.txt").write_text("Is it?\tYes\n", encoding="utf-8")
    with pytest.raises(EimError, match="1 questions, not 2"):
        read_mme(DataConfig(path=str(tmp_path / "MME")), "test")
    (tmp_path / "MME" / "existence" / "0001.txt").write_text("Is it?\tYes\nIs it not?\tPerhaps\n", encoding="utf-8")
    with pytest.raises(EimError, match="0001.txt:2"):
        read_mme(DataConfig(path=str(tmp_path / "MME")), "test")
    with pytest.raises(EimError, match="no MME subtask folder"):
        read_mme(DataConfig(path=str(tmp_path)), "test")


def test_reader_of_answer_templates_and_an_image_root(tmp_path):
    root = make_release(tmp_path / "MME")
    templates = tmp_path / "Your_Results"
    templates.mkdir()
    (templates / "artwork.txt").write_text("10002.jpg\tIs it a painting?\tYes\n10002.jpg\tIs it glass?\tNo\n",
                                           encoding="utf-8")
    (templates / "existence.txt").write_text("0002.jpg\tIs it red?\tYes\tyes\n0002.jpg\tIs it blue?\tNo\tno\n",
                                             encoding="utf-8")
    split = read_mme(DataConfig(path=str(templates), image_root=str(root)), "test")
    assert [(s.subtask, s.image, s.question, s.gt) for s in split.samples] == [
        ("existence", "existence/0002.jpg", "Is it red?", "Yes"),
        ("existence", "existence/0002.jpg", "Is it blue?", "No"),
        ("artwork", "artwork/images/10002.jpg", "Is it a painting?", "Yes"),
        ("artwork", "artwork/images/10002.jpg", "Is it glass?", "No")]
    with pytest.raises(EimError, match="image 0002.jpg not found") as missing:
        read_mme(DataConfig(path=str(templates)), "test")  # the images are not next to the templates
    assert f"{templates / 'existence.txt'}:1" in missing.value.line()
    (templates / "artwork.txt").write_text("10002.jpg\tIs it a painting?\tYes\n", encoding="utf-8")
    with pytest.raises(EimError, match="1 lines, not a positive even number"):
        read_mme(DataConfig(path=str(templates), image_root=str(root)), "test")


# ---------------------------------------------------------------- prompts and generation

def test_prompts_by_family():
    question = "Is there a  train? Please answer yes or no."
    assert prompt(question, "lavin") == "Instruction: Is there a train? Please answer yes or no.\nResponse:"
    assert prompt(question, "clipcap") == prompt(question, "lavin")
    assert prompt(question, "llama-adapter") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request "
        "using a single word or phrase.\n\n### Instruction:\nIs there a  train? Please answer yes or no.\n\n"
        "### Response:")
    adapter = load_config(overrides=["model.family=llama-adapter"])
    assert mme_length(adapter) == 30 and mme_length(load_config(overrides=["model.family=lavin"])) == 20
    assert mme_length(load_config(overrides=["model.family=lavin", "eval.max_new_tokens=7"])) == 7
    assert clean_prediction(" Yes, there is\na train.\tOK ") == "yes, there isa train. ok"


def test_format_and_eval_data(tmp_path):
    split = read_mme(DataConfig(path=str(make_release(tmp_path / "MME"))), "test")
    adapter = load_config(overrides=["model.family=llama-adapter"])
    assert formatter(TASK, adapter)(split.samples[1]) == (prompt(split.samples[1].question, "llama-adapter"), "No")
    assert TASK.format(split.samples[0]) == (prompt(split.samples[0].question), "Yes")
    data = DataConfig(task="scienceqa", path="data/sqa", image_root="data/sqa/images")
    assert TASK.eval_data(data, {"mme_root": tmp_path / "MME"}).path == str(tmp_path / "MME")
    assert TASK.eval_data(data, {"mme_root": tmp_path}).image_root == ""
    assert TASK.eval_data(data, {"spice_jars": None}) is data


@pytest.fixture(scope="module")
def lavin(tmp_path_factory) -> dict:
    """A tiny LaVIN (random weights): its overrides and the model built from them."""
    from eimctl.models.factory import build_model

    root = tmp_path_factory.mktemp("mme-lavin")
    words = ["Instruction", "Response", "Image", ":"]
    overrides = [f"model.clip.name={tiny.make_tiny_clip(root / 'clip', layers=2)}", "model.clip.pretrained=",
                 f"model.lm.name={tiny.make_tiny_llama(root / 'llama', layers=2, words=words)}",
                 "model.family=lavin", "model.clip.tokens=cls_every_k", "model.clip.cls_every=2",
                 "model.lavin.adapter_dropout=0", "eval.batch_size=3", "eval.max_new_tokens=4"]
    config = load_config(overrides=overrides)
    model, _ = build_model(config, groups={"st", "lm_adapters", "clip_adapters", "modality"}, losses={"base"})
    model.eval().requires_grad_(False)
    return {"overrides": overrides, "config": config, "model": model, "root": root}


def test_predict_write_score_with_a_tiny_lavin(tmp_path, lavin):
    config, model = lavin["config"], lavin["model"]
    config = replace(config, data=TASK.eval_data(config.data, {"mme_root": make_release(tmp_path / "MME")}))
    split = TASK.read(config.data, config.eval.split)
    predictions = TASK.predict(model, config, split, torch.device("cpu"), tmp_path / "cache", False)
    assert list(predictions) == [s.sample_id for s in split.samples]
    assert all(p["prediction"] == clean_prediction(p["text"]) for p in predictions.values())
    assert list((tmp_path / "cache").glob("features-mme-*.npy"))
    again = TASK.predict(model, config, split, torch.device("cpu"), tmp_path / "cache", False)
    assert again == predictions  # greedy: the same answers, from the cached features
    written = TASK.write(tmp_path / "out", predictions)
    assert written == ["existence.txt", "artwork.txt", "code_reasoning.txt"]
    result = TASK.score(predictions, split, config, {})
    from_files = score_answer_dir(tmp_path / "out", tasks=["existence", "artwork", "code_reasoning"])
    assert result["metrics"] == from_files["metrics"] and result["max_new_tokens"] == 4
    first = (tmp_path / "out" / "existence.txt").read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert first[:3] == ["0001.jpg", "Is there a bar in the image? Please answer yes or no.", "Yes"]
    assert result["controls"]["always_yes"]["metrics"] == {"perception": 100.0, "cognition": 50.0, "existence": 50.0,
                                                           "artwork": 50.0, "code_reasoning": 50.0}
    assert "not scored (absent)" in "\n".join(TASK.summary(result))
    with pytest.raises(EimError, match="no prediction for MME question existence/0001.jpg/0"):
        TASK.score({k: v for k, v in predictions.items() if k != "existence/0001.jpg/0"}, split, config, {})


def test_evaluate_a_trained_stage_on_an_mme_root(tmp_path, lavin):
    """`eimctl evaluate mme --mme-root`: the stage's own data set is captions; MME comes from the option."""
    data = tiny.make_tiny_data(tmp_path / "data", n_train=8, n_val=2, n_test=2)
    common = [*lavin["overrides"], f"data.path={data}", "train.batch_size=4", "train.warmup_steps=0",
              "train.max_steps=1", "train.checkpoint_every=100", f"eim.queues_dir={tmp_path / 'queues'}"]
    run, mme = tmp_path / "run", make_release(tmp_path / "MME")
    trained = runner.invoke(app, ["train-stage", "base", "--run-dir", str(run), "-q", *common])
    assert trained.exit_code == 0, trained.output
    done = runner.invoke(app, ["evaluate", "mme", "--run-dir", str(run), "--stage", "base", "--mme-root", str(mme)])
    assert done.exit_code == 0, done.output
    assert "base on MME (3 subtasks)" in done.output and "perception" in done.output
    out = run / "eval" / "base-mme"
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["outputs"]) == ["artwork.txt", "code_reasoning.txt", "existence.txt", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == str(mme) and metrics["n"] == 8 and metrics["family"] == "lavin"
    assert "MME" in metrics["diagnostics"]["skipped"]  # the stage's val split is captions, not MME
    assert score_answer_dir(out, tasks=["existence", "artwork", "code_reasoning"])["metrics"] == metrics["metrics"]
    again = runner.invoke(app, ["evaluate", "mme", "--run-dir", str(run), "--stage", "base", "--mme-root", str(mme)])
    assert again.exit_code == 0 and "skipping" in again.output
    unset = runner.invoke(app, ["evaluate", "mme", "--run-dir", str(run), "--stage", "base"])
    assert unset.exit_code == 1 and "no MME subtask folder" in unset.output and "--mme-root" in unset.output
