"""The README and docs/: the README fits on a page, and every relative link in them resolves (file and anchor)."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a bracket is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"^```.*?^```", "", f.read(), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _links(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return LINK.findall(_prose(f.read()))


def test_links_are_found():
    """The parser sees the links the README has (a parser that finds none would pass everything)."""
    links = _links(PAGES[0])
    assert "docs/training.md" in links and "LICENSE" in links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
        if not os.path.exists(path):
            broken.append(link)
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(link)
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links {broken}"


def test_readme_fits_on_a_page():
    with open(PAGES[0], encoding="utf-8") as f:
        text = f.read()
    assert len(text.splitlines()) <= 200
    # the shipped model's figures live in one marked block, so a new version replaces them in one place
    assert text.count("<!-- shipped-model -->") == 1 and text.count("<!-- /shipped-model -->") == 1
    assert text.index("<!-- shipped-model -->") < text.index("<!-- /shipped-model -->")
    assert "not a diagnosis" in text
