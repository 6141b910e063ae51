"""Rendering documents to HTML, Markdown and JSON, and exporting them, with hostile text."""

from __future__ import annotations

import base64
import hashlib
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from interleave_thinker.errors import ConfigurationError, ImageError
from interleave_thinker.render import (
    document_json,
    export_document,
    load_document_json,
    render_html,
    render_markdown,
)
from interleave_thinker.state import (
    Attempt,
    Critique,
    Document,
    DocumentStep,
    ImageRef,
    Request,
)
from interleave_thinker.storage.image_store import ImageStore

PAYLOADS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</details>",
    "](javascript:alert(1))",
)
HOSTILE = " ".join(PAYLOADS)


def _image(store: ImageStore, color: str, size: tuple[int, int] = (8, 6)) -> ImageRef:
    return store.put_image(Image.new("RGB", size, color))


def _document(store: ImageStore, text: str = "", profile: str = "real") -> Document:
    """Four steps: accepted after a retry, forced, text-only and skipped; ``text`` salts strings."""
    red, green, blue, gray = (_image(store, c) for c in ("red", "green", "blue", "gray"))
    request_image = _image(store, "yellow")
    step1 = DocumentStep(
        number=1,
        name=f"Sketch {text}",
        text=f"First paragraph {text}\nsecond line.\n\nSecond paragraph.",
        instruction=f"A red square {text}",
        status="accepted",
        image=green,
        attempts=(
            Attempt(
                step=1,
                number=1,
                prompt=f"red square {text}",
                seed=7,
                image=red,
                critique=Critique(
                    success=False,
                    refine_prompt=f"make it green {text}",
                    reasoning=f"wrong colour {text}",
                    score=0.25,
                ),
            ),
            Attempt(
                step=1,
                number=2,
                prompt=f"make it green {text}",
                seed=7,
                image=green,
                critique=Critique(success=True, reasoning=f"good {text}", score=0.9),
            ),
        ),
    )
    step2 = DocumentStep(
        number=2,
        name=f"Colour {text}",
        text=f"Colour it {text}",
        instruction=f"Blue fill {text}",
        status="forced",
        image=blue,
        attempts=(
            Attempt(
                step=2,
                number=1,
                prompt=f"blue {text}",
                seed=8,
                image=blue,
                critique=Critique(success=False, refine_prompt=f"bluer {text}"),
            ),
            Attempt(step=2, number=2, prompt=f"bluer {text}", seed=8, image=gray, critique=None),
        ),
    )
    step3 = DocumentStep(
        number=3,
        name=f"Explain {text}",
        text=f"Only words {text}",
        instruction="",
        status="text",
    )
    step4 = DocumentStep(
        number=4,
        name=f"Finish {text}",
        text=f"Never drawn {text}",
        instruction=f"Final {text}",
        status="skipped",
    )
    return Document(
        request=Request(text=f"Draw a square {text}", images=(request_image,)),
        steps=(step1, step2, step3, step4),
        profile=profile,
        generator_calls=4,
    )


class PageParts(HTMLParser):
    """Start tags with attributes, end tags, text nodes and anything the parser calls markup."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.ends: list[str] = []
        self.texts: list[str] = []
        self.comments: list[str] = []
        self.others: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.ends.append(tag)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)

    def handle_pi(self, data: str) -> None:
        self.others.append(data)

    def unknown_decl(self, data: str) -> None:
        self.others.append(data)


def parse_page(page: str) -> PageParts:
    parsed = PageParts()
    parsed.feed(page)
    parsed.close()
    return parsed


def _data_uri(store: ImageStore, ref: ImageRef) -> str:
    return f"data:{ref.media_type};base64,{base64.b64encode(store.read(ref)).decode()}"


def _step_section(page: str, number: int) -> str:
    start = page.index(f'id="step-{number}"')
    end = page.find('<article class="step"', start)
    return page[start:] if end == -1 else page[start:end]


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


def test_html_shows_steps_in_order_with_images_and_text(store: ImageStore) -> None:
    document = _document(store)
    page = render_html(document, store, thread_id="thread-1")

    assert page.startswith("<!DOCTYPE html>")
    positions = [page.index(f'id="step-{n}" data-step="{n}"') for n in (1, 2, 3, 4)]
    assert positions == sorted(positions)
    for step in document.steps:
        section = _step_section(page, step.number)
        assert f'data-status="{step.status}"' in section
        assert f"Step {step.number}: {step.name}" in section
        if step.image is not None:
            assert f'src="{_data_uri(store, step.image)}" alt="{step.instruction}"' in section
    first = _step_section(page, 1)
    assert "First paragraph <br>\nsecond line.</p>" in first
    assert '<p class="text">Second paragraph.</p>' in first
    assert "Draw a square" in page and "thread-1" in page
    assert _data_uri(store, document.request.images[0]) in page
    assert "<dt>Generator calls</dt><dd>4</dd>" in page


def test_html_is_self_contained(store: ImageStore) -> None:
    page = render_html(_document(store), store, thread_id="t")
    parsed = parse_page(page)
    for tag, attrs in parsed.starts:
        assert tag not in {"script", "link", "iframe", "object", "embed"}
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:image/")
    assert "http://" not in page and "https://" not in page


def test_html_badges_notes_and_folded_attempts(store: ImageStore) -> None:
    document = _document(store)
    page = render_html(document, store, thread_id="t")
    forced = _step_section(page, 2)
    assert '<span class="badge forced">forced</span>' in forced
    assert "critic never accepted" in forced
    assert "forced" not in _step_section(page, 1).split("<details")[0]
    assert "Text-only step" in _step_section(page, 3)
    assert "generator-call budget ran out" in _step_section(page, 4)
    assert "<details" not in _step_section(page, 3)

    parsed = parse_page(page)
    assert [t for t, _ in parsed.starts].count("details") == 2
    assert parsed.ends.count("details") == 2
    first = _step_section(page, 1)
    assert "<summary>Attempts (2)</summary>" in first
    # The kept attempt is the one whose image the step shows: attempt 2 in step 1, 1 in step 2.
    assert 'id="step-1-attempt-2" data-attempt="2" data-kept="true"' in first
    assert 'id="step-1-attempt-1" data-attempt="1" data-kept="false"' in first
    assert 'id="step-2-attempt-1" data-attempt="1" data-kept="true"' in forced
    assert "make it green" in first and "wrong colour" in first and "0.25" in first
    assert "rejected" in first and "accepted" in first
    assert document.steps[0].attempts[0].image.short in first
    assert _data_uri(store, document.steps[0].attempts[0].image) in first
    assert "not judged" in forced


def test_html_test_profile_notice(store: ImageStore) -> None:
    notice = "test stand-ins, not real models"
    assert notice in render_html(_document(store, profile="test"), store, thread_id="t")
    assert notice not in render_html(_document(store, profile="real"), store, thread_id="t")


def test_html_escapes_hostile_text(store: ImageStore) -> None:
    document = _document(store, text=HOSTILE, profile=HOSTILE)
    page = render_html(document, store, thread_id=HOSTILE)
    # '</details>' itself is the page's own markup; the counts below show none was injected.
    for payload in PAYLOADS[:2]:
        assert payload not in page
    assert "&lt;/details&gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = parse_page(page)
    tags = [tag for tag, _ in parsed.starts]
    assert "script" not in tags
    assert all(not name.startswith("on") for _, attrs in parsed.starts for name in attrs)
    assert all(attrs.get("src") != "x" for _, attrs in parsed.starts)
    # Escaped </details> must not close the fold early: still one open and close per step.
    assert tags.count("details") == parsed.ends.count("details") == 2
    assert tags.count("article") == parsed.ends.count("article") == 4
    # The title is cut before escaping: no half entity at its end.
    title = page.split("<title>")[1].split("</title>")[0]
    assert not re.search(r"&[a-z#0-9]*$", title.rstrip("…"))


def test_html_refuses_unvalidated_media_type(store: ImageStore) -> None:
    good = _image(store, "red")
    bad = ImageRef.model_construct(
        sha256=good.sha256, media_type="text/html", width=good.width, height=good.height
    )
    # model_construct skips validation, as a record loaded carelessly might.
    document = Document(request=Request(text="x"), steps=()).model_copy(
        update={"request": Request.model_construct(text="x", images=(bad,))}
    )
    with pytest.raises(ImageError):
        render_html(document, store, thread_id="t")


def _links(markdown: str) -> list[str]:
    # Links the renderer wrote: untrusted ']' is always escaped as '\]'.
    return [unquote(path) for path in re.findall(r"(?<!\\)\]\(([^)\s]+)\)", markdown)]


def test_markdown_structure(store: ImageStore) -> None:
    document = _document(store, profile="test")
    paths = {ref.sha256: f"files/{ref.sha256}.png" for ref in _all_refs(document)}
    markdown = render_markdown(document, image_paths=paths, thread_id="thread-1")
    headings = re.findall(r"^## Step (\d)", markdown, flags=re.MULTILINE)
    assert headings == ["1", "2", "3", "4"]
    assert f"![A red square](files/{document.steps[0].image.sha256}.png)" in markdown
    assert "## Step 2: Colour (forced)" in markdown
    assert "Text-only step" in markdown and "generator-call budget ran out" in markdown
    assert "- **Attempt 2** (kept): seed 7" in markdown
    assert "  - Critique: rejected" in markdown and "  - Critique: not judged" in markdown
    assert "    - Refine prompt: make it green" in markdown
    assert "test stand-ins" in markdown
    assert "First paragraph\\\nsecond line." in markdown
    assert set(_links(markdown)) == set(paths.values())


def test_markdown_escapes_hostile_text(store: ImageStore) -> None:
    document = _document(store, text=HOSTILE + "\n# heading\n* item `code` _em_\n1. one\n- two")
    paths = {ref.sha256: f"doc_files/{ref.sha256}.png" for ref in _all_refs(document)}
    markdown = render_markdown(document, image_paths=paths, thread_id=HOSTILE)
    for payload in PAYLOADS:
        assert payload not in markdown
    assert "<" not in markdown
    assert "&lt;script&gt;" in markdown
    assert "javascript" not in "".join(_links(markdown))
    assert all(path.startswith("doc_files/") for path in _links(markdown))
    assert "\\# heading\\\n\\* item \\`code\\` \\_em\\_" in markdown
    assert not re.search(r"^#+ heading", markdown, flags=re.MULTILINE)
    assert "\\\n1\\. one\\\n\\- two" in markdown


def _all_refs(document: Document) -> list[ImageRef]:
    refs = list(document.request.images)
    for step in document.steps:
        refs += [step.image] if step.image else []
        refs += [attempt.image for attempt in step.attempts]
    return refs


def test_export_markdown_links_existing_files(store: ImageStore, tmp_path: Path) -> None:
    document = _document(store, text=HOSTILE)
    out = tmp_path / "out" / "my doc.md"
    assert export_document(document, store, thread_id="t", fmt="md", out=out) == out
    markdown = out.read_text(encoding="utf-8")
    links = _links(markdown)
    assert {Path(link).name.split(".")[0] for link in links} == {
        ref.sha256 for ref in _all_refs(document)
    }
    for link in links:
        target = out.parent / link
        assert target.parent == out.parent / "my doc_files"
        assert hashlib.sha256(target.read_bytes()).hexdigest() == target.stem
        assert target.suffix == ".png"
    # A second export over the first is fine and leaves no temporary files behind.
    export_document(document, store, thread_id="t", fmt="md", out=out)
    assert not list(out.parent.rglob(".tmp-*"))


def test_export_html_and_json(store: ImageStore, tmp_path: Path) -> None:
    document = _document(store)
    html_out = export_document(document, store, thread_id="t", fmt="html", out=tmp_path / "d.html")
    assert html_out.read_text(encoding="utf-8") == render_html(document, store, thread_id="t")
    json_out = export_document(document, store, thread_id="t", fmt="json", out=tmp_path / "d.json")
    assert load_document_json(json_out.read_text(encoding="utf-8")) == ("t", document)


def test_json_round_trip(store: ImageStore) -> None:
    document = _document(store, text=HOSTILE, profile="test")
    text = document_json(document, thread_id="thread-9")
    assert text.startswith('{\n  "thread_id": "thread-9"')
    thread_id, loaded = load_document_json(text)
    assert thread_id == "thread-9"
    assert loaded == document


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"thread_id": 1, "document": {}}',
        '{"thread_id": "t"}',
        '{"thread_id": "t", "document": {"steps": []}}',
    ],
)
def test_load_document_json_refuses_bad_input(text: str) -> None:
    with pytest.raises(ConfigurationError):
        load_document_json(text)


def test_export_refuses_directory(store: ImageStore, tmp_path: Path) -> None:
    target = tmp_path / "folder"
    target.mkdir()
    for fmt in ("html", "md", "json"):
        with pytest.raises(ConfigurationError, match="is a directory"):
            export_document(_document(store), store, thread_id="t", fmt=fmt, out=target)
    assert list(target.iterdir()) == []


def test_export_refuses_unknown_format(store: ImageStore, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown export format"):
        export_document(
            _document(store),
            store,
            thread_id="t",
            fmt="pdf",  # type: ignore[arg-type]
            out=tmp_path / "d.pdf",
        )


def test_large_attempt_images_are_thumbnails_and_the_final_image_is_full_size(
    store: ImageStore,
) -> None:
    final = _image(store, "green", (1024, 768))
    rejected = _image(store, "red", (1024, 768))
    step = DocumentStep(
        number=1, name="Big", text="t", instruction="big", status="accepted", image=final,
        attempts=(
            Attempt(step=1, number=1, prompt="p", seed=1, image=rejected,
                    critique=Critique(success=False, refine_prompt="q")),
            Attempt(step=1, number=2, prompt="q", seed=1, image=final,
                    critique=Critique(success=True)),
        ),
        chosen=1,
    )
    document = Document(request=Request(text="big"), steps=(step,))
    page = render_html(document, store, thread_id="t")
    images = [dict(attrs) for tag, attrs in parse_page(page).starts if tag == "img"]
    # The step's own image at full size, then one small JPEG per attempt.
    assert images[0]["src"] == _data_uri(store, final)
    thumbs = images[1:]
    assert [t["title"] for t in thumbs] == [f"sha256 {rejected.sha256}", f"sha256 {final.sha256}"]
    for thumb in thumbs:
        assert thumb["src"].startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(thumb["src"].split(",", 1)[1]))) as small:
            assert small.size == (342, 256) == (int(thumb["width"]), int(thumb["height"]))
    # The page carries each full-size image once: the final one only.
    assert page.count(_data_uri(store, final)) == 1 and _data_uri(store, rejected) not in page


def test_text_that_looks_like_an_image_placeholder_stays_text(store: ImageStore, tmp_path: Path) -> None:
    """The page is assembled with a NUL-delimited placeholder per full-size image; model text
    that imitates one is escaped like any control character and never pulls image data in."""
    plain = _document(store)
    imitation = "\x000\x00 \x001\x00"
    first = plain.steps[0]
    step = first.model_copy(update={"text": f"Told: {imitation}", "name": imitation})
    document = plain.model_copy(update={"steps": (step, *plain.steps[1:])})
    page = render_html(document, store, thread_id="t")
    assert "\x00" not in page
    assert "Told: \ufffd0\ufffd \ufffd1\ufffd" in page
    # Every image is where it was without the imitation, and nowhere else.
    assert _img_sources(page) == _img_sources(render_html(plain, store, thread_id="t"))
    # Written in pieces or rendered as one string, the page is the same.
    out = export_document(document, store, thread_id="t", fmt="html", out=tmp_path / "d.html")
    assert out.read_text(encoding="utf-8") == page


def _img_sources(page: str) -> list[str]:
    return [dict(attrs)["src"] or "" for tag, attrs in parse_page(page).starts if tag == "img"]
