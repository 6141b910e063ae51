"""Helpers of the evaluation tests: a scripted judge behind a real HTTP server on 127.0.0.1, and
synthetic clones of the benchmark repositories in the same file shapes, written in our own words
(the benchmarks' own prompt text never enters this project)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image
from typer.testing import CliRunner

from interleave_thinker.cli import app

HOST = "127.0.0.1"
JUDGE_MODEL = "scripted-judge"

# A reply: text (200), or (status, text) for an HTTP error.
Script = Callable[[dict[str, Any]], "str | tuple[int, str]"]


class JudgeServer:
    """An OpenAI-compatible /v1/chat/completions endpoint answering from a test's script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                reply = server.script(body)
                status, text = reply if isinstance(reply, tuple) else (200, reply)
                if status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                        "model": body.get("model", JUDGE_MODEL),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": text, "type": "server_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def judge_server(script: Script) -> Iterator[JudgeServer]:
    with JudgeServer(script) as server:
        yield server


def texts(body: dict[str, Any], role: str = "user") -> str:
    """All text of the request's messages of ``role``, joined."""
    parts = []
    for message in body["messages"]:
        if message["role"] != role:
            continue
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text"]
    return "\n".join(parts)


def image_urls(body: dict[str, Any]) -> list[str]:
    return [
        part["image_url"]["url"]
        for message in body["messages"] if isinstance(message["content"], list)
        for part in message["content"] if part.get("type") == "image_url"
    ]


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def picture(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


# -- synthetic clones (same files and shapes, our own words) ---------------------------------------


def ueval_clone(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ueval_eval.py").write_text('''
SYSTEM_INSTRUCTION = """
Grader of answers. Reply with JSON.
""".strip()

TEXT_TEMPLATE = """
TEXT-CHECK
Q: <<question>>
A: <<text_answer>>
""".strip()

TEXT_RUBRIC_TEMPLATE = """
Criterion to check:
<<rubric_item>>
""".strip()

IMAGE_TEMPLATE_OPEN = """
OPEN-IMAGE-CHECK
Q: <<question>>
A: <<text_answer>>
""".strip()

IMAGE_RUBRIC_TEMPLATE = """
Criterion to check:
<<rubric_item>>
""".strip()

IMAGE_TEMPLATE_CLOSED = """
CLOSED-IMAGE-CHECK
Q: <<question>>
""".strip()

def main():
    raise SystemExit("never run by the tests")
''')
    return root


_WISE_FUNCTION = '''
def build_evaluation_messages(prompt_data, image_base64):
    return [
        {"role": "system", "content": [{"type": "text", "text": "You grade pictures. {tag}"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"""Grade it.
PROMPT: "{prompt_data['Prompt']}"
EXPLANATION: "{prompt_data['Explanation']}"
{answer}"""},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_base64}"}},
            ],
        },
    ]
'''


def wise_clone(root: Path, records: list[dict[str, Any]]) -> Path:
    """Both protocols' scorer files, and the prompts in both data folders (split like WISE's)."""
    (root / "WISE_legacy" / "data").mkdir(parents=True, exist_ok=True)
    (root / "data_verified").mkdir(parents=True, exist_ok=True)
    binary = _WISE_FUNCTION.replace("{tag}", "BINARY").replace("{answer}", "Answer with Score: 0 or 1.")
    three = _WISE_FUNCTION.replace("{tag}", "THREE").replace("{answer}", "Answer with three scores.")
    (root / "vllm_eval.py").write_text("import json\n" + binary)
    (root / "WISE_legacy" / "gpt_eval.py").write_text("import json\n" + three)
    culture = [r for r in records if r["prompt_id"] <= 400]
    rest = [r for r in records if r["prompt_id"] > 400]
    for folder in (root / "WISE_legacy" / "data", root / "data_verified"):
        (folder / "cultural_common_sense.json").write_text(json.dumps(culture, indent=1))
        (folder / "natural_and_time.json").write_text(json.dumps(rest, indent=1))
    # The verified folder also has the merged copy; the legacy one a rewritten variant.
    (root / "data_verified" / "merge.json").write_text(json.dumps(records))
    rewritten = [dict(r, Prompt="rewritten " + r["Prompt"]) for r in records]
    (root / "WISE_legacy" / "data" / "cultural_common_sense_rewrite.json").write_text(json.dumps(rewritten))
    return root


RISE_KINDS = {
    "prompt_consist": "consistency", "prompt_reasoning": "reasoning",
    "prompt_reasoning_w_input": "reasoning-with-input", "prompt_generation": "quality",
    "prompt_spatial_ref": "spatial-reasoning", "prompt_spatial_ref_img": "spatial-reasoning-ref",
    "prompt_spatial_ref_w_input": "spatial-reasoning-input", "prompt_spatial_qual": "quality",
    "prompt_spatial_cons": "consistency", "prompt_logical_cons_ans": "consistency",
    "prompt_logical_cons": "consistency", "prompt_logical_txt": "logic-reasoning",
    "prompt_logical_img": "logic-reasoning-img", "prompt_logical_img_wo_q": "logic-reasoning-noq",
}


RISE_WITH_REFERENCE = {"prompt_reasoning", "prompt_reasoning_w_input", "prompt_spatial_ref",
                       "prompt_spatial_ref_w_input", "prompt_logical_cons_ans", "prompt_logical_txt"}
RISE_RAW = {"prompt_generation", "prompt_spatial_qual", "prompt_logical_img_wo_q"}


def rise_clone(root: Path) -> Path:
    """utils.py with one template per name: KIND names it, TASK and REF carry the item's fields."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["import json", ""]
    for name, kind in RISE_KINDS.items():
        body = f"KIND={kind}"
        if name not in RISE_RAW:
            body += "\\nTASK=<<{instruct}>>"
        if name in RISE_WITH_REFERENCE:
            body += "\\nREF=<<{reference}>>"
        body += "\\nEnd with the line **Final Score:** **N**"
        lines.append(f'{name} = "{body}"')
    (root / "utils.py").write_text("\n".join(lines) + "\n")
    return root


def comm_clone(root: Path) -> Path:
    prompts = root / "eval" / "tot_metric" / "machine_evaluation_prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    coherence = prompts / "document_completeness_image_coherence.json"
    coherence.write_text("COHERENCE-PROMPT: grade the document.")
    (prompts / "texts_to_image_descriptions.json").write_text("DESCRIBE-PROMPT: describe hidden images.")
    (prompts / "descriptions_gt_images_consistency.json").write_text("FIDELITY-PROMPT: match descriptions.")
    loader = root / "models" / "MiniGPT-5" / "dataloader.py"
    loader.parent.mkdir(parents=True, exist_ok=True)
    loader.write_text('''
import random

class Loader:
    def task4_interleaved_generation_for_question(self, idx, task_type="task4"):
        prompts = [
            "Explain {SOURCE}. Use one picture per step."
        ]
        return random.choice(prompts)
''')
    return root
