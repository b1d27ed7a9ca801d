"""What every command shares: the command table's entry type, the common options, output and errors.

Every command takes `-v/--verbose` and `-q/--quiet` (before or after its name). A command with a JSON
result takes `--json PATH` (write the file) or `--json -` (print it; the human summary then goes to
stderr so that stdout is the JSON alone). A command that runs longer than a few seconds shows one
progress bar for the whole run and takes `--no-progress`; `-q` implies it. Nothing heavy is imported
here: handlers import torch and the runtime when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# Optional packages and the extra that installs each (pyproject.toml's [project.optional-dependencies]).
EXTRAS = {
    "onnx": "onnx", "onnxruntime": "onnx", "tensorrt": "tensorrt", "sklearn": "digits", "torchvision": "torchvision",
    "timm": "timm", "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "prometheus_client": "serve", "ray": "ray",
}


@dataclass(frozen=True)
class Command:
    """One row of the command table (`tta_runtime.cli.main.COMMANDS`).

    `path`: the words that name it ("ood fit"); `add`: adds the command's own options to its parser and
    sets `func`; `json`: it has a JSON result (`--json PATH|-`); `long`: it runs longer than a few seconds
    (one progress bar, `--no-progress`); `extra`: the optional extra it needs, named in its help.
    """

    path: str
    add: Callable[[argparse.ArgumentParser], None]
    help: str
    json: bool = False
    long: bool = False
    extra: str | None = None


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (and exit status 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def common_options() -> argparse.ArgumentParser:
    """The parent parser of every parser: `-v` and `-q`, valid before and after a command's name.

    The defaults are SUPPRESS so that a subcommand's parser does not overwrite what was given before it.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")
    g.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
        help="print only errors and requested results; no progress bar",
    )
    return p


def add_command(parent: argparse._SubParsersAction, cmd: Command, name: str, options: argparse.ArgumentParser) -> None:
    """Add `cmd` as `name` under `parent`, with the options that its table row promises."""
    help_text = cmd.help + (f" (needs: pip install 'tta-runtime[{cmd.extra}]')" if cmd.extra else "")
    p = parent.add_parser(name, help=help_text, description=help_text, parents=[options])
    if cmd.json:
        p.add_argument("--json", default=None, metavar="PATH", help="write the JSON result to PATH ('-': print it)")
    if cmd.long:
        p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(command_path=cmd.path)
    cmd.add(p)


def configure_logging(args: argparse.Namespace) -> None:
    import logging

    level = logging.INFO if verbose(args) else logging.ERROR if quiet(args) else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # the commands print their own one-line far-OOD note per image (`far_ood_note`), not the library's log record
    logging.getLogger("tta_runtime.frozen").setLevel(logging.ERROR)


def verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "verbose", False))


def quiet(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "quiet", False))


def progress(args: argparse.Namespace) -> bool:
    """Whether to show the command's progress bar (not with `--no-progress` or `-q`)."""
    return bool(getattr(args, "progress", False)) and not quiet(args)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed, for reports and cards: `tta-runtime ...`."""
    return "tta-runtime " + shlex.join(args.argv)


def echo(args: argparse.Namespace, *lines: str) -> None:
    """Human-readable output: stdout, or stderr when stdout carries the JSON (`--json -`); nothing with -q."""
    if quiet(args):
        return
    out = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    for line in lines:
        print(line, file=out)


def fail(message: str) -> int:
    """One error line on stderr (a message of several lines is joined with '; '); the exit status of a usage error."""
    parts = [line.strip().removeprefix("- ") for line in str(message).splitlines()]
    text = "; ".join(p for p in parts if p).replace(":;", ":")
    _stderr_line(f"error: {text or 'failed'}")
    return 2


def _stderr_line(line: str) -> None:
    """`line` on stderr, above the progress bar when one is drawn."""
    if "tqdm" in sys.modules and getattr(sys.modules["tqdm"].tqdm, "_instances", None):  # a bar is drawn: a line of its own
        sys.modules["tqdm"].tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


def write_json(args: argparse.Namespace, report: Any, *, say: bool = True) -> Path | None:
    """`--json PATH`: write `report` there (and say so, unless not `say`); `--json -`: print it; no `--json`: nothing.

    Returns the file written, if any.
    """
    target = getattr(args, "json", None)
    if target is None:
        return None
    text = json.dumps(report, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return None
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if say:
        echo(args, f"wrote {out}")
    return out


def read_json(path: str, flag: str) -> Any:
    """A JSON file named by an option, or a `ConfigError` naming the flag (missing, special, not UTF-8, not JSON)."""
    from tta_runtime.errors import ConfigError

    target = Path(path)
    if not target.is_file():
        raise ConfigError(f"{flag} {path!r} is not a readable regular file; give a JSON report written by --json")
    try:
        return json.loads(target.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{flag} {path!r} is not a JSON file ({type(e).__name__}: {str(e)[:120]})") from None


def output_path(value: str | None, flag: str, suffixes: tuple[str, ...] = ()) -> str | None:
    """`value` (None passes) as an output file a command may write: a regular file or a new one, ending in one
    of `suffixes` when given; else a `ConfigError` naming the flag. Checked before any work starts."""
    from tta_runtime.errors import ConfigError

    if value is None or value == "-" and flag == "--json":
        return value
    target = Path(value)
    if suffixes and target.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} writes {'/'.join(s.lstrip('.') for s in suffixes)} files: give a path ending in "
                          f"{' or '.join(suffixes)}; got {value!r} (extension {target.suffix or 'none'!r})")
    if not value.strip() or value.endswith(("/", os.sep)):
        raise ConfigError(f"{flag} needs a file path, got {value!r}")
    if target.exists() and not target.is_file() or target.is_symlink() and not target.exists():
        raise ConfigError(f"{flag} {value!r} exists and is not a regular file (a directory, device, FIFO or dangling "
                          "link); give a new or regular file path")
    return value


def step_bar(args: argparse.Namespace, total: int, desc: str) -> Callable[[int, Any], None] | None:
    """An `on_step(step, output)` callback that moves one bar through `total` steps; None without progress."""
    if not progress(args):
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    def on_step(step: int, out: Any) -> None:
        if step < total:
            bar.update(1)
        else:
            bar.close()

    return on_step


@contextlib.contextmanager
def busy(args: argparse.Namespace, desc: str) -> Iterator[Callable[[str], None]]:
    """One bar with the elapsed time of work that counts no progress of its own (export, a benchmark).

    Yields `note(message)`, which shows a stage message in the bar (for a library's `progress=` message hook).
    """
    if not progress(args):
        yield lambda _message: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}{postfix}")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield lambda message: bar.set_postfix_str(message)
    except BaseException:
        bar.leave = False  # an error line follows: clear the bar rather than leave it above the error
        raise
    finally:
        done.set()
        thread.join()
        bar.close()


def csv(value: str | None) -> list[str]:
    """A comma-separated option as a list ('' and None: empty)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def numbers(value: str, flag: str, kind: type = float, lo: float | None = None, hi: float | None = None) -> list[Any]:
    """A comma-separated list of finite numbers within [lo, hi] (when given), or a `ConfigError` naming the flag."""
    import math

    from tta_runtime.errors import ConfigError

    example = "0.6,0.7" if kind is float else "1,8"
    try:
        out = [kind(v) for v in csv(value)]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated {kind.__name__}s, e.g. {example}; got {value!r}") from None
    bad = [v for v in out if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)]
    if bad:
        within = f" from {lo:g} to {hi:g}" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None else ""
        raise ConfigError(f"{flag} must be finite {kind.__name__}s{within}, e.g. {example}; got {value!r}")
    return out


def check_range(value: Any, flag: str, lo: float | None = None, hi: float | None = None) -> Any:
    """`value` (None passes) when it lies in [lo, hi] and is finite; else a `ConfigError` naming the flag."""
    import math

    from tta_runtime.errors import ConfigError

    def num(x: float) -> str:
        return f"{x:,}" if isinstance(x, int) else f"{x:g}"

    if value is None:
        return value
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        within = (f"from {num(lo)} to {num(hi)}" if lo is not None and hi is not None
                  else f">= {num(lo)}" if lo is not None else f"<= {num(hi)}")
        raise ConfigError(f"{flag} must be {within}; got {value!r}")
    return value


def add_threads(p: argparse.ArgumentParser) -> None:
    """`--threads N` for commands that run a Runtime (RuntimeOptions.threads)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per request (default: chosen from the work size: 1 for small models, so a busy "
                        "machine does not slow it down; see the README's 'threads')")


def far_ood_note(args: argparse.Namespace, card: Any, result: Any, name: str) -> None:
    """One stderr line when `result` scored above the card's far-OOD level (nothing with -q)."""
    from tta_runtime.frozen import OODScore, far_ood

    if quiet(args) or not far_ood(OODScore(result.ood_score, result.ood_scorer, result.is_ood, result.recon_mse), card):
        return
    what = "masks are" if card.task == "segmentation" else "label is"
    _stderr_line(f"warning: {name} is far outside what {card.name} was trained on ({result.ood_scorer} "
                 f"{result.ood_score:.1f} > {card.scope.far_ood_level:g}): its {what} unreliable")
