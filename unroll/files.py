"""Writing outputs: every file appears whole or not at all, and a bad output path is an
:class:`~unroll.errors.UnrollError` that names it, never an ``OSError`` traceback.

Files are written to a temporary name in the destination folder and renamed onto the final
name (atomic on POSIX); :func:`write_files` stages several files that belong together and
renames them only when all are complete, so a full disk midway leaves nothing new behind.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from unroll.errors import UnrollError

#: what open() would give a new file under this process's umask (read once: setting it is global)
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

#: ``write(tmp_path)`` writes one file's content to the path it is given
Writer = Callable[[str], None]

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a parent of it is a file, not a folder",
    errno.EEXIST: "exists and is not a folder",
    errno.ENAMETOOLONG: "file name too long",
}


def os_error(e: OSError, where: str | Path) -> UnrollError:
    """An ``OSError`` as the user-facing error it is: the path and the reason, no traceback."""
    reason = _REASONS.get(e.errno or 0) or e.strerror or type(e).__name__
    return UnrollError(f"cannot write here: {reason}", where=str(where))


@contextlib.contextmanager
def writing(where: str | Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise os_error(e, where) from None


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """Check, before any work is done, that ``path`` is or can become a folder this process can
    write into, so a bad ``--out`` fails in a second rather than after an hour. Nothing is
    created: a run that fails leaves no empty folder behind (the writers create it)."""
    path = Path(path)
    try:
        is_file = path.exists() and not path.is_dir()
        existing = path
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        existing_is_dir = existing.is_dir()
    except OSError as e:  # pathlib lets EACCES through exists() and is_dir()
        raise UnrollError(f"{option}: cannot look here: {_REASONS.get(e.errno or 0) or e.strerror}", where=str(path)) from None
    if is_file:
        raise UnrollError(f"{option} must be a folder, and this is an existing file", where=str(path))
    if existing != path and not existing_is_dir:
        raise UnrollError(f"{option}: cannot make this folder: {existing} is a file", where=str(path))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnrollError(f"{option}: cannot write here: permission denied", where=str(path))
    return path


def write_files(folder: str | Path, writers: dict[str, Writer]) -> list[Path]:
    """Write each ``name -> write(tmp)`` into ``folder``: all staged first under temporary names,
    then renamed. Any failure removes every temporary, and the folders this call created, and
    renames nothing (only a failure between two renames, which cannot run out of space, leaves a
    mix of new and old files)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    staged: list[tuple[str, Path]] = []
    done = False
    try:
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            for name in writers:
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
                os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; an output is as readable as any file
                os.close(fd)
                staged.append((tmp, folder / name))
            for (tmp, final), write in zip(staged, writers.values()):
                if final.is_dir():
                    raise UnrollError("expected a file name here, found a folder", where=str(final))
                with writing(final):
                    write(tmp)
            for tmp, final in staged:
                with writing(final):
                    os.replace(tmp, final)
        done = True
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not done:
            for path in created:  # innermost first; a folder someone else filled meanwhile stays
                with contextlib.suppress(OSError):
                    path.rmdir()
    return [final for _, final in staged]


def write_durably(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: after a rename onto the final name, a power cut
    leaves the new content or the old, never an empty file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    write_files(path.parent, {path.name: write})
    return path


def bytes_writer(data: bytes) -> Writer:
    return lambda tmp: write_durably(tmp, data)


def png_bytes(fig, **savefig) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed whatever happens (pyplot keeps
    every open figure alive)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", **savefig)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def text_writer(text: str) -> Writer:
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text_writer(text))


def csv_text(rows: list[dict], fields: list[str] | None = None) -> str:
    """One row per dict (floats to 6 significant digits)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields or list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_csv(path: str | Path, rows: list[dict], fields: list[str] | None = None) -> Path:
    return write_text(path, csv_text(rows, fields))
