"""WISE, both protocols: generated images in the scorer's layout, judged over HTTP, and the
category means and weighted overall of each protocol checked against hand-computed values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from eval_fixtures import HOST, JUDGE_MODEL, image_urls, invoke, judge_server, texts, wise_clone
from interleave_thinker.evaluation import judge as judge_module
from interleave_thinker.evaluation.wise import parse_binary, parse_legacy, wiscore

pytestmark = pytest.mark.allow_hosts([HOST])

# Ids chosen so that both protocols put them in the same category, except 530: time in the
# legacy ranges (401-567), space in the verified ones (521-640).
IDS = [1, 2, 450, 530, 600, 750, 850, 950]
RECORDS = [
    {"Prompt": f"A picture for prompt {n}.", "Explanation": f"Explains prompt {n}.",
     "Category": "Test", "Subcategory": "Test", "prompt_id": n}
    for n in IDS
]
BINARY = {1: "Score: 1", 2: "**Score**: 0", 450: "1", 530: "no idea", 750: "Score: 1",
          850: "Score: 0", 950: "<think>it could be 0</think>Score: 1"}
LEGACY = {1: (2, 2, 2), 2: (1, 0, 2), 450: (2, 1, 0), 530: (0, 1, 1), 750: (1, 1, 1),
          850: (2, 2, 1), 950: (0, 0, 0)}


def _prompt_id(body: dict[str, Any]) -> int:
    match = re.search(r"A picture for prompt (\d+)\.", texts(body))
    assert match, texts(body)
    return int(match.group(1))


def binary_judge(body: dict[str, Any]) -> str:
    return BINARY[_prompt_id(body)]


def legacy_judge(body: dict[str, Any]) -> str:
    consistency, realism, aesthetic = LEGACY[_prompt_id(body)]
    if _prompt_id(body) == 2:
        return f"**Consistency:** {consistency}\n**Realism:** {realism}\n**Aesthetic Quality:** {aesthetic}"
    return f"Consistency: {consistency}\nRealism: {realism}\nAesthetic Quality: {aesthetic}"


def _max_tokens(body: dict[str, Any]) -> int:
    # langchain-openai sends the limit as max_completion_tokens (vLLM reads both names).
    return body.get("max_completion_tokens", body.get("max_tokens"))


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(judge_module, "RETRY_DELAY_S", 0.0)


def _run_and_score(tmp_path: Path, bench: str, script: Any) -> tuple[dict[str, Any], Path, list[Any]]:
    clone = wise_clone(tmp_path / "WISE", RECORDS)
    out = tmp_path / bench
    # The data default to the clone's own prompt files (rewritten prompts and duplicates skipped).
    result = invoke("eval", "run", bench, "--bench-repo", str(clone), "--out", str(out),
                    "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{n}.png" for n in IDS)
    (out / "images" / "600.png").unlink()  # a missing image: scored 0, never sent
    with judge_server(script) as server:
        result = invoke("eval", "score", bench, "--out", str(out), "--judge", JUDGE_MODEL,
                        "--judge-url", server.url, "--bench-repo", str(clone))
        assert result.exit_code == 0, result.output
        requests = list(server.requests)
    return json.loads((out / "scores.json").read_text()), out, requests


def test_wise_verified_binary_protocol(tmp_path: Path) -> None:
    scores, _, requests = _run_and_score(tmp_path, "wise-verified", binary_judge)
    # culture {1: 1, 2: 0}; time {450: 1}; space {530: failed, 600: missing -> 0};
    # biology {750: 1}; physics {850: 0}; chemistry {950: 1}.
    expected = {"culture": 0.5, "time": 1.0, "space": 0.0, "biology": 1.0, "physics": 0.0,
                "chemistry": 1.0}
    assert scores["categories"] == pytest.approx(expected, abs=1e-9)
    assert scores["overall"] == pytest.approx(0.40 * 0.5 + 0.12 * (1 + 0 + 1 + 0 + 1), abs=1e-9)
    assert (scores["protocol"], scores["items"], scores["judged"], scores["missing"]) == (
        "wise-verified", 8, 6, 1)
    assert scores["judge_failures"] == 1 and scores["failed_items"] == ["530"]
    # One call per image, three for the unreadable one; never one for the missing image.
    assert len(requests) == 6 + 3
    assert all(len(image_urls(body)) == 1 and image_urls(body)[0].startswith("data:image/png;base64,")
               for body in requests)
    body = requests[0]
    assert texts(body, "system") == "You grade pictures. BINARY"
    assert f'EXPLANATION: "Explains prompt {_prompt_id(body)}."' in texts(body)
    # What the WISE scorer sends its vLLM judge.
    assert _max_tokens(body) == 500 and body["chat_template_kwargs"] == {"enable_thinking": False}


def test_wise_legacy_protocol(tmp_path: Path) -> None:
    scores, out, requests = _run_and_score(tmp_path, "wise", legacy_judge)
    # (0.7 c + 0.2 r + 0.1 a) / 2, worked out by hand for each reply.
    w = {1: 1.0, 2: 0.45, 450: 0.8, 530: 0.15, 750: 0.5, 850: 0.95, 950: 0.0}
    assert {n: wiscore(*LEGACY[n]) for n in LEGACY} == pytest.approx(w, abs=1e-12)
    expected = {
        "culture": (w[1] + w[2]) / 2, "time": (w[450] + w[530]) / 2, "space": 0.0,
        "biology": w[750], "physics": w[850], "chemistry": w[950],
    }
    assert scores["categories"] == pytest.approx(expected, abs=1e-9)
    overall = (0.4 * expected["culture"] + 0.167 * expected["time"] + 0.133 * expected["space"]
               + 0.1 * (expected["biology"] + expected["physics"] + expected["chemistry"]))
    assert scores["overall"] == pytest.approx(overall, abs=1e-9)
    assert (scores["judged"], scores["missing"], scores["judge_failures"]) == (7, 1, 0)
    assert len(requests) == 7 and texts(requests[0], "system") == "You grade pictures. THREE"
    assert _max_tokens(requests[0]) == 2000 and "chat_template_kwargs" not in requests[0]
    records = {json.loads(line)["id"]: json.loads(line) for line in (out / "scored-items.jsonl").open()}
    assert records["2"]["values"] == {"consistency": 1, "realism": 0, "aesthetic_quality": 2,
                                      "wiscore": pytest.approx(0.45)}
    assert records["600"]["status"] == "missing" and records["600"]["values"]["wiscore"] == 0


def test_no_overall_until_every_category_has_images(tmp_path: Path) -> None:
    clone = wise_clone(tmp_path / "WISE", RECORDS)
    out = tmp_path / "few"
    result = invoke("eval", "run", "wise-verified", "--bench-repo", str(clone), "--out", str(out),
                    "--limit", "2", "--profile", "test", "--size", "64x64")
    assert result.exit_code == 0, result.output
    with judge_server(binary_judge) as server:
        result = invoke("eval", "score", "wise-verified", "--out", str(out), "--judge", JUDGE_MODEL,
                        "--judge-url", server.url, "--bench-repo", str(clone))
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    assert scores["overall"] is None and scores["categories"] == {"culture": 0.5}
    assert "every category" in scores["details"]["overall_note"]
    # A folder is scored as the benchmark it was generated for.
    result = invoke("eval", "score", "wise", "--out", str(out), "--judge", JUDGE_MODEL,
                    "--judge-url", "http://127.0.0.1:9/v1", "--bench-repo", str(clone))
    assert result.exit_code == 1 and "holds wise-verified outputs" in result.output


def test_replies_are_read_as_the_wise_scorers_read_them() -> None:
    assert parse_binary("Score: 1") == 1 and parse_binary("**Score:** 0") == 0 and parse_binary("\n1\n") == 1
    assert parse_legacy("Consistency: 2\nRealism: 1\nAesthetic Quality: 0") == {
        "consistency": 2, "realism": 1, "aesthetic_quality": 0}
    assert parse_legacy("2\n1\n0") == {"consistency": 2, "realism": 1, "aesthetic_quality": 0}
    for unreadable in ("Score: 7", "0\n1", "nothing"):
        with pytest.raises(judge_module.UnreadableReply):
            parse_binary(unreadable)
    for unreadable in ("Consistency: 2\nRealism: 1", "Consistency: 3\nRealism: 1\nAesthetic Quality: 0"):
        with pytest.raises(judge_module.UnreadableReply):
            parse_legacy(unreadable)
