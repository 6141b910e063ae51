"""UEval end to end: eval run with the test profile, eval score with a scripted judge over HTTP,
every figure checked against values worked out by hand, a rescore that asks nothing new."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eval_fixtures import HOST, JUDGE_MODEL, image_urls, invoke, judge_server, texts, ueval_clone
from interleave_thinker.evaluation import judge as judge_module
from interleave_thinker.evaluation.ueval import UEval

pytestmark = pytest.mark.allow_hosts([HOST])

ITEMS = [
    # open task, two images; text 1 of 3 met ("not sure" is not met), images 2 of 2
    {"id": "a1", "prompt": "Paint a red barn. Add a tractor.", "task": "art",
     "text_rubrics": ["yes: names the barn", "no: names a cow", "unsure: sets a mood"],
     "image_rubrics": ["yes: barn visible", "yes: tractor visible"]},
    # closed task whose only image file is deleted after the run: image rubrics unmet, unjudged
    {"id": "b2", "prompt": "Sketch the solar system.", "task": "space",
     "text_rubrics": ["yes: names the sun"], "image_rubrics": ["no: shows nine planets", "yes: sun"]},
    # a question only: the answer is text, so its image rubric is unmet without a judge call
    {"id": "c3", "prompt": "Why do leaves fall?", "task": "life",
     "text_rubrics": ["yes: mentions autumn", "yes: mentions chlorophyll"],
     "image_rubrics": ["yes: shows a tree"]},
    # the judge never gives a readable verdict on one rubric: the item is left out
    {"id": "d4", "prompt": "Draw a bar chart of rainfall.", "task": "paper",
     "text_rubrics": ["yes: names months", "broken: cites a source"], "image_rubrics": ["yes: bars"]},
    # removed from the outputs after the run: no answer at all, every rubric unmet
    {"id": "e5", "prompt": "Draw the moon phases.", "task": "space",
     "text_rubrics": ["yes: names phases"], "image_rubrics": ["yes: shows a crescent"]},
    # closed task with its image: the closed template, without the text answer
    {"id": "f6", "prompt": "Draw a diagram of a water pump.", "task": "diagram",
     "text_rubrics": ["no: explains valves"], "image_rubrics": ["yes: shows a pipe"]},
]


class Judge:
    """Answers by the rubric's first word; 'broken' rubrics get an unreadable reply unless fixed."""

    def __init__(self) -> None:
        self.fixed = False

    def __call__(self, body: dict[str, Any]) -> str:
        rubric = texts(body).split("Criterion to check:\n")[-1].strip()
        verdict = rubric.split(":")[0]
        if verdict == "broken" and not self.fixed:
            return "I would rather not say."
        value = {"yes": "true", "no": "false", "unsure": '"not sure"', "broken": "true"}[verdict]
        # Prose and a code fence around the JSON, as judges write.
        return f'Looking at it.\n```json\n{{"criteria_met": {value}}}\n```'


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judge_module, "RETRY_DELAY_S", 0.0)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("INTERLEAVE_API_KEY", raising=False)


def _generate(tmp_path: Path) -> Path:
    data = tmp_path / "ueval.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out = tmp_path / "run"
    result = invoke("eval", "run", "ueval", "--data", str(data), "--out", str(out),
                    "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


def _score(out: Path, clone: Path, url: str, *extra: str) -> dict[str, Any]:
    result = invoke("eval", "score", "ueval", "--out", str(out), "--judge", JUDGE_MODEL,
                    "--judge-url", url, "--bench-repo", str(clone), *extra)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out / "scores.json")
    return json.loads((out / "scores.json").read_text())


def test_ueval_run_score_and_rescore(tmp_path: Path) -> None:
    out = _generate(tmp_path)
    outputs = json.loads((out / "outputs.json").read_text())
    by_id = {row["id"]: row for row in outputs}
    # The official scorer's input: every item, its joined text and its images (relative to OUT).
    assert set(by_id) == {"a1", "b2", "c3", "d4", "e5", "f6"}
    assert set(by_id["a1"]) == {"id", "text_answer", "image_answer"}
    assert by_id["a1"]["image_answer"] == ["images/a1/step1.png", "images/a1/step2.png"]
    assert all((out / path).is_file() for row in outputs for path in row["image_answer"])
    assert by_id["c3"]["image_answer"] == [] and "leaves" in by_id["c3"]["text_answer"]
    # A rerun resumes: every item is finished, so nothing is drawn again.
    rerun = invoke("eval", "run", "ueval", "--data", str(tmp_path / "ueval.jsonl"), "--out", str(out),
                   "--profile", "test", "--size", "64x64")
    assert rerun.exit_code == 0 and "0 generator backend calls" in rerun.output

    (out / by_id["b2"]["image_answer"][0]).unlink()
    (out / "outputs.json").write_text(json.dumps([row for row in outputs if row["id"] != "e5"]))
    clone = ueval_clone(tmp_path / "UEval")
    script = Judge()
    with judge_server(script) as server:
        scores = _score(out, clone, server.url)
        first_calls = len(server.requests)

        # By hand. Item rates: a1 text 1/3, image 2/2; b2 text 1/1, image 0/2 (file gone);
        # c3 text 2/2, image 0/1 (no image); e5 0 and 0 (no answer); f6 text 0/1, image 1/1;
        # d4 left out. Tasks: art (1/3 + 1)/2, space ((1 + 0)/2 + (0 + 0)/2)/2, life (1 + 0)/2,
        # diagram (0 + 1)/2; overall the mean of the four.
        art, space, life, diagram = (1 / 3 + 1) / 2 * 100, 25.0, 50.0, 50.0
        assert scores["categories"] == pytest.approx(
            {"art": art, "space": space, "life": life, "diagram": diagram}, abs=1e-9)
        assert scores["overall"] == pytest.approx((art + space + life + diagram) / 4, abs=1e-9)
        assert scores["details"]["text_avg_rate"] == pytest.approx((1 / 3 + 1 + 1 + 0 + 0) / 5, abs=1e-9)
        assert scores["details"]["image_avg_rate"] == pytest.approx((1 + 0 + 0 + 0 + 1) / 5, abs=1e-9)
        assert scores["details"]["not_sure"] == 1
        assert (scores["benchmark"], scores["protocol"]) == ("ueval", "ueval")
        assert scores["judge"] == f"openai-chat:{JUDGE_MODEL}@{server.url}"
        assert (scores["items"], scores["judged"], scores["missing"], scores["scored"]) == (6, 4, 1, 5)
        assert scores["judge_failures"] == 1 and scores["failed_items"] == ["d4"]
        # Calls: a1 3+2, b2 1 (no image left), c3 2, d4 2 + the broken one 3 times, f6 1+1.
        assert first_calls == 5 + 1 + 2 + (2 + 3) + 2

        # Closed tasks (d4 paper, f6 diagram) are judged on the image without the text answer.
        closed = [body for body in server.requests if "CLOSED-IMAGE-CHECK" in texts(body)]
        assert len(closed) == 2 and all("A: " not in texts(body) for body in closed)
        assert all(len(image_urls(body)) == 1 for body in closed)
        open_image = [body for body in server.requests if "OPEN-IMAGE-CHECK" in texts(body)]
        assert len(open_image) == 2 and all(len(image_urls(body)) == 2 for body in open_image)
        assert all("A: Paint a red barn" in texts(body) for body in open_image)
        assert all(texts(body, "system") == "Grader of answers. Reply with JSON." for body in server.requests)
        assert all(body["model"] == JUDGE_MODEL and body["temperature"] == 0 for body in server.requests)

        # Rescore keeping the failure: every answer comes from the cache, no call at all.
        again = _score(out, clone, server.url, "--keep-failures")
        assert len(server.requests) == first_calls
        assert again["overall"] == scores["overall"] and again["judge_calls"] == 0
        assert again["judge_cached"] == first_calls - 3 + 1

        # The judge is fixed: only the failed criterion is asked again, and d4 joins the metric.
        script.fixed = True
        fixed = _score(out, clone, server.url)
        assert len(server.requests) == first_calls + 1
        paper = (2 / 2 + 1 / 1) / 2 * 100
        assert fixed["categories"]["paper"] == pytest.approx(paper, abs=1e-9)
        assert fixed["overall"] == pytest.approx((art + space + life + diagram + paper) / 5, abs=1e-9)
        assert (fixed["judged"], fixed["judge_failures"], fixed["failed_items"]) == (5, 0, [])

    records = [json.loads(line) for line in (out / "scored-items.jsonl").read_text().splitlines()]
    a1 = next(record for record in records if record["id"] == "a1")
    assert a1["values"]["text_met"] == 1 and a1["values"]["image_met"] == 2
    assert a1["headline"] == pytest.approx((1 / 3 + 1) / 2 * 100)
    page = (out / "report.html").read_text()
    assert "names the barn" in page and "data:image/jpeg;base64," in page


def test_a_changed_answer_is_judged_again(tmp_path: Path) -> None:
    out = _generate(tmp_path)
    clone = ueval_clone(tmp_path / "UEval")
    with judge_server(Judge()) as server:
        _score(out, clone, server.url, "--keep-failures")
        before = len(server.requests)
        outputs = json.loads((out / "outputs.json").read_text())
        for row in outputs:
            if row["id"] == "c3":
                row["text_answer"] = "A different answer."
        (out / "outputs.json").write_text(json.dumps(outputs))
        _score(out, clone, server.url, "--keep-failures")
        # c3 has two text rubrics and no image: exactly those are asked again.
        assert len(server.requests) == before + 2


def test_model_text_in_the_report_is_escaped(tmp_path: Path) -> None:
    out = _generate(tmp_path)
    outputs = json.loads((out / "outputs.json").read_text())
    outputs[0]["text_answer"] = "<script>alert(1)</script>\x1b[31m"
    (out / "outputs.json").write_text(json.dumps(outputs))
    with judge_server(Judge()) as server:
        _score(out, ueval_clone(tmp_path / "UEval"), server.url, "--keep-failures")
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "\x1b" not in page
    assert re.search(r"Content-Security-Policy\" content=\"default-src 'none'", page)


def test_score_needs_the_clone_and_names_the_repository(tmp_path: Path) -> None:
    out = _generate(tmp_path)
    result = invoke("eval", "score", "ueval", "--out", str(out), "--judge", JUDGE_MODEL,
                    "--judge-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 1
    assert "zlab-princeton/UEval" in result.output and "--bench-repo" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ueval_eval.py").write_text('TEXT_TEMPLATE = "no placeholders here"\n')
    result = invoke("eval", "score", "ueval", "--out", str(out), "--judge", JUDGE_MODEL,
                    "--judge-url", "http://127.0.0.1:9/v1", "--bench-repo", str(broken))
    assert result.exit_code == 1 and "SYSTEM_INSTRUCTION" in result.output


def test_hugging_face_folders_and_older_copies_are_read(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    records = [
        {"id": "1", "prompt": "Draw a kite.", "task_type": "tech", "question_type": "open",
         "text_ref": "a kite", "text_rubrics": [{"criterion": "names a kite", "tags": []}],
         "image_rubrics": [{"criterion": "shows a kite", "tags": [], "type": "x"}]},
        {"id": "2", "prompt": "Draw a map.", "task_type": "space", "question_type": "closed",
         "text_ref": "a map", "text_rubrics": [], "image_rubrics": [{"criterion": "a map", "tags": [],
                                                                    "type": "x"}]},
    ]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    datasets.Dataset.from_list(records).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    for folder in (saved, snapshot):
        items = UEval().read_items(folder, None)
        assert [item.id for item in items] == ["1", "2"]
        assert items[0].data["text_rubrics"] == ["names a kite"]
        assert items[0].category == "tech" and items[1].data["question_type"] == "closed"
