"""Every relative link of the front page, the docs pages, the changelog and deploy/README.md
points to a file that exists and, with a `#fragment`, to a heading of that file (GitHub's
anchors). The reference moved from README.md to docs/ and the pages link to each other:
a renamed heading or a moved page must not leave a link dangling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import ROOT

PAGES = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "deploy" / "README.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*(\S+)", re.M)


def prose(text: str) -> str:
    """`text` without fenced code blocks and code spans, where nothing is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters,
    spaces and hyphens kept), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings, repeated ones numbered as GitHub does."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """The relative links of `text` (the content of `page`) that lead nowhere."""
    body = prose(text)
    out = []
    for target in INLINE.findall(body) + REFERENCE.findall(body):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
            out.append(f"{target}: no heading with that anchor in {dest.name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page, page.read_text()) == []


def test_the_check_finds_what_is_broken() -> None:
    page = ROOT / "docs" / "probe.md"
    text = (
        "[ok](relay.md#a-hostile-sender) [ok](#probing-endpoints-probe) [web](https://x.test/#y)\n"
        "[gone](nothere.md) [bad anchor](relay.md#no-such-heading) `[code](nothere.md)`\n"
        "[ref]: ../README.md#nope\n"
        "```\n[in a block](nothere-either.md)\n```\n"
    )
    assert broken_links(page, "# Probing endpoints: /probe\n" + text) == [
        "nothere.md: no such file",
        "relay.md#no-such-heading: no heading with that anchor in relay.md",
        "../README.md#nope: no heading with that anchor in README.md",
    ]
    assert slug("Names: OTel → Prometheus") == "names-otel--prometheus"
    assert slug("In the code: `exporter.instrument()`") == "in-the-code-exporterinstrument"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
