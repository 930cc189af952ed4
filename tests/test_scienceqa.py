"""The scienceqa task: reader, prompt formats (golden strings), answer parsing, the official scorer
(against hand-computed tables) and the score-only CLI path."""
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eimctl.cli import app
from eimctl.config import DataConfig, config_fingerprint, load_config
from eimctl.evaluate.scienceqa_scoring import (control_results, official_scores, parse_answer, read_results,
                                               write_results)
from eimctl.runtime.errors import EimError
from eimctl.tasks import formatter, get_task
from eimctl.tasks.scienceqa_data import make_sample, read_scienceqa
from eimctl.tasks.scienceqa_prompts import format_problem

TASK = get_task("scienceqa")


def problem(**fields) -> dict:
    row = {"question": "Which is it?", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
           "task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "physics",
           "category": "Velocity", "skill": "Compare", "lecture": "", "solution": "", "split": "test"}
    row.update(fields)
    return row


NORTH = problem(question="Which of these states is farthest north?",
                choices=["West Virginia", "Louisiana", "Arizona", "Oklahoma"], answer=0, hint="",
                lecture="Maps have four cardinal directions.\nNorth is up.",
                solution="West Virginia is farthest north.")
NORTH_INPUT = ("Question: Which of these states is farthest north?\nContext: N/A\n"
               "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\n")
NORTH_WHY = "Maps have four cardinal directions.\\nNorth is up. West Virginia is farthest north."


# ---------------------------------------------------------------- prompt formats

def test_golden_qcm_ale_lavin():
    instruction, response = format_problem(make_sample("1", NORTH), "QCM-ALE", "lavin", False)
    assert instruction == NORTH_INPUT + "Response:"
    assert response == "The answer is A. BECAUSE: " + NORTH_WHY
    assert TASK.format(make_sample("1", NORTH)) == (instruction, response)   # the section's defaults


def test_qcm_a_and_cqm_a():
    sample = make_sample("1", problem(question="Q?", choices=["a", "b", "c"], answer=2, hint="It is warm."))
    assert format_problem(sample, "QCM-A", "lavin") == (
        "Question: Q?\nContext: It is warm.\nOptions: (A) a (B) b (C) c\nResponse:", "The answer is C.")
    assert format_problem(sample, "CQM-A", "lavin") == (
        "Context: It is warm.\nQuestion: Q?\nOptions: (A) a (B) b (C) c\nResponse:", "The answer is C.")


def test_other_outputs_follow_the_upstream_table():
    sample = make_sample("1", problem(answer=1, lecture="Lec.", solution="Sol."))
    outputs = {"QCM-LEA": "Lec. Sol. The answer is B.", "QCM-ELA": "Sol. Lec. The answer is B.",
               "QCM-LA": "Lec. The answer is B.", "QCM-EA": "Sol. The answer is B.",
               "QCM-AEL": "The answer is B. BECAUSE: Sol. Lec.",
               "QCM-AL": "The answer is B. BECAUSE: Sol.",     # sic: upstream's AL gives the solution
               "QCM-AE": "The answer is B. BECAUSE: Lec."}
    for prompt_format, expected in outputs.items():
        assert format_problem(sample, prompt_format, "lavin")[1] == expected, prompt_format
    assert format_problem(sample, "QCMLE-A", "lavin")[0] == (
        "Question: Which is it?\nContext: N/A\nOptions: (A) x (B) y\nBECAUSE: Lec. Sol.\nResponse:")
    assert format_problem(sample, "QCLM-A", "lavin")[0] == (
        "Question: Which is it?\nContext: N/A\nBECAUSE: Lec.\nOptions: (A) x (B) y\nResponse:")
    with pytest.raises(EimError, match="unknown ScienceQA prompt format 'QCX-A'"):
        format_problem(sample, "QCX-A", "lavin")
    with pytest.raises(EimError, match="unknown ScienceQA prompt format 'QCM-AX'"):
        format_problem(sample, "QCM-AX", "lavin")


def test_scienceqa_template_ends_with_answer_and_drops_a_trailing_because():
    instruction, response = format_problem(make_sample("1", NORTH), "QCM-ALE", "scienceqa")
    assert instruction == NORTH_INPUT + "Answer:"
    assert instruction + response == NORTH_INPUT + "Answer: The answer is A. BECAUSE: " + NORTH_WHY
    empty = make_sample("2", problem(answer=1))
    assert format_problem(empty, "QCM-ALE", "scienceqa")[1] == " The answer is B."
    # "Answer:   The" (empty lecture and solution): one replace pass leaves two spaces, as upstream's does
    assert format_problem(empty, "QCM-LEA", "scienceqa")[1] == "  The answer is B."


def test_lavin_keeps_the_empty_because_by_default():
    empty = make_sample("2", problem(answer=1))
    assert format_problem(empty, "QCM-ALE", "lavin")[1] == "The answer is B. BECAUSE:"
    assert format_problem(empty, "QCM-ALE", "lavin", keep_empty_because=False)[1] == "The answer is B."
    only_solution = make_sample("3", problem(solution="Because."))
    assert format_problem(only_solution, "QCM-ALE", "lavin")[1] == "The answer is A. BECAUSE: Because."


def test_newlines_double_spaces_and_context():
    sample = make_sample("1", problem(question="Two  spaces?", hint="Hint.", lecture="a\nb", solution="c\n\nd"))
    instruction, response = format_problem(sample, "QCM-ALE", "lavin")
    assert instruction.startswith("Question: Two spaces?\nContext: Hint.\n")
    assert response == "The answer is A. BECAUSE: a\\nb c\\n\\nd"       # newlines become the two characters \n
    assert "Context: N/A\n" in format_problem(make_sample("2", problem()), "QCM-A", "lavin")[0]


def test_caption_only_with_use_caption():
    with_hint = make_sample("1", problem(hint="Hint.", image="image.png"), caption="A red ball.")
    no_hint = make_sample("2", problem(image="image.png"), caption="A red ball.")
    assert "Context: Hint.\n" in format_problem(with_hint, "QCM-A", "lavin", use_caption=False)[0]
    assert "Context: Hint. A red ball.\n" in format_problem(with_hint, "QCM-A", "lavin", use_caption=True)[0]
    assert "Context: N/A\n" in format_problem(no_hint, "QCM-A", "lavin", use_caption=False)[0]
    assert "Context: A red ball.\n" in format_problem(no_hint, "QCM-A", "lavin", use_caption=True)[0]


def test_config_section_drives_the_format():
    config = load_config(overrides=["data.task=scienceqa", "scienceqa.prompt_format=CQM-A",
                                    "scienceqa.template=scienceqa", "scienceqa.use_caption=true"])
    sample = make_sample("1", problem(image="image.png"), caption="A cat.")
    assert formatter(TASK, config)(sample) == (
        "Context: A cat.\nQuestion: Which is it?\nOptions: (A) x (B) y\nAnswer:", " The answer is A.")
    assert formatter(get_task("coco"), config) == get_task("coco").format
    with pytest.raises(EimError, match="scienceqa.template: 'gpt' is not one of"):
        load_config(overrides=["scienceqa.template=gpt"])
    with pytest.raises(EimError, match="scienceqa.parse: 'loose' is not one of"):
        load_config(overrides=["scienceqa.parse=loose"])
    default = load_config(overrides=["data.task=scienceqa"])
    assert config_fingerprint(default) != config_fingerprint(config)     # the prompt format shapes training
    coco = load_config()
    assert config_fingerprint(coco) == config_fingerprint(load_config(overrides=["scienceqa.template=scienceqa"]))


# ---------------------------------------------------------------- answer parsing

@pytest.mark.parametrize("text, mode, letter", [
    ("The answer is B. BECAUSE: it is.", "official", 1),
    ("The answer is Bx", "official", 1),                      # the unescaped "." matches any character
    ("  The answer is C.\n", "official", 2),                  # official strips first
    ("The answer is B ", "lavin", 1),                         # LaVIN does not strip: the space follows B
    ("The answer is B. Then The answer is C.", "lavin", 1),   # LaVIN: the first of two matches
])
def test_parse_letters(text, mode, letter):
    assert parse_answer(text, 4, mode, random.Random(0)) == (letter, False)


@pytest.mark.parametrize("text, mode", [
    ("The answer is B", "official"), ("The answer is B", "lavin"),       # nothing after the letter
    ("The answer is B\n", "official"), ("The answer is B\n", "lavin"),   # "." does not match a newline
    ("The answer is B ", "official"),                                    # stripped, then nothing follows
    ("The answer is B. Then The answer is C.", "official"),             # two matches: FAILED
    ("the answer is b.", "official"), ("the answer is b.", "lavin"),     # case matters
    ("The answer is (B).", "official"), ("", "lavin"),
    ("The answer is E.", "official"), ("The answer is Z.", "lavin"),     # beyond the 3 choices
])
def test_parse_failures_fall_back_to_a_seeded_random_index(text, mode):
    index, failed = parse_answer(text, 3, mode, random.Random(10))
    assert failed and index == random.Random(10).choice(range(3))


def test_random_fallback_consumes_the_rng_in_problem_order():
    rng, reference = random.Random(10), random.Random(10)
    texts = [("nothing", 5), ("The answer is A.", 2), ("The answer is D.", 3), ("FAILED", 4)]
    got = [parse_answer(text, n, "official", rng) for text, n in texts]
    expected = [(reference.choice(range(5)), True), (0, False), (reference.choice(range(3)), True),
                (reference.choice(range(4)), True)]
    assert got == expected
    with pytest.raises(EimError, match="unknown answer parsing mode"):
        parse_answer("The answer is A.", 2, "llava", rng)


# ---------------------------------------------------------------- the official scorer

# Five test problems (and one train problem, never scored). Hand-computed below.
ROWS = {
    "1": problem(subject="natural science", grade="grade3", hint="h", image="image.png", topic="physics", answer=0),
    "2": problem(subject="natural science", grade="grade8", image="image.png", topic="biology",
                 choices=["a", "b", "c"], answer=1),
    "3": problem(subject="social science", grade="grade5", topic="geography", choices=["a", "b", "c", "d"], answer=2),
    "4": problem(subject="social science", grade="grade2", hint="ctx", topic="geography", answer=0),
    "5": problem(subject="natural science", grade="grade7", topic="optics", choices=list("abcde"), answer=1),
    "6": problem(subject="language science", grade="grade1", topic="grammar", split="train"),
}
TEST_ROWS = {qid: row for qid, row in ROWS.items() if row["split"] == "test"}
# correct: 1, 2 (given as a string), 4; wrong: 3, 5
RESULTS = {"1": 0, "2": "1", "3": 0, "4": 0, "5": 3}
EXPECTED = {
    "acc_natural": "66.67",      # 1, 2 of 1, 2, 5
    "acc_social": "50.00",       # 4 of 3, 4
    "acc_language": -1,          # no test problem
    "acc_has_text": "100.00",    # 1, 4 (1 also has an image)
    "acc_has_image": "100.00",   # 1, 2
    "acc_no_context": "0.00",    # 3, 5
    "acc_grade_1_6": "66.67",    # 1, 4 of 1, 3, 4
    "acc_grade_7_12": "50.00",   # 2 of 2, 5
    "acc_average": "60.00",      # 3 / 5
    "acc_physics": "100.00", "acc_biology": "100.00", "acc_geography": "50.00",
    "acc_optics": "0.00",        # not an official topic: a key of its own
    "acc_grammar": -1,           # official topic, only in train
    "acc_chemistry": -1,
}


def test_official_table_by_hand():
    scores = official_scores(TEST_ROWS, RESULTS)
    assert {key: scores[key] for key in EXPECTED} == EXPECTED
    assert len(scores) == 9 + 26 + 1     # the main keys, the 26 official topics, one extra topic


def test_average_denominator_is_len_results():
    scores = official_scores(TEST_ROWS, {**RESULTS, "999": 0})   # an extra qid counts in the denominator only
    assert scores["acc_average"] == "50.00" and scores["acc_natural"] == "66.67"


def test_bad_predictions_name_the_qid():
    with pytest.raises(EimError, match="no prediction for test problem 4"):
        official_scores(TEST_ROWS, {k: v for k, v in RESULTS.items() if k != "4"})
    with pytest.raises(EimError, match="prediction 'B' for problem 3 is not an answer index"):
        official_scores(TEST_ROWS, {**RESULTS, "3": "B"})


def test_controls():
    controls = control_results(TEST_ROWS, seed=3)
    assert controls["always_a"] == {qid: 0 for qid in TEST_ROWS}
    assert official_scores(TEST_ROWS, controls["always_a"])["acc_average"] == "40.00"   # 1 and 4
    rng = random.Random(3)
    assert controls["random"] == {qid: rng.choice(range(len(row["choices"]))) for qid, row in TEST_ROWS.items()}


def test_results_files_official_and_bare(tmp_path: Path):
    official, bare = tmp_path / "official.json", tmp_path / "bare.json"
    write_results(official, {"1": 0, "2": 2}, {"1": "The answer is A.", "2": "?"}, {"1": 0, "2": 1})
    written = json.loads(official.read_text())
    assert written["correct"] == 1 and written["count"] == 2 and written["acc"] == 50.0
    assert written["outputs"]["2"] == "?"
    assert read_results(official) == {"1": 0, "2": 2}
    bare.write_text(json.dumps({"1": "0", "2": 2}))
    assert read_results(bare) == {"1": "0", "2": 2}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(EimError, match="not a ScienceQA results file"):
        read_results(tmp_path / "bad.json")


# ---------------------------------------------------------------- reader

def write_dataset(folder: Path, rows: dict, splits: dict, captions: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "problems.json").write_text(json.dumps(rows))
    (folder / "pid_splits.json").write_text(json.dumps(splits))
    if captions is not None:
        (folder / "captions.json").write_text(json.dumps({"model": "m", "captions": captions}))
    return folder


def test_reader_order_images_and_captions(tmp_path: Path):
    folder = write_dataset(tmp_path / "sqa", ROWS, {"test": ["4", "1", "2", "3", "5"], "train": ["6"]},
                           {"1": "A ball.", "2": "A cell."})
    split = TASK.read(DataConfig(task="scienceqa", path=str(folder)), "test")
    assert [s.sample_id for s in split.samples] == ["4", "1", "2", "3", "5"]
    assert split.images() == [("1", "test/1/image.png"), ("2", "test/2/image.png")]
    assert split.image_root == folder / "images"
    first, image = split.samples[0], split.samples[1]
    assert (first.image, first.image_id, first.has_image) == (None, "", False)
    assert (image.caption, image.has_image, image.choices) == ("A ball.", True, ("x", "y"))
    assert TASK.clip_text(image) == "A ball."
    assert TASK.clip_text(replace(first, solution="s" * 500)) == "s" * 200
    train = read_scienceqa(DataConfig(path=str(folder / "problems.json"), image_root="/imgs"), "train")
    assert train.image_root == Path("/imgs") and train.fingerprint != split.fingerprint
    with pytest.raises(EimError, match="no split 'minival'"):
        read_scienceqa(DataConfig(path=str(folder)), "minival")


@pytest.mark.parametrize("change, message", [
    ({"answer": 2}, "answer 2 is not an index into its 2 choices"),
    ({"answer": True}, "answer True is not an index"),
    ({"choices": ["only"]}, "choices must be a list of 2 to 5 strings"),
    ({"choices": ["a", 2]}, "choices must be a list of 2 to 5 strings"),
    ({"choices": list("abcdef"), "answer": 0}, "choices must be a list of 2 to 5 strings"),
    ({"hint": None}, "field(s) hint must be strings"),
    ({"image": ""}, "image must be a file name or null"),
])
def test_reader_refuses_a_bad_row_naming_file_and_qid(tmp_path: Path, change, message):
    folder = write_dataset(tmp_path, {**ROWS, "7": problem(**change)}, {"test": ["1", "7"]})
    with pytest.raises(EimError) as caught:
        read_scienceqa(DataConfig(path=str(folder)), "test")
    assert message in caught.value.what and "problem 7" in caught.value.what
    assert caught.value.where == f"{folder / 'problems.json'}, problem 7"


def test_reader_refuses_missing_fields_and_unknown_qids(tmp_path: Path):
    row = problem()
    del row["lecture"], row["split"]
    folder = write_dataset(tmp_path / "a", {"1": row}, {"test": ["1"]})
    with pytest.raises(EimError, match="problem 1 lacks field\\(s\\) lecture, split"):
        read_scienceqa(DataConfig(path=str(folder)), "test")
    folder = write_dataset(tmp_path / "b", ROWS, {"test": ["1", "42"]})
    with pytest.raises(EimError, match="names qid 42, which problems.json lacks") as caught:
        read_scienceqa(DataConfig(path=str(folder)), "test")
    assert str(folder / "pid_splits.json") in caught.value.where


# ---------------------------------------------------------------- the task's score, write, summary

def test_task_score_write_and_summary(tmp_path: Path):
    folder = write_dataset(tmp_path / "sqa", ROWS, {"test": ["1", "2", "3", "4", "5"]})
    config = load_config(overrides=["data.task=scienceqa", f"data.path={folder}", "scienceqa.parse_seed=3"])
    split = TASK.read(config.data, "test")
    predictions = {qid: {"index": int(index), "text": f"The answer is {'AB'[int(index) % 2]}.",
                         "failed": qid == "5", "answer": ROWS[qid]["answer"]} for qid, index in RESULTS.items()}
    result = TASK.score(predictions, split, config, {})
    assert result["official"]["acc_average"] == "60.00" and result["metrics"]["Avg"] == 60.0
    assert "LAN" not in result["metrics"] and result["metrics"]["NAT"] == 66.67
    assert result["parse_failures"] == 1 and result["n"] == 5 and result["prompt_format"] == "QCM-ALE"
    assert result["controls"]["always_a"]["official"]["acc_average"] == "40.00"
    TASK.write(tmp_path, predictions)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["results"]["2"] == 1 and written["correct"] == 3 and written["count"] == 5
    lines = TASK.summary({**result, "stage": "base"})
    assert lines[0].startswith("base on test: Avg 60.00")
    assert "NAT 66.67" in lines[1] and "LAN -" in lines[1] and "always-A 40.00" in lines[2]


# ---------------------------------------------------------------- score-only CLI

def test_cli_scores_a_results_file(tmp_path: Path):
    problems = write_dataset(tmp_path / "sqa", ROWS, {}) / "problems.json"
    results = tmp_path / "preds.json"
    results.write_text(json.dumps(RESULTS))          # LaVIN's bare format, with a string index
    out = tmp_path / "scores"
    runner = CliRunner()
    done = runner.invoke(app, ["evaluate", "scienceqa", "--problems", str(problems), "--results", str(results),
                               "--out", str(out)])
    assert done.exit_code == 0, done.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert {key: metrics["official"][key] for key in EXPECTED} == EXPECTED
    assert "Avg 60.00" in done.output and "4241" in metrics["note"]

    results.write_text(json.dumps({"results": {k: v for k, v in RESULTS.items() if k != "4"}}))
    failed = runner.invoke(app, ["evaluate", "scienceqa", "--problems", str(problems), "--results", str(results),
                                 "--out", str(out)])
    assert failed.exit_code == 1
    assert "no prediction for test problem 4" in failed.output and "Traceback" not in failed.output

    incomplete = runner.invoke(app, ["evaluate", "scienceqa", "--results", str(results)])
    assert incomplete.exit_code == 1 and "--results needs --problems and --out" in incomplete.output


def test_expected_chance_by_hand():
    from eimctl.evaluate.scienceqa_scoring import expected_chance
    rows = {"1": problem(choices=["a", "b"], answer=0, hint="h"), "2": problem(choices=["a", "b", "c", "d"], answer=1)}
    table = expected_chance(rows)
    assert table["acc_average"] == "37.50"          # (1/2 + 1/4) / 2
    assert table["acc_has_text"] == "50.00" and table["acc_no_context"] == "25.00"
    assert table["acc_grade_1_6"] == "37.50" and table["acc_grade_7_12"] == -1 and table["acc_has_image"] == -1
