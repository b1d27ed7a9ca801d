"""The one door for files: every card, recipe, calibration, manifest, npz and output file goes through here.

Reading: `regular_file` (os.stat + S_ISREG: no FIFO, device, socket or directory is ever opened), a size
limit, strict UTF-8, a nesting-depth limit and the expected top-level type (`read_json`, `read_toml`);
`load_npz` checks every array's declared shape and dtype in the zip headers before allocating anything.
References: `inside(folder, ref)` resolves a file a card names inside its folder (no absolute path, no
`..`, no symlink out); `plain_name` is what a registry name may look like. Writing: `atomic_write`
replaces only a regular file or creates a new path, never a directory, a device, a FIFO or a symlink,
and nothing under /proc, /sys or /dev.

Limits (module constants): a JSON/TOML file `MAX_TEXT_BYTES` (16 MiB) and `MAX_DEPTH` (32) levels of
nesting; an npz `MAX_NPZ_BYTES` (2 GiB) of declared array data in at most `MAX_NPZ_MEMBERS` arrays;
a weights file `MAX_WEIGHTS_BYTES` (16 GiB); a name or path argument `MAX_PATH_CHARS` (4096) characters.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, Any

import numpy as np

from tta_runtime.errors import ConfigError, ModelLoadError, TTARuntimeError

__all__ = [
    "MAX_DEPTH", "MAX_NPZ_BYTES", "MAX_NPZ_MEMBERS", "MAX_PATH_CHARS", "MAX_TEXT_BYTES", "MAX_WEIGHTS_BYTES",
    "NAME_PATTERN", "atomic_write", "check_depth", "inside", "is_plain_name", "load_npz", "path_arg", "plain_name",
    "read_bytes", "read_json", "read_toml", "regular_file", "writable_path",
]

MAX_TEXT_BYTES = 16 << 20
MAX_DEPTH = 32
MAX_NPZ_BYTES = 2 << 30
MAX_NPZ_MEMBERS = 4096
MAX_WEIGHTS_BYTES = 16 << 30
MAX_PATH_CHARS = 4096
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
_SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
_NPY_KINDS = "biuf"  # bool, int, uint, float: what our npz files hold (never objects)

Error = type[TTARuntimeError]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def path_arg(value: Any, what: str, error: Error = ConfigError) -> Path:
    """`value` as a Path when it is a str or os.PathLike of str, at most `MAX_PATH_CHARS` long, without NUL."""
    if not isinstance(value, (str, os.PathLike)):
        raise error(f"{what} must be a name or a path (str or os.PathLike), got {type(value).__name__} {_short(value)}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise error(f"{what} must be a text path, got {type(text).__name__} {_short(text)}; decode it first")
    if not text or len(text) > MAX_PATH_CHARS or "\0" in text:
        raise error(f"{what} must be a non-empty path of at most {MAX_PATH_CHARS} characters without NUL, got {_short(text)}")
    return Path(text)


def _short(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else f"{s[:60]}... ({len(s)} characters)"


def regular_file(path: str | os.PathLike[str], what: str = "file", error: Error = ModelLoadError) -> os.stat_result:
    """The stat of `path` (symlinks followed) when it is a regular file; `error` saying what it is otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind(st.st_mode)}, not a regular file; give the path of a regular file")
    return st


def read_bytes(path: str | os.PathLike[str], what: str, *, limit: int, error: Error = ModelLoadError) -> bytes:
    """The content of a regular file of at most `limit` bytes (checked before and while reading)."""
    st = regular_file(path, what, error)
    if st.st_size > limit:
        raise error(f"{what} {path} is {st.st_size:,} bytes; the limit is {limit:,}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
                raise error(f"{what} {path} is not a regular file")
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is over the limit of {limit:,} bytes")
    return data


def _text(path: str | os.PathLike[str], what: str, limit: int, error: Error) -> str:
    data = read_bytes(path, what, limit=limit, error=error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {path}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); "
                    f"save it as UTF-8") from None


def check_depth(obj: Any, what: str, *, limit: int = MAX_DEPTH, error: Error = ModelLoadError) -> None:
    """Refuse lists/dicts nested deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise error(f"{what} is nested more than {limit} levels deep; flatten it")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _checked_top(data: Any, path: Any, what: str, expect: type, error: Error) -> Any:
    if not isinstance(data, expect):
        want = "an object ({...})" if expect is dict else expect.__name__
        got = "null" if data is None else type(data).__name__
        raise error(f"{what} {path} must hold {want} at the top level, got {got}")
    check_depth(data, f"{what} {path}", error=error)
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def read_json(
    path: str | os.PathLike[str], what: str, *, error: Error = ModelLoadError, expect: type = dict,
    limit: int = MAX_TEXT_BYTES, allow_nan: bool = False,
) -> Any:
    """A JSON file's value: a regular UTF-8 file under `limit` bytes, nested at most `MAX_DEPTH` deep, whose
    top level is `expect`; NaN/Infinity literals only with `allow_nan`. Anything else raises `error`."""
    text = _text(path, what, limit, error)
    try:
        data = json.loads(text) if allow_nan else json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"cannot read {what} {path}: nested too deeply (limit {MAX_DEPTH} levels)") from None
    except json.JSONDecodeError as e:
        raise error(f"cannot read {what} {path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise error(f"cannot read {what} {path}: not valid JSON: {e}") from None
    return _checked_top(data, path, what, expect, error)


def read_toml(path: str | os.PathLike[str], what: str, *, error: Error = ConfigError, limit: int = MAX_TEXT_BYTES) -> dict[str, Any]:
    """A TOML file's table, under the same rules as `read_json`."""
    text = _text(path, what, limit, error)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise error(f"cannot read {what} {path}: nested too deeply (limit {MAX_DEPTH} levels)") from None
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise error(f"cannot read {what} {path}: not valid TOML: {e}") from None
    return _checked_top(data, path, what, dict, error)


# --------------------------------------------------------------------------------------------------
# Names and references


def is_plain_name(name: Any) -> bool:
    """A registry name: [a-z0-9][a-z0-9_.-]*, at most 128 characters (no '/', never '..')."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def plain_name(name: Any, what: str, error: Error = ConfigError) -> str:
    """`name` when it is a plain registry name; `error` saying what a name may look like otherwise."""
    if not is_plain_name(name):
        raise error(f"{what} must be a plain name (lower-case letters, digits, '_', '.', '-'; starting with a "
                    f"letter or digit; no '/'), got {_short(name)}")
    return name


def inside(folder: str | os.PathLike[str], ref: Any, what: str = "file", error: Error = ModelLoadError) -> Path:
    """`folder/ref` for a relative reference that stays inside `folder` (no absolute path, no `..`, no
    symlink pointing out of it); `error` otherwise. The file need not exist."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_PATH_CHARS or "\0" in ref:
        raise error(f"{what} must be a file name relative to {folder}, got {_short(ref)}")
    parts = PurePosixPath(ref.replace("\\", "/"))
    if parts.is_absolute() or PureWindowsPath(ref).drive or ".." in parts.parts:
        raise error(f"{what} {ref!r} must name a file inside {folder} (a relative path without '..'); "
                    f"move the file into the folder and name it relative to it")
    base = Path(folder)
    path = base / ref
    try:
        real, real_base = path.resolve(), base.resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise error(f"cannot resolve {what} {path}: {e}") from None
    if not real.is_relative_to(real_base):
        raise error(f"{what} {ref!r} resolves to {real}, outside {real_base} (a symbolic link); "
                    f"copy the file into the folder instead")
    return path


# --------------------------------------------------------------------------------------------------
# Writing


def _under_special(p: Path) -> Path | None:
    return next((root for root in _SPECIAL_ROOTS if p == root or p.is_relative_to(root)), None)


def writable_path(path: Any, what: str = "output file", error: Error = ConfigError) -> Path:
    """`path` when a file may be written there: a new path or an existing regular file, in a folder (or a
    folder to be made) outside /proc, /sys and /dev. Checks only; writes nothing."""
    if isinstance(path, (str, os.PathLike)) and os.fspath(path) == "":
        raise error(f"{what} is an empty path; give a file name")
    p = path_arg(path, what, error).expanduser()
    absolute = Path(os.path.abspath(p))
    try:
        real = absolute.parent.resolve() / absolute.name
    except (OSError, RuntimeError) as e:
        raise error(f"cannot resolve {what} {p}: {e}") from None
    for candidate in (absolute, real):
        root = _under_special(candidate)
        if root is not None:
            raise error(f"{what} {p} is under {root}, where only the system's special files live; write to a normal folder")
    for candidate in (absolute, real):
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise error(f"cannot check {what} {p}: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {p} exists and is {_kind(st.st_mode)}; refusing to replace it: give a file path")
    parent = real.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor must be a folder
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{what} {p}: {parent} is not a folder")
    return p


def atomic_write(path: Any, data: bytes | Callable[[IO[bytes]], Any], what: str = "output file", error: Error = ConfigError) -> Path:
    """Write `data` (bytes, or a function that writes to a binary file) to `path` through a temporary file
    in the same folder, renamed over it: readers never see half a file. `writable_path` rules apply; the
    file gets mode 0644. Returns the path."""
    p = writable_path(path, what, error)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:
        raise error(f"cannot write {what} {p}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
        os.chmod(tmp, 0o644)
        writable_path(p, what, error)  # still a regular file or absent right before the rename
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"cannot write {what} {p}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


# --------------------------------------------------------------------------------------------------
# npz


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, header bytes) of one .npy stream, read from its header only."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(s) for s in shape), dtype, f.tell()


def load_npz(path: str | os.PathLike[str], what: str, *, limit: int = MAX_NPZ_BYTES, error: Error = ModelLoadError) -> dict[str, np.ndarray]:
    """The arrays of an .npz (no pickles), after checking from the zip and .npy headers alone that every
    member is a numeric array whose declared size fits its stored size and all of them fit `limit` bytes.
    A truncated, corrupt or oversized file raises `error` before any array is allocated."""
    st = regular_file(path, what, error)
    if st.st_size > limit:
        raise error(f"{what} {path} is {st.st_size:,} bytes; the limit is {limit:,}")
    out: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as raw, zipfile.ZipFile(raw) as z:
            infos = z.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise error(f"{what} {path} holds {len(infos)} entries; the limit is {MAX_NPZ_MEMBERS}")
            total = 0
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise error(f"{what} {path}: entry {info.filename!r} is not a .npy array")
                with z.open(info) as f:
                    shape, dtype, header = _npy_header(f)
                nbytes = math.prod(shape) * dtype.itemsize
                total += nbytes
                if dtype.kind not in _NPY_KINDS or dtype.hasobject:
                    raise error(f"{what} {path}: array {info.filename[:-4]!r} has dtype {dtype}; expected numbers")
                if total > limit:
                    raise error(f"{what} {path} declares {total:,} bytes of arrays; the limit is {limit:,}")
                if header + nbytes != info.file_size:
                    raise error(f"{what} {path}: array {info.filename[:-4]!r} declares {shape} {dtype} ({nbytes:,} "
                                f"bytes) but stores {info.file_size - header:,}: the file is truncated or corrupt")
            for info in infos:
                with z.open(info) as f:
                    out[info.filename[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
    except TTARuntimeError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError, KeyError,
            NotImplementedError, RuntimeError, OverflowError) as e:
        raise error(f"cannot read {what} {path}: {type(e).__name__}: {e}; the file is truncated or not an npz") from None
    return out
