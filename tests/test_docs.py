"""The docs cannot rot: every command shown in README.md and docs/ is checked (quick level).

``docs/check_docs.py`` parses each ``segsweep`` command with the real parser, validates the
configs and specs it names and checks each ``make`` target; ``make docs-check`` also runs the
cheap ones. Here: that level over the real pages, and the checker itself on pages made to fail.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "docs" / "check_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


check_docs = _load_checker()


def _verdict(text: str, page: str = "page.md") -> object:
    """The checker's verdict on the one command of a ```console block holding TEXT."""
    commands = check_docs.extract_commands(f"```console\n{text}\n```\n", page)
    assert len(commands) == 1, commands
    return check_docs.Checker().check(commands[0])


def test_readme_is_at_most_12_kb() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size <= check_docs.README_LIMIT == 12 * 1024, f"README.md is {size} bytes"


def test_every_shown_command_passes_the_quick_check() -> None:
    lines: list[str] = []
    failures, counts = check_docs.check_all(run=False, out=lines.append)
    assert failures == 0, "\n".join(line for line in lines if line.startswith("FAIL"))
    # The pages show the commands a user types most; losing them all would pass vacuously.
    assert counts["parsed"] >= 30, lines[-1]
    shown = "\n".join(lines)
    for command in (
        "make demo",
        "make test",
        "segsweep sweep experiments/quickstart.yaml --resume",
        "segsweep curve --experiment quickstart",
        "segsweep dashboard",
    ):
        assert "README.md:" in shown and command in shown, command


def test_extracts_dollar_lines_of_console_blocks_only() -> None:
    page = (
        "```console\n$ segsweep methods\nsupervised   ...\n$ make lint \\\n    # joined\n```\n"
        "```yaml\n$ not a command\n```\n"
        "```console\n$ segsweep run experiments/run.yaml --set method=x\nerror: shown\n```\n"
    )
    commands = check_docs.extract_commands(page, "p.md")
    assert [c.text for c in commands] == [
        "segsweep methods",
        "make lint # joined",
        "segsweep run experiments/run.yaml --set method=x",
    ]
    assert [c.line for c in commands] == [2, 4, 11]
    assert commands[0].shown_error is None and commands[2].shown_error == "shown"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("$ segsweep sweep experiments/quickstart.yaml --no-such-flag", "parser"),
        ("$ segsweep sweep experiments/no_such_spec.yaml --dry-run", "not found"),
        ("$ segsweep run experiments/run.yaml --set train.no_such_key=1", "no_such_key"),
        ("$ segsweep sweep experiments/quickstart.yaml --set method=fixmatch", "varied"),
        ("$ make no-such-target", "make -n"),
        ("$ segsweep run ... --set seed=1", "elided"),
        ("$ docker compose exec no-such-service segsweep methods", "not a service"),
        ("$ frobnicate --all", "unknown program"),
        ("$ segsweep run experiments/run.yaml --set method=mixmatch\nerror: something else", "shown"),
    ],
)
def test_a_command_that_rotted_fails(text: str, why: str) -> None:
    verdict = _verdict(text)
    assert verdict.status == "FAIL" and why in verdict.detail, verdict


def test_a_command_shown_failing_passes_when_it_fails_so() -> None:
    shown = (
        "$ segsweep run experiments/run.yaml --set method=mixmatch\n"
        "error: experiments/run.yaml: method: unknown method 'mixmatch'; valid methods: "
        + ", ".join(__import__("segsweep.methods", fromlist=["METHODS"]).METHODS)
    )
    assert _verdict(shown).status == "parsed"


def test_commands_inside_compose_and_ssh_are_checked() -> None:
    good = "$ ssh host 'cd segsweep && docker compose exec -T ray-head segsweep sweep /opt/segsweep/experiments/quickstart.yaml'"
    bad = "$ ssh host 'cd segsweep && docker compose exec -T ray-head segsweep sweep /opt/segsweep/experiments/gone.yaml'"
    assert _verdict(good).status == "parsed"
    assert _verdict(bad).status == "FAIL"
    assert _verdict("$ ssh -L 5000:127.0.0.1:5000 host").status == "skipped"


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A heading, with `code` (and more)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading-with-code-and-more) [anchor](other.md#nope) [file](gone.md) "
        "[web](https://example.org/x) [self](#here)\n# Here\n```console\n$ see [not](a-link.md)\n```\n"
    )
    assert check_docs.broken_links(page) == ["other.md#nope: no such heading", "gone.md: no such file"]
