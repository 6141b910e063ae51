"""Typed records of a trajectory and the graph state that carries them (references only, no bytes)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from interleave_thinker.settings import redact_url

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# Media types the image store accepts, with the file suffix each is stored under.
MEDIA_SUFFIXES: dict[str, str] = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
}


class _Record(BaseModel):
    """Base of every record: unknown fields are errors, records never change after creation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageRef(_Record):
    """A content-addressed image: the state holds this, the bytes live in the image store."""

    sha256: str
    media_type: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        # The digest becomes a file name: anything but 64 lowercase hex digits is refused.
        if not SHA256_PATTERN.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hexadecimal digits")
        return value

    @field_validator("media_type")
    @classmethod
    def _known_media_type(cls, value: str) -> str:
        if value not in MEDIA_SUFFIXES:
            raise ValueError(f"media type {value!r} is not one of {sorted(MEDIA_SUFFIXES)}")
        return value

    @property
    def short(self) -> str:
        """The first 12 hex digits, enough to tell images apart in listings."""
        return self.sha256[:12]


SOURCE_PATTERN = re.compile(r"^(input|step):([1-9][0-9]*)$")


def parse_source(source: str) -> tuple[Literal["input", "step"], int]:
    """Split a source reference such as ``step:2`` or ``input:1`` into its kind and number."""
    match = SOURCE_PATTERN.fullmatch(source)
    if match is None:
        raise ValueError(f"source {source!r} must look like 'step:N' or 'input:N'")
    kind = "input" if match.group(1) == "input" else "step"
    return kind, int(match.group(2))


# A request is a story or a task, not a book: far longer text would only overflow the planner's
# context (the released planner is served with 32k tokens, shared with the plan it writes).
MAX_REQUEST_CHARS = 10_000
# C0 and C1 control characters and DEL; tab, newline and carriage return are ordinary text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def request_text_problem(text: object) -> tuple[str, str] | None:
    """What is wrong with a request text and what to do about it, or None when it is fine."""
    if not isinstance(text, str):
        return f"the request text must be a string, not {type(text).__name__}", "pass a str"
    if not text.strip():
        return "the request text is empty", "say what to generate"
    if len(text) > MAX_REQUEST_CHARS:
        return (
            f"the request text is {len(text):,} characters long, over the limit of "
            f"{MAX_REQUEST_CHARS:,}",
            f"shorten it to at most {MAX_REQUEST_CHARS:,} characters, or split the work into "
            "several requests",
        )
    encoding_hint = "pass the text as UTF-8 (check the terminal's or the file's encoding)"
    if match := _SURROGATE.search(text):
        code = ord(match.group())
        position = match.start() + 1
        if 0xDC80 <= code <= 0xDCFF:
            # Python turns bytes that are not UTF-8 (in arguments, file names) into these.
            return (
                f"the request text is not valid UTF-8: byte 0x{code - 0xDC00:02x} at "
                f"character {position} cannot be decoded",
                encoding_hint,
            )
        return (
            f"the request text holds a lone surrogate U+{code:04X} at character {position}",
            encoding_hint,
        )
    if match := _CONTROL.search(text):
        return (
            f"the request text contains the control character U+{ord(match.group()):04X} at "
            f"character {match.start() + 1}",
            "remove control characters (NUL, terminal escape codes); tabs and newlines are fine",
        )
    return None


def replace_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD: such text can never be stored."""
    return _SURROGATE.sub("\ufffd", text)


class Request(_Record):
    """What the user asked for: text and optional input images (guidance mode)."""

    text: str = Field(min_length=1)
    images: tuple[ImageRef, ...] = ()

    @field_validator("text", mode="before")
    @classmethod
    def _acceptable_text(cls, value: object) -> object:
        # Checked before pydantic's own str check, so the message says what is wrong.
        problem = request_text_problem(value)
        if problem is not None:
            raise ValueError(problem[0])
        return value

    @property
    def mode(self) -> Literal["narrative", "guidance"]:
        return "guidance" if self.images else "narrative"


StepAction = Literal["generate", "edit", "none"]


class Step(_Record):
    """One planned step: what it shows, the generator prompt, and which images it builds on."""

    number: int = Field(ge=1)
    name: str = ""
    instruction: str = ""
    prompt: str | None = None
    text: str | None = None
    # Each source is 'step:N' (the final image of step N) or 'input:N' (the user's Nth image).
    # The first source is the image being edited; later ones are references.
    sources: tuple[str, ...] = ()

    @field_validator("name", "instruction", "prompt", "text")
    @classmethod
    def _storable_text(cls, value: str | None) -> str | None:
        # An edited plan can carry JSON escapes such as "\udcff"; checkpoints cannot store them.
        return None if value is None else replace_lone_surrogates(value)

    @field_validator("sources")
    @classmethod
    def _valid_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for source in value:
            parse_source(source)
        return value

    @property
    def action(self) -> StepAction:
        if self.prompt is None:
            return "none"
        return "edit" if self.sources else "generate"

    @property
    def display_text(self) -> str:
        """The text a reader sees: the auxiliary text when there is one, else the instruction."""
        return self.text if self.text else self.instruction


class Plan(_Record):
    """The planner's whole sequence of steps, in reading order."""

    steps: tuple[Step, ...] = Field(min_length=1)

    def step(self, number: int) -> Step:
        for step in self.steps:
            if step.number == number:
                return step
        raise KeyError(f"the plan has no step {number}")


class Critique(_Record):
    """The critic's verdict on one attempt."""

    success: bool
    refine_prompt: str | None = None
    reasoning: str = ""
    score: float | None = None

    @field_validator("refine_prompt", "reasoning")
    @classmethod
    def _storable_text(cls, value: str | None) -> str | None:
        # A served model's JSON reply can carry lone surrogate escapes; checkpoints cannot.
        return None if value is None else replace_lone_surrogates(value)


class Attempt(_Record):
    """One generator call for a step, and what the critic said of it."""

    step: int
    number: int = Field(ge=1)
    prompt: str
    seed: int
    image: ImageRef
    critique: Critique | None = None
    # Set when the attempt was reused from the generation ledger instead of drawn again.
    reused: bool = False
    started_at: float = 0.0
    generation_seconds: float = 0.0
    critique_seconds: float = 0.0


StepStatus = Literal["pending", "accepted", "forced", "text", "skipped"]


class StepProgress(_Record):
    """Where a step stands: its attempts so far, the prompt for the next one, its final image."""

    number: int
    status: StepStatus = "pending"
    attempts: tuple[Attempt, ...] = ()
    next_prompt: str | None = None
    # Index into ``attempts`` of the attempt whose image the step keeps.
    chosen: int | None = None
    # Out of attempts and waiting for a person to pick the attempt to keep (review_forced).
    awaiting_review: bool = False

    @property
    def finished(self) -> bool:
        return self.status != "pending"

    @property
    def awaiting_critique(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].critique is None and not self.finished

    @property
    def final_image(self) -> ImageRef | None:
        if self.chosen is None:
            return None
        return self.attempts[self.chosen].image


SelectionPolicy = Literal["last", "best"]
OutputMode = Literal["tagged", "structured"]
# How a generator call's seed is derived (nodes/scheduling.py): ``hash`` of (run seed, step,
# attempt); ``ueval`` as the official UEval script (step position * 100 + try, from 0); ``demo``
# as the official demo script (step index from 0 * 1000, the same on every try).
SeedScheme = Literal["hash", "ueval", "demo"]
# What a critic that never gives a readable verdict means: stop the run with an error, or (as
# the official script) count the attempt as rejected.
UnreadableVerdict = Literal["error", "reject"]


class Budget(_Record):
    """Limits on generator calls: per step and per trajectory."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    max_calls: int = Field(default=100, ge=1, le=100_000)
    selection: SelectionPolicy = "last"
    # The paper accepts the final allowed attempt without asking the critic; off by default.
    accept_final_without_critic: bool = False


# Paper mode: the loop of the official UEval script that produced the paper's numbers. Each
# value applies unless the options set that field themselves.
PAPER_OPTIONS: dict[str, object] = {
    "budget": {"max_attempts": 3, "accept_final_without_critic": True, "selection": "last"},
    "seed_scheme": "ueval",
    # The official script samples an unreadable reply again, five tries in all.
    "max_reasks": 4,
    "unreadable_verdict": "reject",
    "width": 1024,
    "height": 1024,
}


class RunOptions(_Record):
    """The user's choices for a run that change its results (budget, seed, size, limits)."""

    # True: the paper's loop (PAPER_OPTIONS) for every field these options leave unset, and
    # the official prompts are required.
    paper: bool = False
    budget: Budget = Budget()
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    # False follows the paper: every attempt of a step uses the same seed, only the prompt changes.
    reseed_retries: bool = False
    width: int = Field(default=1024, ge=16, le=8192)
    height: int = Field(default=1024, ge=16, le=8192)
    # None: as many steps as the planner writes (the released planner has no limit).
    max_steps: int | None = Field(default=None, ge=1, le=1000)
    seed_scheme: SeedScheme = "hash"
    unreadable_verdict: UnreadableVerdict = "error"
    # Unreadable planner or critic output is re-asked at most this many times.
    max_reasks: int = Field(default=3, ge=0, le=100)
    # tagged: <think>/<answer> replies as the released checkpoints print them; structured: the
    # server or model is asked for JSON matching a schema (constrained decoding).
    output_mode: OutputMode = "tagged"
    # Pause after planning so a person can read or edit the plan before anything is drawn.
    review_plan: bool = False
    # Pause before a step is committed as forced so a person picks the attempt to keep.
    review_forced: bool = False

    @model_validator(mode="before")
    @classmethod
    def _paper_defaults(cls, data: object) -> object:
        if not (isinstance(data, dict) and data.get("paper") is True):
            return data
        merged = dict(data)
        for name, value in PAPER_OPTIONS.items():
            if name == "budget":
                given = merged.get("budget")
                if isinstance(given, Budget):
                    continue
                budget = dict(value)  # type: ignore[call-overload]
                if isinstance(given, dict):
                    budget.update(given)
                merged["budget"] = budget
            else:
                merged.setdefault(name, value)
        return merged

    def with_changes(self, **changes: object) -> RunOptions:
        """A validated copy with the given fields changed; budget fields may be named directly."""
        data = self.model_dump()
        for name, value in changes.items():
            if value is None:
                continue
            if name not in Budget.model_fields and name not in RunOptions.model_fields:
                raise ValueError(f"unknown run option {name!r}")
            if name in Budget.model_fields:
                if not isinstance(data["budget"], dict):
                    # 'budget' itself was replaced by a non-object: validation below says so.
                    continue
                data["budget"][name] = value
            else:
                data[name] = value
        return RunOptions.model_validate(data)


# How a backend was built: in this process (transformers, vllm, diffusers), over HTTP (served: an
# OpenAI-compatible chat server such as vLLM; openai-images: an Images API), by LangChain's
# init_chat_model (provider: "provider:name" without a URL), the test profile's stand-ins, or a
# caller's own objects (custom, which cannot be built again by name).
BackendKind = Literal[
    "transformers", "vllm", "served", "provider", "diffusers", "openai-images", "stand-in", "custom"
]


class BackendSpec(_Record):
    """How one backend was built, so that a resume can build it again. Never holds a key.

    ``model`` is the name it was built with (hub id, folder, ``provider:name``; for stand-ins and
    custom backends their identity). ``base_url`` is the server's address, any credentials in it
    shown as ``***`` (a resume must then be given the address again). The address is not part of
    what a resume compares: the same model at another address is the same model.
    """

    kind: BackendKind
    model: str = ""
    base_url: str | None = None

    @field_validator("base_url")
    @classmethod
    def _without_credentials(cls, value: str | None) -> str | None:
        return None if value is None else redact_url(value)


class BuildSettings(_Record):
    """The model settings the backends were built with that change replies or pixels, named as
    in ``ModelSettings``; None leaves each to the model's or server's own default."""

    device: str = "auto"
    dtype: str = "auto"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    generator_pipeline: str | None = None
    steps: int | None = None
    guidance: float | None = None


class BackendSpecs(_Record):
    """How a thread's planner, critic and generator were built (see ``models.profiles``)."""

    planner: BackendSpec
    critic: BackendSpec
    generator: BackendSpec
    # None: not recorded (stand-ins and custom backends are not built from model settings).
    build: BuildSettings | None = None


# A server address at the end of a chat model's identity ("openai-chat:NAME@http://host/v1"), as
# threads before BackendSpec stored it.
_CHAT_ADDRESS = re.compile(r"@[A-Za-z][A-Za-z0-9+.-]*://.*\Z", re.DOTALL)
_IMAGES_PREFIX = "openai-images:"
_OPENAI_IMAGES_HOST = "api.openai.com:"


def identity_without_address(identity: str) -> str:
    """A backend identity with any server address left out, as a resume compares identities.

    Threads before BackendSpec stored served models with their address: ``openai-chat:NAME@URL``
    and ``openai-images:URL:NAME``; both become the address-free form (``openai-chat:NAME``,
    ``openai-images:NAME``), so that such a thread resumes at another address of the same server.
    """
    if identity.startswith(_IMAGES_PREFIX):
        rest = identity.removeprefix(_IMAGES_PREFIX)
        # The server's own settings follow the name in parentheses: ' ({"steps": 8})'.
        head, space, tail = rest.partition(" (")
        if head.startswith(_OPENAI_IMAGES_HOST):
            head = head.removeprefix(_OPENAI_IMAGES_HOST)
        elif "://" in head:
            head = head.rpartition(":")[2]
        return f"{_IMAGES_PREFIX}{head}{space}{tail}"
    return _CHAT_ADDRESS.sub("", identity)


# The fingerprint's names of the settings that hold backend identities.
_IDENTITY_SETTINGS = ("planner", "critic", "generator")


class RunSettings(_Record):
    """Everything that changes a run's results; a thread keeps them and refuses others."""

    profile: str
    planner: str
    critic: str
    generator: str
    # The prompt pack's identity: "interleave", or "official:<digest of the templates>".
    prompts: str = "interleave"
    options: RunOptions = RunOptions()
    # How to build the backends again (kinds, names, addresses): what a resume without model
    # settings uses. Not compared: a thread may move to another address of the same model. None
    # in threads from before it was recorded (a resume then reads the identities above).
    backends: BackendSpecs | None = None

    def fingerprint(self, request: Request) -> dict[str, str]:
        """A flat name -> value map of the request digest and every setting, for comparison.

        Backend identities are compared without server addresses, and ``backends`` not at all.
        """
        flat: dict[str, str] = {"request": _digest(request.model_dump(mode="json"))}
        values = self.model_dump(mode="json", exclude={"backends"})
        for name in _IDENTITY_SETTINGS:
            values[name] = identity_without_address(values[name])
        _flatten(values, "", flat)
        return flat


def _flatten(value: object, prefix: str, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)
    else:
        out[prefix.rstrip(".")] = json.dumps(value)


def fingerprint_differences(stored: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human-readable lines naming each setting whose value differs."""
    lines = []
    for name in sorted(stored.keys() | new.keys()):
        before, after = stored.get(name), new.get(name)
        if before == after:
            continue
        if name == "request":
            lines.append("request: the text or input images differ")
        else:
            lines.append(f"{name}: thread has {before}, this run has {after}")
    return lines


def _digest(value: object) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class DocumentStep(_Record):
    """One step of the finished document."""

    number: int
    name: str
    text: str
    instruction: str
    status: StepStatus
    image: ImageRef | None = None
    attempts: tuple[Attempt, ...] = ()
    # Index into ``attempts`` of the one kept (None: skipped or text only).
    chosen: int | None = None


class Document(_Record):
    """The interleaved output: the request and, in order, each step's text and final image.

    Holds no timings, so a resumed run and an uninterrupted one give equal documents.
    """

    request: Request
    steps: tuple[DocumentStep, ...]
    profile: str = ""
    generator_calls: int = 0

    @property
    def text_answer(self) -> str:
        """Every step's text joined without a separator: the text answer the official UEval
        script submits (a step's auxiliary text when it has one, else its instruction)."""
        return "".join(step.text for step in self.steps)

    def content_for_comparison(self) -> list[dict]:
        """Steps with the per-run timing fields of attempts removed."""
        timing = {"started_at", "generation_seconds", "critique_seconds", "reused"}
        return [
            step.model_dump(exclude={"attempts": {"__all__": timing}}) for step in self.steps
        ]


class TrajectoryState(TypedDict, total=False):
    """The graph's checkpointed state: small records and image references only."""

    request: Request
    settings: RunSettings
    plan: Plan | None
    progress: tuple[StepProgress, ...]
    generator_calls: int
    document: Document | None


STATE_RECORD_TYPES: tuple[type[BaseModel], ...] = (
    ImageRef,
    Request,
    Step,
    Plan,
    Critique,
    Attempt,
    StepProgress,
    Budget,
    RunOptions,
    BackendSpec,
    BuildSettings,
    BackendSpecs,
    RunSettings,
    DocumentStep,
    Document,
)
