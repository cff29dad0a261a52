"""The documents against the code: the README's two commands against CI, the methods' option
defaults in the README and in docs/methods/ against the method classes, the size limits of README
and BENCHMARKS, and every relative link of the Markdown documents."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from leanvit.methods.base import REGISTRY
from leanvit.options import parse_options

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
METHOD_DOCS = ROOT / "docs" / "methods"
CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_documents():
    return [README, BENCHMARKS] + sorted((ROOT / "docs").rglob("*.md"))


def table_rows(text: str, header_words):
    """The rows (lists of stripped cells) of the first Markdown table whose header holds every word."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("|") and all(w in line for w in header_words):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with {header_words}")


def defaults(method: str) -> dict:
    params = inspect.signature(REGISTRY[method].__init__).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def assert_same_default(method: str, key: str, written: str, where: str) -> None:
    code = defaults(method)
    assert key in code, f"{where}: {method} has no option {key} (options: {sorted(code)})"
    value = parse_options([f"{key}={written}"])[key]  # read as the command line reads it
    assert value == code[key] and type(value) is type(code[key]), \
        f"{where}: {method} {key}={written} but the code's default is {code[key]!r}"


def test_readme_starts_with_the_two_commands_ci_runs():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, re.S)
    commands = first.group(1).strip().split("\n")
    assert len(commands) == 2 and commands[0].endswith("&& leanvit demo")
    ci = [l for l in (ROOT / ".ci" / "run").read_text().split("\n") if l.startswith("pip install")][0]
    normalise = lambda c: re.sub(r"\s+", " ", c.replace(" -q", "")).strip()
    assert normalise(commands[1]) == normalise(ci)
    install = commands[1].split("&&")[0].replace('".[test]"', ".").strip()
    assert commands[0].startswith(install)  # the same pinned install, without the test extra
    assert text.index("```bash") < text.index("## ")  # before any section


def test_readme_is_short_with_the_api_early_and_short_cells():
    lines = README.read_text().split("\n")
    assert len(lines) <= 200
    assert next(i for i, l in enumerate(lines) if l.startswith("## Python API")) < 60
    cells = [c for l in lines if l.startswith("|") for c in l.strip("|").split("|")]
    assert cells and max(map(len, cells)) <= 300
    assert not re.search(r"[Ii]ssue \d+", README.read_text())


def test_readme_methods_table_matches_the_code():
    rows = table_rows(README.read_text(), ("method", "defaults", "paper"))
    listed = [CODE.search(r[0]).group(1) for r in rows]
    assert sorted(listed) == sorted(REGISTRY), "every method once in the README's table"
    checked = 0
    for name, row in zip(listed, rows):
        assert (METHOD_DOCS / f"{name}.md").is_file(), f"docs/methods/{name}.md"
        for span in CODE.findall(row[2]):
            key, _, written = span.partition("=")
            assert_same_default(name, key, written, "README.md")
            checked += 1
    assert checked >= len(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_page_lists_every_option_with_its_default(name):
    page = METHOD_DOCS / f"{name}.md"
    rows = table_rows(page.read_text(), ("option", "default", "meaning"))
    documented = {CODE.fullmatch(r[0]).group(1): CODE.fullmatch(r[1]).group(1) for r in rows}
    assert set(documented) == set(defaults(name)), f"docs/methods/{name}.md: options"
    for key, written in documented.items():
        assert_same_default(name, key, written, f"docs/methods/{name}.md")


def test_benchmarks_is_by_question_with_contents_and_no_issue_numbers():
    text = BENCHMARKS.read_text()
    assert len(text.split("\n")) <= 400
    headings = re.findall(r"^## (.+)$", text, re.M)
    contents = re.findall(r"^\d+\. \[(.+?)\]\(#", text, re.M)
    assert contents == headings
    assert not re.search(r"[Ii]ssues? \d+|#\d+\b", text)


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", markdown_documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.is_relative_to(ROOT) and file.exists(), f"{doc.relative_to(ROOT)}: {target}"
        if anchor and file.suffix == ".md":
            anchors = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
            assert anchor in anchors, f"{doc.relative_to(ROOT)}: {target}"
