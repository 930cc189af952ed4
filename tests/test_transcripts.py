"""The report's chat transcripts section."""
import json

from eimctl.evaluate.transcripts import transcripts_section


def test_transcripts_are_listed_per_run_and_stage(tmp_path):
    run = tmp_path / "lavin-eim"
    (run / "chat").mkdir(parents=True)
    turns = [{"instruction": "Describe the picture.", "image": "a/b.jpg", "response": "A red\ncircle."},
             {"instruction": "Opposite of big?", "image": None, "response": "small | tiny"}]
    (run / "chat" / "base-ie.jsonl").write_text("\n".join(json.dumps(t) for t in turns) + "\nnot json\n")
    lines = transcripts_section([run, tmp_path / "no-chat"])
    assert lines[0] == "## Chat transcripts" and "### lavin-eim / base-ie" in lines
    assert "- **Describe the picture.** (image `b.jpg`) → A red circle." in lines
    assert "- **Opposite of big?** (no image) → small \\| tiny" in lines and "- line 3: unreadable" in lines
    assert transcripts_section([tmp_path / "no-chat"]) == []
