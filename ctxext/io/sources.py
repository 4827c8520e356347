"""Named model sources: the reference model that ships with ctxext (trained by ``scripts/train_reference.py``)."""

from __future__ import annotations

from pathlib import Path

from ctxext.errors import CheckpointError

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
