"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written to a temporary name beside the target (same filesystem) and renamed with ``os.replace``
when complete; an interruption leaves the previous state intact and, at worst, a ``.<name>.ctxext-tmp-*``
leftover that the next write to the same target removes.

    with atomic_folder(out, replace=force) as tmp:
        model.save_pretrained(tmp)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".ctxext-tmp-"


def temporary_beside(final: str | os.PathLike, *, folder: bool) -> Path:
    """A fresh temporary folder (or file path) next to ``final``, after removing stale ones of earlier runs."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if folder:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)
    os.close(fd)
    return Path(name)


def commit_folder(tmp: Path, final: str | os.PathLike) -> Path:
    """Rename the complete folder ``tmp`` to ``final``; an existing ``final`` is swapped out, then deleted."""
    final = Path(final)
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
    try:
        yield tmp
        commit_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``."""
    path = Path(path)
    tmp = temporary_beside(path, folder=False)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))
