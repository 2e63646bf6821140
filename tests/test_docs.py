"""The README, CONTRIBUTING.md, CHANGELOG.md and docs/*.md: every relative link resolves (to a file, and for
`#anchor` links to a heading of the target), every docs page is reachable from the README, the README stays a
short guide, every override a `bash` block passes to pdq composes with the real config, and the text holds no
commit hashes, no dates and no words about how the project is worked on. No subprocess, no training."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import CONF, ROOT, compose_config

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *DOCS]
MAX_README_LINES = 400
#: `pdq <subcommand>`: arguments that are not Hydra overrides (`pdq sensitivity` takes overrides: composed below)
SUBCOMMANDS = {"export", "report", "cache"}
#: words about how the project is worked on, not about pdq (with their plural and verb forms)
FORBIDDEN = re.compile(r"\b(stop(s|ped|ping)?|issues?|sessions?|lent)\b", re.I)
#: 7 to 40 hex characters with at least one digit and one letter a-f: what a commit hash looks like
HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
DATE = re.compile(r"\b(19|20)\d\d-\d\d-\d\d\b")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6} +(.+?) *#*$", line)
        if heading:
            base = slug(heading.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[str, str]]:
    """(link target, what the link shows) of every relative link of a page, outside code."""
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "`code`", text)
    return [(target, label) for label, target in LINK.findall(text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: are not checked here


def resolve(page: Path, target: str) -> tuple[Path, str | None]:
    file, _, anchor = target.partition("#")
    return ((page.parent / file).resolve() if file else page), (anchor or None)


# ---- links ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target, label in links(page):
        path, anchor = resolve(page, target)
        if not path.exists():
            broken.append(f"[{label}]({target}): no file {path}")
        elif anchor is not None and (path.suffix != ".md" or anchor not in anchors(path)):
            broken.append(f"[{label}]({target}): no heading #{anchor} in {rel(path)}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [README.resolve()]
    while todo:
        page = todo.pop()
        if page in reached or page.suffix != ".md" or not page.is_file():
            continue
        reached.add(page)
        todo += [resolve(page, target)[0] for target, _ in links(page)]
    assert DOCS and not [rel(d) for d in DOCS if d.resolve() not in reached]


def test_the_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    code = {line.strip() for block in FENCE.findall(text) for line in block.splitlines()}
    assert {"make run", "make test"} <= code  # `make test` is what CI runs


# ---- the text ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_no_commit_hashes_dates_or_words_about_the_work(page):
    text = page.read_text()
    assert not [m.group(0) for m in HASH.finditer(text)], "commit-hash-like tokens"
    assert not [m.group(0) for m in DATE.finditer(prose(text))], "dates in the text"
    assert not [m.group(0) for m in FORBIDDEN.finditer(text)], "words about how the project is worked on"


# ---- command lines -------------------------------------------------------------------------------------------------

def bash_lines(path: Path):
    """(line number, command line) of every `bash` block, continuation lines joined, with the block's shell variables
    (`NAME="..."` lines) expanded where a command uses them as `$NAME`."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        variables: dict[str, str] = {}
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            start, line = i + 1, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            tokens = shlex.split(line, comments=True)
            if tokens and all(re.match(r"[A-Z_][A-Z0-9_]*=", t) for t in tokens):
                variables.update(t.split("=", 1) for t in tokens)
                continue
            expanded = []
            for t in tokens:
                expanded += shlex.split(variables[t[1:]]) if t.startswith("$") and t[1:] in variables else [t]
            yield start, expanded


def pdq_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments a command line passes to a pdq run (`pdq`, `python -m pdq`, `python run.py`, `srun`/`torchrun`
    of them, `make run ARGS="..."`, `pdq sensitivity`), or None when it runs no pdq config."""
    for i, t in enumerate(tokens):
        if t == "pdq" and (i == 0 or tokens[i - 1] in ("-m", "srun") or "=" in tokens[i - 1]):
            rest = tokens[i + 1:]
            if rest and rest[0] in SUBCOMMANDS:
                return None
            return ["quant=mixed", *rest[1:]] if rest and rest[0] == "sensitivity" else rest
        if t == "run.py" or t.endswith("/run.py"):
            return tokens[i + 1:]
        if t == "make" and tokens[i + 1:i + 2] == ["run"]:
            return [a for arg in tokens[i + 2:] if arg.startswith("ARGS=") for a in shlex.split(arg[5:])]
    return None


@cache
def sweep_parameters(name: str) -> tuple[str, ...]:
    """What a named sweep (`sweep=<name>`) sweeps, `key=values` each, as Hydra's sweeper adds them to every job."""
    from hydra.core.global_hydra import GlobalHydra

    from pdq.config import compose

    GlobalHydra.instance().clear()
    params = compose([f"sweep={name}"], return_hydra_config=True).hydra.sweeper.params
    return tuple(f"{k}={v}" for k, v in (params or {}).items())


def overrides(arguments: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The overrides of a documented command's first job: flags, `-m`, `hydra.*` and bare words dropped, a named
    sweep's parameters added where the command line does not set them (as Hydra does), a sweep `a=x,y` as its first
    value and `<...>` placeholders in values as a dummy; and each swept config group's values."""
    parser = OverridesParser.create()
    kept = [re.sub(r"<[^>]*>", "dummy", a) for a in arguments if not a.startswith("-") and "=" in a]
    given = {o.key_or_group for o in parser.parse_overrides(kept)}
    sweep = next((a.split("=", 1)[1] for a in kept if a.startswith("sweep=")), None)
    if sweep is not None:
        kept = [p for p in sweep_parameters(sweep) if p.split("=", 1)[0] not in given] + kept
    out, groups = [], {}
    for o in parser.parse_overrides(kept):
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra":
            continue
        if o.is_sweep_override():
            values = list(o.sweep_string_iterator())
            out.append(f"{o.get_key_element()}={values[0]}")
            if (CONF / o.key_or_group).is_dir():
                groups[o.key_or_group] = values
        else:
            out.append(o.input_line)
    return out, groups


COMMANDS = [(page, n, args) for page in PAGES for n, tokens in bash_lines(page)
            if (args := pdq_arguments(tokens)) is not None]


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) > 40 and {p for p, _, _ in COMMANDS} >= {README, ROOT / "docs" / "configuration.md"}


@pytest.mark.parametrize("page,line,arguments", COMMANDS, ids=[f"{rel(p)}:{n}" for p, n, _ in COMMANDS])
def test_every_override_of_a_documented_command_composes(page, line, arguments):
    composed, groups = overrides(arguments)
    compose_config(*composed)
    for group, values in groups.items():  # every swept option exists, not only the first
        missing = [v for v in values if not (CONF / group / f"{v}.yaml").is_file()]
        assert not missing, f"{rel(page)}:{line}: {group}={','.join(missing)} is no option of conf/{group}/"
