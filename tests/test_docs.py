"""The README is the front door and docs/ is behind it: every relative link and image resolves, every anchor
names a heading of its page (GitHub's slugs), the README stays short, and no docs page is left unlinked."""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_LINES = 250  # nanoGPT's README is 234 lines, DVC's example-get-started 178 (docs/STYLE.md)

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")  # [label]: target
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MARKDOWN_LINK_TEXT = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
EXTERNAL = ("http://", "https://", "mailto:")


def docs_pages() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans removed: what can hold links and headings."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(CODE_SPAN.sub("", line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except - and _, each space a -."""
    text = MARKDOWN_LINK_TEXT.sub(r"\1", heading).lower()
    kept = []
    for ch in text:
        if ch == " ":
            kept.append("-")
        elif ch in "-_" or unicodedata.category(ch)[0] in "LNM":  # letters (ü too), numbers, combining marks
            kept.append(ch)
    return "".join(kept)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a page; a repeated slug gets -1, -2, … as GitHub numbers it."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def link_targets(page: Path) -> list[str]:
    """Every link and image target in a page's prose, in order."""
    targets = []
    for line in prose_lines(page.read_text(encoding="utf-8")):
        targets += INLINE_LINK.findall(line) + HTML_LINK.findall(line)
        if match := REFERENCE_LINK.match(line):
            targets.append(match.group(1))
    return targets


def resolve(page: Path, target: str, root: Path) -> tuple[Path, str]:
    """The file a relative target names (a leading / is the repository root) and its anchor ('' if none)."""
    path, _, anchor = target.partition("#")
    path = urllib.parse.unquote(path.split("?", 1)[0])
    if not path:
        return page, anchor
    base = root if path.startswith("/") else page.parent
    return (base / path.lstrip("/")).resolve(), anchor


def link_problems(page: Path, root: Path) -> list[str]:
    """What is wrong with a page's relative links: a missing file, a path outside the repository, a bad anchor."""
    problems = []
    for target in link_targets(page):
        if target.startswith(EXTERNAL):
            continue
        file, anchor = resolve(page, target, root)
        if not file.is_relative_to(root.resolve()):
            problems.append(f"{target}: outside the repository")
        elif not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and urllib.parse.unquote(anchor) not in anchors(file):
            problems.append(f"{target}: no heading '#{anchor}' in {file.name} (it has: {sorted(anchors(file))})")
    return problems


def linked_files(page: Path, root: Path) -> set[Path]:
    return {resolve(page, t, root)[0] for t in link_targets(page) if not t.startswith(EXTERNAL)}


# The checks on the project's own pages.


@pytest.mark.parametrize("page", [README, *docs_pages()], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    assert link_problems(page, REPO) == []


def test_the_readme_is_a_front_door_of_at_most_250_lines() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = linked_files(README, REPO)
    orphans = [str(p.relative_to(REPO)) for p in docs_pages() if p.resolve() not in linked]
    assert docs_pages(), "docs/ has no pages"
    assert orphans == []


def test_every_docs_page_links_back_to_the_readme() -> None:
    for page in docs_pages():
        assert README.resolve() in linked_files(page, REPO), page


# The checks can fail: each one on a small repository made to break it.


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("What happens when …", "what-happens-when-"),
        ("Theory: how fast, and when it breaks", "theory-how-fast-and-when-it-breaks"),
        ("Editing params.yaml", "editing-paramsyaml"),
        ("Sharing data and models: a DVC remote", "sharing-data-and-models-a-dvc-remote"),
        ("`method: nn` and torch_compile", "method-nn-and-torch_compile"),
        ("Übungen in „my project ü“", "übungen-in-my-project-ü"),
        ("A [linked](x.md) heading", "a-linked-heading"),
    ],
)
def test_slugs_follow_githubs_rules(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_broken_links_bad_anchors_and_escapes_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs" / "images").mkdir(parents=True)
    (tmp_path / "docs" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## What happens when …\n\n## Same\n\n## Same\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\n"
        "[ok](docs/page.md#what-happens-when-) [ok](docs/page.md#same-1) [ok](#title) ![ok](docs/images/a.png)\n"
        "[web](https://example.com/x.md) `[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/missing.md) ![gone](images/a.png) [anchor](docs/page.md#no-such) [self](#nope)\n"
        '[out](../elsewhere.md) <img src="docs/images/b.png">\n'
    )
    problems = link_problems(readme, tmp_path)
    assert [p.split(":")[0] for p in problems] == [
        "docs/missing.md",
        "images/a.png",
        "docs/page.md#no-such",
        "#nope",
        "../elsewhere.md",
        "docs/images/b.png",
    ]


def test_an_unlinked_page_is_an_orphan(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "linked.md").write_text("# Linked\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    readme = tmp_path / "README.md"
    readme.write_text("See [linked](docs/linked.md#linked).\n")
    linked = linked_files(readme, tmp_path)
    assert (tmp_path / "docs" / "linked.md").resolve() in linked
    assert (tmp_path / "docs" / "orphan.md").resolve() not in linked
