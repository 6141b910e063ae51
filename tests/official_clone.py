"""A stand-in for a clone of the official InterleaveThinker repository, written by the tests.

Its ``UEval/system.py`` has the constant names and placeholders of the real file but our own
words: no text of the official repository is in this project.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

NARRATIVE = '''
# Synthetic planner template (test fixture)
Plan pictures for this request: "{text_input}"
Answer like this:
<think>why</think>
<answer>
{'execution_plan': [{'step_number': 1, 'step_name': 'n', 'instruction': 'i',
 'prompt': 'p', 'auxiliary_text': None}]}
</answer>
'''

GUIDANCE = '''
# Synthetic guidance template (test fixture)
Continue this text-and-images sequence: "{text_input}"
Task A steps put their answer in auxiliary_text with instruction and prompt null.
'''

CRITIC = '''
# Synthetic critic template (test fixture)
The first picture is before, the second after.
Planned: "{original_instruction}"
Used: "{rewritten_prompt}"
Reply <think>...</think><answer>{'previous_step_success': bool, 'refine_prompt': str}</answer>
'''


def system_py(*, narrative: str = NARRATIVE, guidance: str = GUIDANCE, critic: str = CRITIC) -> str:
    """The text of a synthetic ``UEval/system.py`` (other code around it, as in a real module)."""
    return (
        "import os  # never executed by the project\n"
        "raise SystemExit('this file must be parsed, not run')\n\n"
        f"NARRATIVE_PROMPT_JSON = {narrative!r}\n\n"
        f"GUIDANCE_GLOBAL_PROMPT_JSON = {guidance!r}\n\n"
        f"Iterative_T2I_PROMPT_QWEN = {critic!r}\n"
    )


def write_clone(root: Path, **templates: str) -> Path:
    """A folder laid out like the official repository, with the synthetic prompt file."""
    (root / "UEval").mkdir(parents=True, exist_ok=True)
    (root / "UEval" / "system.py").write_text(system_py(**templates), encoding="utf-8")
    return root


def write_git_clone(root: Path, **templates: str) -> Path:
    """Like :func:`write_clone`, committed in a local git repository (for fetch-official)."""
    write_clone(root, **templates)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(root), "PATH": "/usr/bin:/bin"}
    for command in (["git", "init", "-q"], ["git", "add", "."], ["git", "commit", "-qm", "fixture"]):
        subprocess.run(command, cwd=root, check=True, env=env, capture_output=True)
    return root
