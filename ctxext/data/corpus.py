"""Text every machine has: the running Python's standard-library source, split by file into train / held-out.

The split is a pure function of each file's path relative to the stdlib root (a SHA-256 bucket), so it is the
same on every machine and run: ``held_out`` files never appear in ``train``. The files themselves differ between
Python versions; ``$CTXEXT_STDLIB_ROOT`` names another copy of a standard library (e.g. the held-out files of the
Python a measurement was made with, copied to a machine with another Python) to read instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

HELD_OUT_PERCENT = 10


def stdlib_root() -> Path:
    """``$CTXEXT_STDLIB_ROOT`` if set, else the running Python's standard library."""
    return Path(os.environ.get("CTXEXT_STDLIB_ROOT") or sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """``"held_out"`` for about HELD_OUT_PERCENT % of paths, ``"train"`` for the rest (deterministic)."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100
    return "held_out" if bucket < HELD_OUT_PERCENT else "train"


def stdlib_files(split: str, root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of one split (``train`` or ``held_out``), site-packages excluded."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split {split!r} is invalid; valid: train, held_out")
    return list(_stdlib_files(split, root or stdlib_root()))


@functools.lru_cache(maxsize=8)
def _stdlib_files(split: str, root: Path) -> tuple[Path, ...]:  # a walk of the whole stdlib: once per process
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return tuple(sorted(p for p in files if split_of(p.relative_to(root).as_posix()) == split))


def package_files(name: str) -> list[Path]:
    """Sorted ``.py`` files of the installed package ``name`` (its tests included)."""
    import importlib.util

    from ctxext.errors import DataError

    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package:{name}: no installed package named {name!r}; give an importable package, e.g. package:numpy"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return sorted(root.rglob("*.py"))


def read_texts(files: list[Path]) -> list[str]:
    """UTF-8 contents of ``files``; files that are not valid UTF-8 (a few test fixtures) are skipped."""
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts
