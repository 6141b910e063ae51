"""CoMM task 4: the question from the data loader's template, results.json per item in the
scorer's layout, the three judge calls in the scorer's order, and the seven averages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eval_fixtures import HOST, JUDGE_MODEL, comm_clone, image_urls, invoke, judge_server, texts
from interleave_thinker.evaluation import judge as judge_module
from interleave_thinker.evaluation.comm import clean_step_text, parse_steps

pytestmark = pytest.mark.allow_hosts([HOST])

RECORDS = [
    {"data_id": "k1", "title": "planting a tree", "dataset_type": "wikihow", "step_info": []},
    {"data_id": "k2", "title": "folding a shirt", "dataset_type": "wikihow", "step_info": []},
    {"data_id": "k3", "title": "baking bread", "dataset_type": "story", "step_info": []},
    {"data_id": "k4", "title": "tying a knot", "dataset_type": "story", "step_info": []},
]
# Seven scores per item: style, entity, trend, overall consistency, completeness, quality, fidelity.
SCORES = {"planting a tree": (8, 7, 6, 9, 10, "NA", 5), "folding a shirt": (4, 4, 4, 4, 4, 4, 4)}


def _title(body: dict[str, Any]) -> str:
    # The question names it in the first two calls, the descriptions in the third.
    return next(title for title in [r["title"] for r in RECORDS] if title in texts(body))


def judge(body: dict[str, Any]) -> str:
    system = texts(body, "system")
    title = _title(body)
    if title == "tying a knot" and system.startswith("FIDELITY"):
        return "The match is fine."  # no JSON: unreadable, the item is left out
    s = SCORES.get(title, (5,) * 7)
    if system.startswith("COHERENCE"):
        overall = {"justification": "ok", "style_consistency": s[0], "entity_consistency": s[1],
                   "trend_consistency": s[2], "overall_consistency": s[3]}
        scores = {"Image_Coherence": {"pair_scores": {}, "overall_score": overall},
                  "Completeness": {"Summarize": "x", "Justification": "y", "Score": s[4]},
                  "Image_Quality": {"Justification": "z", "Score": s[5]}}
        return "Here you go: " + json.dumps({"scores": scores})
    if system.startswith("DESCRIBE"):
        count = texts(body).count("</Img_")
        described = {f"Content of Image {i}": f"picture {i} of {title}" for i in range(count)}
        return json.dumps({"Tasks": {"Create an Interleaved Text-Image Document": described}})
    assert system.startswith("FIDELITY")
    return json.dumps({"Consistency": {"image_1_score": 3, "overall_score": s[6], "Justification": "-"}})


def _parts(body: dict[str, Any]) -> list[str]:
    return [part["text"] if part["type"] == "text" else "IMAGE" for part in body["messages"][1]["content"]]


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judge_module, "RETRY_DELAY_S", 0.0)


def test_comm_task4_run_layout_and_scores(tmp_path: Path) -> None:
    data = tmp_path / "comm_test.json"
    data.write_text(json.dumps(RECORDS))
    clone = comm_clone(tmp_path / "CoMM")
    out = tmp_path / "run"
    result = invoke("eval", "run", "comm", "--data", str(data), "--bench-repo", str(clone),
                    "--out", str(out), "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "k1_task4" / "results.json").read_text())
    assert results["model_input"] == "Explain planting a tree. Use one picture per step."
    assert results["input_image_list"] == [] and results["output_gt_image_list"] == []
    assert results["prediction_image_list"] == ["predict_1.png", "predict_2.png"]
    assert all((out / "k1_task4" / name).is_file() for name in results["prediction_image_list"])
    # "(1) text <IMAGE> (2) text <IMAGE>", as the scorer parses it back.
    assert results["model_output"].startswith("(1) ") and results["model_output"].endswith("<IMAGE>")
    assert [pieces.count(None) for pieces in parse_steps(results["model_output"])] == [1, 1]

    for name in ("results.json", "predict_1.png", "predict_2.png"):
        (out / "k3_task4" / name).unlink()  # no output at all: every score 0
    with judge_server(judge) as server:
        result = invoke("eval", "score", "comm", "--out", str(out), "--judge", JUDGE_MODEL,
                        "--judge-url", server.url, "--bench-repo", str(clone))
        assert result.exit_code == 0, result.output
        requests = list(server.requests)
    scores = json.loads((out / "scores.json").read_text())

    # Over k1, k2 and k3 (0); k4 left out. "NA" counts 0, as the CoMM scorer counts it.
    expected = {
        "style_consistency": (8 + 4 + 0) / 3, "entity_consistency": (7 + 4) / 3,
        "trend_consistency": (6 + 4) / 3, "overall_consistency": (9 + 4) / 3,
        "completeness": (10 + 4) / 3, "image_quality": (0 + 4) / 3, "text_fidelity": (5 + 4) / 3,
    }
    assert scores["categories"] == pytest.approx(expected, abs=1e-9)
    assert scores["overall"] == pytest.approx(sum(expected.values()) / 7, abs=1e-9)
    assert (scores["judged"], scores["missing"], scores["failed_items"], scores["judge_failures"]) == (
        2, 1, ["k4"], 1)
    # Three calls per judged item; k4's third one tried three times.
    assert len(requests) == 3 + 3 + 2 + 3
    k1 = [body for body in requests if _title(body) == "planting a tree"]
    coherence, describe, fidelity = (
        next(body for body in k1 if texts(body, "system").startswith(tag))
        for tag in ("COHERENCE", "DESCRIBE", "FIDELITY")
    )
    assert len(image_urls(coherence)) == 2 and image_urls(describe) == []
    assert all(url.startswith("data:image/jpeg;base64,") for url in image_urls(coherence))
    parts = _parts(coherence)
    assert parts[:4] == ["INPUT:", results["model_input"], "OUTPUT:", "(1)"]
    assert parts[parts.index("IMAGE") - 1] == " <Img_0>" and parts[parts.index("IMAGE") + 1] == "</Img_0>"
    assert " <Img_1>" in texts(describe) and "</Img_1>" in texts(describe)
    pairs = _parts(fidelity)
    assert pairs[:4] == ["<Description_0> Description:picture 0 of planting a tree </Description_0> ",
                         "<Img_0>", "IMAGE", "</Img_0>"]
    assert coherence["temperature"] == 1.0  # what the CoMM scorer sends


def test_step_text_survives_the_scorers_parser() -> None:
    text = clean_step_text("Mix (2) cups [flour] <b>now</b>\nthen wait")
    output = f"(1) {text} <IMAGE> (2) Bake. <IMAGE>"
    steps = parse_steps(output)
    assert len(steps) == 2 and steps[0][0] == text and "[" not in text and "<" not in text


def test_the_question_needs_the_clone_or_the_data(tmp_path: Path) -> None:
    data = tmp_path / "comm.json"
    data.write_text(json.dumps(RECORDS[:1]))
    result = invoke("eval", "run", "comm", "--data", str(data), "--out", str(tmp_path / "o"),
                    "--profile", "test")
    assert result.exit_code == 1 and "--bench-repo" in result.output
    data.write_text(json.dumps([{"data_id": "q", "question": "How do kites fly? Draw one."}]))
    result = invoke("eval", "run", "comm", "--data", str(data), "--out", str(tmp_path / "o"),
                    "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "q_task4" / "results.json").read_text())["model_input"] == (
        "How do kites fly? Draw one.")
