"""Small helpers every part of gptstack shares: user-facing errors and atomic file writes."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key).

    The CLI prints it as one line, `error: <message>`, and exits with status 2, before any work
    starts. The message names the file, line and key where there is one, and what was expected.
    """


class TrainingDiverged(UserError):
    """Training stopped on non-finite losses or gradients: printed like a UserError (one `error:`
    line, exit 2), naming the last checkpoint, which holds finite weights."""


class NonFiniteWeights(TrainingDiverged):
    """Weights about to be saved hold NaN/inf: nothing is written."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers only ever see the old file or the whole new one.

    Writes a temporary file in the same directory, fsyncs it, then renames it over `path`
    (rename is atomic on POSIX), and fsyncs the directory so the rename itself survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: name the one we were writing
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: str | os.PathLike, pattern: str = "**/.*.tmp") -> int:
    """Delete the temporary files (and folders) of atomic writes that a kill interrupted under
    `directory`, as a stage starts (one writer per stage directory). -> how many were removed."""
    import shutil

    directory = Path(directory)
    stale = list(directory.glob(pattern)) if directory.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_bytes_file(path: str | os.PathLike, expected: str = "a file") -> bytes:
    """A file's bytes, or a `UserError` naming it: missing, a directory, unreadable."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected {expected}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, turning every way it can be unusable into a `UserError`.

    Missing, unreadable, empty (or whitespace only) and non-UTF-8 files are rejected with the
    file name and, for bad bytes, the line and byte offset of the first one.
    """
    path = Path(path)
    data = read_bytes_file(path, "a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}:{line}: byte 0x{data[e.start]:02x} at offset {e.start} is not valid UTF-8 "
            "(expected a UTF-8 text file)"
        ) from None
    if not text.strip():
        raise UserError(f"{path}: file is empty, expected text to train on")
    return text
