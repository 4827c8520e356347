"""Resumable measurements: one JSON file per cell, written atomically as soon as the cell is measured.

A cell is one measurement of one model, named ``<model>/<measurement>`` (``yarn-x2/ppl-stdlib@16384``). Its file
holds the ``spec`` (everything that decides the result: checkpoint, chain and parameters, context, length, text,
trials, dtype), the result, the seconds it took, where it ran and the command that ran it. A run reuses a cell only
when the stored spec equals the one it would measure, so a changed setting re-measures that cell and nothing else;
an interrupted run loses at most the cell in progress; cells of one table may come from several runs and machines.

    cell = load_cell(root, "yarn-x2/passkey@8192", spec)        # None: not measured with this spec
    save_cell(root, "yarn-x2/passkey@8192", spec, result, seconds=412.0, device="cpu (1 thread)")
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

from ctxext.io.atomic import atomic_write_text


def _normal(spec: dict) -> dict:
    """The spec as JSON reads it back (tuples -> lists, int-valued floats kept), so stored and fresh specs compare."""
    return json.loads(json.dumps(spec, sort_keys=True))


def _versions() -> dict:
    """Python, torch and transformers versions: the software a cell was measured with (kept, not compared)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def cell_path(root: str | Path, name: str) -> Path:
    """``root/<model>/<measurement>.json``; characters outside ``[A-Za-z0-9_.@+-]`` become ``_``."""
    parts = [re.sub(r"[^A-Za-z0-9_.@+-]+", "_", p) for p in name.split("/")]
    return Path(root).joinpath(*parts).with_suffix(".json")


def load_cell(root: str | Path, name: str, spec: dict) -> dict | None:
    """The stored record of cell ``name`` if its spec equals ``spec``; None if absent, unreadable or stale."""
    path = cell_path(root, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("spec") == _normal(spec) else None


def save_cell(
    root: str | Path,
    name: str,
    spec: dict,
    result: dict,
    *,
    seconds: float,
    device: str,
    cpu_seconds: float | None = None,
) -> dict:
    """Write the record of cell ``name`` atomically (replacing a stale one) and return it. ``seconds``: wall
    clock; ``cpu_seconds``: the process's CPU time, which other jobs on a shared machine do not inflate."""
    record = {
        "name": name,
        "spec": _normal(spec),
        "result": result,
        "seconds": round(seconds, 1),
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join(["python", *sys.argv]),
        "versions": _versions(),
    }
    path = cell_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))
    return record
