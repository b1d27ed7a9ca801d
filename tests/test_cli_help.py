"""Every command's `--help`, walked from the parser itself, and the options every command shares.

The walk finds the commands from the argparse tree (not from the table), so a command added by hand
outside `COMMANDS` is still checked; the table and the tree must name the same commands.
"""

from __future__ import annotations

import argparse
import logging

import pytest

from tta_runtime.cli.main import COMMANDS, GROUPS, build_parser, main

# Commands that run longer than a few seconds: one progress bar and --no-progress.
LONG = {
    "demo", "eval", "ood fit", "ood eval", "train segmenter", "train unet", "train encoder", "train classifier", "train ftwt", "stream",
    "export", "bench gate", "bench adapt", "bench tta", "bench prune", "bench stream", "bench backends", "bench serve",
    "bench overhead",
    "predict", "calibrate",
}
# Commands without a JSON result (they write a model folder or a calibration into one).
NO_JSON = {"ood fit", "train segmenter", "train unet", "train encoder", "train classifier", "train ftwt", "serve"}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every parser under `parser` by its command path, groups included."""
    found = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_walk(sub, (*path, name)))
    return found


PARSERS = _walk(build_parser())
LEAVES = sorted(p for p, parser in PARSERS.items() if p and not parser._subparsers)
ALL = sorted(PARSERS)


def test_the_tree_and_the_table_name_the_same_commands() -> None:
    assert {" ".join(p) for p in LEAVES} == {c.path for c in COMMANDS}
    assert {p[0] for p in ALL if len(p) > 1} == set(GROUPS)
    assert LONG | NO_JSON <= {c.path for c in COMMANDS}


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0, argv
    out = capsys.readouterr().out
    assert out.startswith("usage: tta-runtime")
    return out


@pytest.mark.parametrize("path", ALL, ids=lambda p: " ".join(p) or "tta-runtime")
def test_every_help_exits_0_with_the_shared_options(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([*path, "--help"], capsys)
    assert "-v, --verbose" in out and "-q, --quiet" in out
    # -v / -q after the command's name (and before it) are accepted
    _help([*path, "-v", "-q", "--help"], capsys)
    _help(["-v", *path, "-q", "--help"], capsys)


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_json_and_no_progress_where_they_belong(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    name = " ".join(path)
    out = _help([*path, "--help"], capsys)
    assert ("--json PATH" in out) == (name not in NO_JSON), name
    assert ("--no-progress" in out) == (name in LONG), name
    if name not in NO_JSON:
        _help([*path, "--json", "-", "--help"], capsys)
        _help([*path, "--json", "out/x.json", "--help"], capsys)
    if name in LONG:
        _help([*path, "--no-progress", "-q", "--help"], capsys)


def test_a_command_that_needs_an_extra_names_it_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "pip install 'tta-runtime[onnx]'" in _help(["export", "--help"], capsys)
    assert "pip install 'tta-runtime[digits]'" in _help(["bench", "tta", "--help"], capsys)
    top = _help(["--help"], capsys)
    for name in ("demo", "list", "eval", "ood", "train", "stream", "export", "doctor", "bench"):
        assert f"    {name} " in top


@pytest.mark.parametrize(
    "argv, level",
    [
        (["list"], logging.WARNING), (["list", "-v"], logging.INFO), (["-v", "list"], logging.INFO),
        (["list", "-q"], logging.ERROR), (["-q", "list"], logging.ERROR), (["list", "--verbose"], logging.INFO),
    ],
)
def test_verbosity_before_and_after_the_command(argv: list[str], level: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert logging.getLogger().level == level
    capsys.readouterr()


def test_a_missing_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["bench"], ["train"], ["ood"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "required" in capsys.readouterr().err
