"""Every relative link in README.md and docs/ points to a file that exists, and every #anchor to a heading
of that file (GitHub's slugs): a renamed section or moved results page breaks a link silently otherwise."""
import re

import pytest

from tests.helpers import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def github_slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)      # drops punctuation and backticks, keeps _ and -
    return text.replace(" ", "-")


def anchors(path) -> set[str]:
    out, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(github_slug(line.lstrip("#")))
    return out


def test_slug_matches_githubs_rule_for_code_and_punctuation():
    assert github_slug(" MNIST levers at `mnist_eps10_cpu`'s mechanism (TAN proxy)") == \
        "mnist-levers-at-mnist_eps10_cpus-mechanism-tan-proxy"
    assert github_slug(" Sampling speed") == "sampling-speed"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)
