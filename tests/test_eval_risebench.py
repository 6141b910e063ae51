"""RISEBench: input images go in with each request, outputs land in images/{category}/{index}.png,
and the judge's dimension scores give the accuracy and weighted scores the RISEBench rules say."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eval_fixtures import HOST, JUDGE_MODEL, image_urls, invoke, judge_server, picture, rise_clone, texts
from interleave_thinker.evaluation import judge as judge_module
from interleave_thinker.evaluation.judge import image_input
from interleave_thinker.evaluation.risebench import parse_final_score, weighted_score

pytestmark = pytest.mark.allow_hosts([HOST])

T, C, S, L = "temporal_reasoning", "causal_reasoning", "spatial_reasoning", "logical_reasoning"


def _item(index: str, category: str, instruction: str, number: int, **extra: object) -> dict[str, object]:
    return {"index": index, "category": category, "instruction": instruction,
            "image": f"{category}_images/{number}.png", **extra}


ITEMS = [
    _item("t1", T, "Age the apple by a week.", 1, reference="a wrinkled apple", subtask="Life Progression"),
    _item("t2", T, "Melt the snowman.", 2, reference="a puddle", consistency_free=True),
    _item("c1", C, "Drop the glass.", 1, reference="broken glass"),
    _item("c2", C, "Heat the ice.", 2, reference="water", reasoning_img=True),
    _item("s1", S, "Assemble the parts.", 1, reference_img="spatial_reasoning_images/1_ref.png"),
    _item("s2", S, "Stack the cubes.", 2, reference="a tower"),
    _item("l1", L, "Solve the sum.", 1, reference_txt="7"),
    _item("l2", L, "Finish the maze.", 2, reference_img="logical_reasoning_images/2_ref.png"),
    _item("l3", L, "Fill the grid.", 3, reference_img="logical_reasoning_images/3_ref.png"),
]
# (instruction, judge kind) -> the score printed; quality prompts carry no instruction, so the
# item is told by its output image.
REPLIES = {
    ("Age the apple by a week.", "consistency"): 5, ("Age the apple by a week.", "reasoning"): 5,
    ("Melt the snowman.", "reasoning"): 5,
    ("Drop the glass.", "consistency"): 5, ("Drop the glass.", "reasoning"): 4,
    ("Heat the ice.", "consistency"): 4, ("Heat the ice.", "reasoning-with-input"): 1,
    ("Assemble the parts.", "consistency"): 5, ("Assemble the parts.", "spatial-reasoning-ref"): 5,
    ("Solve the sum.", "consistency"): 1, ("Solve the sum.", "logic-reasoning"): 1,
    ("Finish the maze.", "consistency"): 1, ("Finish the maze.", "logic-reasoning-img"): 0,
    ("Fill the grid.", "consistency"): 1,
}
QUALITY = {"t1": 5, "t2": 5, "c1": 5, "c2": 3, "s1": 5}


def _data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    colors = iter([(40 * n % 255, 90, 200 - 15 * n) for n in range(20)])
    for item in ITEMS:
        for key in ("image", "reference_img"):
            if key in item:
                picture(folder / item[key], next(colors))
    path = folder / "data_total.json"
    path.write_text(json.dumps(ITEMS))
    return path


class Judge:
    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs  # base64 of each output image as the judge gets it -> item index

    def __call__(self, body: dict[str, Any]) -> str:
        text = texts(body)
        kind = re.search(r"KIND=(\S+)", text).group(1)
        task = re.search(r"TASK=<<(.*?)>>", text)
        if kind == "quality":
            item = self.outputs[image_urls(body)[-1].split(",", 1)[1]]
            score = QUALITY[item]
        elif (task.group(1), kind) in REPLIES:
            score = REPLIES[(task.group(1), kind)]
        else:
            return "Thinking about it, I cannot decide."
        return f"The picture shows it.\n**Final Score:** **{score}**"


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judge_module, "RETRY_DELAY_S", 0.0)


def test_risebench_run_layout_and_accuracy(tmp_path: Path) -> None:
    data = _data(tmp_path)
    out = tmp_path / "run"
    result = invoke("eval", "run", "risebench", "--data", str(data), "--out", str(out),
                    "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    for item in ITEMS:
        assert (out / "images" / item["category"] / f"{item['index']}.png").is_file(), item["index"]
    # Each request carried its input image (stored in the run's image store).
    manifest = (out / "runs" / "batches" / "eval-risebench" / "manifest.jsonl").read_text()
    assert manifest.count('"status": "done"') == len(ITEMS)
    (out / "images" / S / "s2.png").unlink()  # missing: not accurate, never judged

    outputs = {
        image_input(out / "images" / item["category"] / f"{item['index']}.png", max_side=768,
                    format="JPEG").block()["base64"]: item["index"]
        for item in ITEMS if item["index"] != "s2"
    }
    clone = rise_clone(tmp_path / "RISEBench")
    with judge_server(Judge(outputs)) as server:
        result = invoke("eval", "score", "risebench", "--out", str(out), "--judge", JUDGE_MODEL,
                        "--judge-url", server.url, "--bench-repo", str(clone))
        assert result.exit_code == 0, result.output
        requests = list(server.requests)
    scores = json.loads((out / "scores.json").read_text())

    # Accurate: t1 (5,5,5), t2 (consistency-free: 5,5), s1 (5,5,5), l1 (1,1 -> 5,5).
    # Not: c1 (reasoning 4), c2 (1), l2 (reasoning 0 -> 1), s2 (missing). l3 fails: left out.
    assert scores["overall"] == pytest.approx(100 * 4 / 8, abs=1e-9)
    assert scores["categories"] == pytest.approx({T: 100.0, C: 0.0, S: 50.0, L: 50.0}, abs=1e-9)
    assert (scores["items"], scores["judged"], scores["missing"], scores["failed_items"]) == (9, 7, 1, ["l3"])
    assert scores["judge_failures"] == 1
    # Weighted scores by hand: t1 5, t2 0.2*5 + 0.8*5 = 5, c1 0.3*5 + 0.5*4 + 0.2*5 = 4.5,
    # c2 (0.3*4 + 0.5*1 + 0.2*3) / 2 = 1.15, s1 5, s2 1 (missing), l1 0.3*5 + 0.7*5 = 5,
    # l2 (0.3*5 + 0.7*1) / 2 = 1.1.
    weighted = [5, 5, 4.5, 1.15, 5, 1, 5, 1.1]
    assert scores["details"]["score"] == pytest.approx(sum(weighted) / 8, abs=1e-9)
    assert scores["details"]["subtasks"] == {"Life Progression": 100.0}

    # Calls: t1 3, t2 2 (no consistency), c1 3, c2 3, s1 3, l1 2, l2 2, l3 1 + 3 unreadable.
    assert len(requests) == 3 + 2 + 3 + 3 + 3 + 2 + 2 + 4
    by_call = {}
    for body in requests:
        text = texts(body)
        task = re.search(r"TASK=<<(.*?)>>", text)
        by_call[(task.group(1) if task else None, re.search(r"KIND=(\S+)", text).group(1))] = body
    assert ("Melt the snowman.", "consistency") not in by_call
    reference = image_input(data.parent / "spatial_reasoning_images/1_ref.png", max_side=768,
                            format="JPEG").block()["base64"]
    # With a reference image, spatial consistency compares against it (as the scorer does).
    assert image_urls(by_call[("Assemble the parts.", "consistency")])[0].endswith(reference)
    assert len(image_urls(by_call[("Heat the ice.", "reasoning-with-input")])) == 2
    assert len(image_urls(by_call[("Solve the sum.", "logic-reasoning")])) == 1
    assert "REF=<<7>>" in texts(by_call[("Solve the sum.", "logic-reasoning")])
    assert all(url.startswith("data:image/jpeg;base64,") for body in requests for url in image_urls(body))


def test_final_score_and_weights() -> None:
    assert parse_final_score("Reasons...\n**Final Score:** **4**") == 4
    assert parse_final_score("final score: 2, then more") == 2
    assert parse_final_score("My final score is below.\nFinal Scores: 3") == 3
    with pytest.raises(judge_module.UnreadableReply):
        parse_final_score("no verdict")
    halved = weighted_score(T, False, {"consistency": 5, "reasoning": 1, "plausibility": 1})
    assert halved == pytest.approx(1.1)
    # Halved below 1, then raised to 1.
    assert weighted_score(T, False, {"consistency": 1, "reasoning": 1, "plausibility": 1}) == 1


def test_images_outside_the_data_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    picture(tmp_path / "secret.png")
    folder.mkdir()
    (folder / "data_total.json").write_text(json.dumps(
        [{"index": "x", "category": T, "instruction": "Do it.", "image": "../secret.png", "reference": "r"}]))
    result = invoke("eval", "run", "risebench", "--data", str(folder / "data_total.json"),
                    "--out", str(tmp_path / "out"), "--profile", "test")
    assert result.exit_code == 1 and "outside" in result.output
