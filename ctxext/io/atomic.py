"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written to a temporary name beside the target (same filesystem), flushed to disk (fsync) and renamed
with ``os.replace`` when complete; an interruption leaves the previous state intact and, at worst, a
``.<name>.ctxext-tmp-*`` leftover that the next write to the same target removes. A full disk (ENOSPC, also when
safetensors or torch report it in their own words) becomes an ``OutputError`` that says so and what was kept.

    with atomic_folder(out, replace=force) as tmp:
        model.save_pretrained(tmp)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ctxext.errors import OutputError

log = logging.getLogger(__name__)
TMP_MARK = ".ctxext-tmp-"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# how safetensors (Rust) and torch.save (C++) word a full disk; torch's "unexpected pos" and numpy's "N requested
# and M written" say nothing, so with those a filesystem with less than FULL_BELOW bytes free counts as full too
DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
FULL_BELOW = 1 << 20


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_full(err: BaseException, path: str | os.PathLike) -> OutputError | None:
    """An ``OutputError`` naming the filesystem of ``path`` when ``err`` means it is full, else None."""
    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = any(
        (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) or any(t in str(e) for t in DISK_FULL_TEXTS)
        for e in chain
    )
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        usage = None
    wordless = isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno is None)  # a short write
    if not said and not (wordless and usage is not None and usage.free < FULL_BELOW):
        return None
    space = f" ({_human(usage.free)} free of {_human(usage.total)})" if usage is not None else ""
    return OutputError(
        f"no space left on the disk that holds {path}{space} while writing it; free some space or "
        "choose an output folder on another disk, then run the command again"
    )


@contextmanager
def abandon_on_error(tmp: Path, final: str | os.PathLike) -> Iterator[None]:
    """Remove the temporary ``tmp`` if the block fails; a full disk is re-raised as ``OutputError`` saying that
    ``final`` is as it was."""
    try:
        yield
    except BaseException as err:
        full = disk_full(err, final)  # before the cleanup frees space: "less than 1 MiB free" is one of its tests
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if full is None:
            raise
        kept = f"{final} is unchanged" if Path(final).exists() else f"{final} was not created"
        raise OutputError(f"{full}. Nothing was written: {kept}") from err


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk (a rename after it is durable)."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temporary_beside(final: str | os.PathLike, *, folder: bool) -> Path:
    """A fresh temporary folder (or file path) next to ``final``, after removing stale ones of earlier runs."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted_swap(final)
    for stale in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if folder:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)
    os.close(fd)
    return Path(name)


def restore_interrupted_swap(final: Path) -> None:
    """If a run was killed between the two renames of ``commit_folder`` (``final`` moved aside, the new one not yet
    in place), put the previous complete ``final`` back."""
    if final.exists():
        return
    for previous in sorted(final.parent.glob(f".{final.name}{TMP_MARK}old-*/previous")):
        os.replace(previous, final)
        log.warning("restored %s, which an interrupted replacement had moved aside", final)
        return


def commit_folder(tmp: Path, final: str | os.PathLike) -> Path:
    """Rename the complete folder ``tmp`` to ``final``; an existing ``final`` is swapped out, then deleted."""
    final = Path(final)
    fsync_tree(tmp)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}old-", dir=final.absolute().parent))
        os.replace(final, old / "previous")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


@contextmanager
def atomic_folder(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``final`` (replacing it only if ``replace``)."""
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists")  # callers check first and raise their own error; this is a bug guard
    tmp = temporary_beside(final, folder=True)
    with abandon_on_error(tmp, final):
        yield tmp
        commit_folder(tmp, final)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``."""
    path = Path(path)
    tmp = temporary_beside(path, folder=False)
    with abandon_on_error(tmp, path):
        write(tmp)
        fsync_tree(tmp)
        os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
