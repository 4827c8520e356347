"""Read and write Hugging Face checkpoints safely: safetensors only, no remote code, atomic output folders.

``patch_checkpoint(SRC, OUT, "yarn", factor=8)`` is what ``ctxext patch`` runs: it validates everything it can
from config.json and the weights' headers (``ctxext.validate``) before loading weights, patches in memory, and
writes OUT through a temporary folder beside it that is renamed only when complete, so an interrupted run leaves no
OUT (and an old OUT intact). OUT is locked for the run (``ctxext.io.lock``): a second run into it is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ctxext.errors import CheckpointError
from ctxext.io.atomic import TMP_MARK, atomic_folder
from ctxext.io.lock import output_lock
from ctxext.io.validate import check_checkpoint, check_finite_model, read_config

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = re.compile(
    r"^(tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|tokenizer\.model|vocab\.(json|txt)|"
    r"merges\.txt|chat_template\.(json|jinja)|spiece\.model)$"
)


def check_weights_format(src: str, allow_pickle: bool) -> None:
    path = Path(src)
    if not path.is_dir():
        return  # hub id: from_pretrained(use_safetensors=True) refuses pickles itself
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{src} has only pickled weights ({', '.join(pickles[:3])}); loading a pickle can run arbitrary code. "
            "Convert it to safetensors, or pass --allow-pickle if you trust the file"
        )
    if not pickles:
        raise CheckpointError(f"{src} has a config.json but no weights (*.safetensors)")


def check_output(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; choose another output folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder; it cannot be replaced by a checkpoint")
    parent = out.absolute().parent
    if not parent.is_dir():  # out/llama-32k with no out/ yet: made, as mkdir -p would
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"cannot write {out}: cannot make its parent folder {parent} ({err.strerror})"
            ) from err
    try:  # a real probe: os.access says yes to root even where the filesystem refuses
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}probe-", dir=parent))
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {parent} is not writable ({err.strerror})") from err
    return out


@contextmanager
def claim_output(out: str | os.PathLike, force: bool, command: str) -> Iterator[Path]:
    """``check_output``, then hold OUT's lock for the block (a second run into OUT is refused, naming this one)
    and check again under it (another run may have finished OUT meanwhile)."""
    check_output(out, force)
    with output_lock(out, command):
        yield check_output(out, force)


def load_config(src: str):
    """The config of SRC after ``ctxext.io.validate`` checked config.json."""
    return read_config(src)


def load_model(src: str, *, dtype: str = "auto", allow_pickle: bool = False):
    """Load a causal LM with stock transformers: safetensors only unless ``allow_pickle``, never remote code; the
    checkpoint is checked first (``ctxext.io.validate``) and its weights must be finite."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    check_weights_format(src, allow_pickle)
    checked = check_checkpoint(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=DTYPES[dtype], use_safetensors=None if allow_pickle else True, trust_remote_code=False
    ).eval()
    check_finite_model(model, checked)
    return model


def save_checkpoint(
    model,
    out: str | os.PathLike,
    *,
    source: str | None = None,
    tokenizer=None,
    force: bool = False,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``model`` as a complete safetensors checkpoint atomically, with ``tokenizer`` or SRC's tokenizer files;
    ``extra(folder)`` writes more files into it before it appears under its final name."""
    out = check_output(out, force)
    with atomic_folder(out, replace=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if getattr(model, "generation_config", None) is not None and not (tmp / "generation_config.json").exists():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None and Path(source).is_dir():
            for f in Path(source).iterdir():
                if TOKENIZER_FILES.match(f.name) and f.is_file():
                    shutil.copy2(f, tmp / f.name)
        if extra is not None:
            extra(tmp)
    return out
