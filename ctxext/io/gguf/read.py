"""Convert a GGUF file to an ordinary safetensors checkpoint (float32) with its tokenizer.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")    # what `ctxext convert` runs

The file is checked first (header, every tensor inside the file, every quantization dequantizable, an
architecture that both transformers' GGUF loader and ctxext handle), so a bad file fails before anything is
written. transformers' own GGUF loader dequantizes the weights and builds the tokenizer; its config misses what
llama.cpp reads from the rope metadata (scaling type, factor, ``rope_freqs``), so ``rope.py`` translates that into
``rope_parameters``. Gemma 3 keeps them per layer type: the file's rope is its global (``full_attention``) layers',
the sliding-window layers run llama.cpp's fixed ``rope.SLIDING_WINDOW_ROPE`` (theta 10,000); its layer types and
window are transformers' (the same pattern llama.cpp uses). A GGUF-loaded model refuses ``save_pretrained``, so
the model is rebuilt from its config and state dict and written through ``hub.save_checkpoint`` (temporary
folder, renamed when complete).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctxext.errors import CheckpointError
from ctxext.io.checkpoint import claim_output, save_checkpoint
from ctxext.io.gguf.rope import SLIDING_WINDOW_ROPE, GGUFRope, RopeExportError, parameters_from_gguf_rope
from ctxext.io.gguf.tokenizer import PRE_TOKENIZERS, restore_pre_tokenizer
from ctxext.models import family_of

log = logging.getLogger(__name__)

# llama.cpp architecture -> transformers model_type, for the families ctxext patches
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# the rope scalings a GGUF may carry per architecture (llama: any that rope.py translates; gemma3: linear on the
# global layers, as Gemma 3 4B and larger ship); the others' are refused rather than dropped
SCALINGS = {"gemma3": ("default", "linear")}


def _field(reader, key: str, default: Any = None) -> Any:
    fields = reader if isinstance(reader, dict) else reader.fields
    field = fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def read_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for PATH after checking the file is whole; ``CheckpointError`` names what is wrong."""
    try:
        from gguf import GGUFReader
    except ImportError as err:  # optional extra
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'ctxext[gguf]'") from err
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; give the path of a .gguf file")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001  (ValueError, IndexError, struct errors... on a damaged header)
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); it may be truncated or corrupt: "
            "download or export it again"
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name} needs bytes up to {t.data_offset + int(t.n_bytes)} but the file "
                f"has {size}; download or export it again"
            )
    return reader


def _check_convertible(path: Path, reader) -> str:
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES or arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path} holds a {arch!r} model; ctxext converts GGUF files of the architectures "
            f"{', '.join(a for a in ARCHITECTURES if a in GGUF_SUPPORTED_ARCHITECTURES)}"
        )
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen:
            continue
        seen.add(t.tensor_type)
        try:
            dequantize(t.data[:1], t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {t.name} is quantized as {t.tensor_type.name}, which the gguf package cannot "
                "dequantize; use a file with another quantization (Q8_0, Q4_K_M, F16 ...)"
            ) from None
    if _field(reader, "tokenizer.ggml.model") is None:
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.ggml.model); ctxext needs one to write a checkpoint")
    return arch


def gguf_rope(reader, arch: str) -> tuple[GGUFRope, int, int]:
    """``(rope as llama.cpp reads it, head_dim, context length)`` of a GGUF file."""
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    context = int(_field(reader, f"{arch}.context_length"))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    rope = GGUFRope(
        freq_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        scaling_type=str(
            _field(
                reader,
                f"{arch}.rope.scaling.type",
                "linear" if _field(reader, f"{arch}.rope.scaling.factor") else "none",
            )
        ),
        factor=_field(reader, f"{arch}.rope.scaling.factor"),
        original_context=_field(reader, f"{arch}.rope.scaling.original_context_length", context),  # llama.cpp's default
        attn_factor=float(_field(reader, f"{arch}.rope.scaling.attn_factor", 1.0)),
        freq_divisors=tuple(np.asarray(freqs.data, dtype=np.float64).tolist()) if freqs is not None else None,
    )
    if rope.factor is not None and float(rope.factor) in (0.0, 1.0) and rope.scaling_type in ("linear", "none"):
        rope = GGUFRope(rope.freq_base, "none", None, None, rope.attn_factor, rope.freq_divisors)
    return rope, head_dim, context


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the GGUF file PATH as a float32 safetensors checkpoint OUT (module docstring)."""
    path = Path(path)
    reader = read_gguf(path)
    arch = _check_convertible(path, reader)
    rope, head_dim, context = gguf_rope(reader, arch)
    try:
        rope_parameters = parameters_from_gguf_rope(rope, head_dim, context)
    except RopeExportError as err:
        raise CheckpointError(f"{path}: {err}") from None
    allowed = SCALINGS.get(arch, ("default",))
    if arch != "llama" and rope_parameters["rope_type"] not in allowed:
        scaling = [f"type {rope.scaling_type}", f"factor {rope.factor}" if rope.factor else ""]
        scaling += ["per-pair rope_freqs" if rope.freq_divisors else ""]
        scaling += [f"attn_factor {rope.attn_factor}" if rope.attn_factor != 1.0 else ""]
        raise CheckpointError(
            f"{path}: a {arch!r} GGUF with rope scaling ({', '.join(s for s in scaling if s)}) is not converted; "
            "ctxext converts the rope scaling of llama files and linear scaling of gemma3 ones"
        )
    if arch in SLIDING_WINDOW_ROPE and _field(reader, f"{arch}.attention.sliding_window") is None:
        raise CheckpointError(
            f"{path} has no {arch}.attention.sliding_window: llama.cpp runs such a {arch} file without sliding-window "
            "layers, which ctxext does not convert; use a file converted with the window"
        )
    gguf_reader_meta = {
        k: reader.fields[k] for k in ("tokenizer.ggml.pre", "tokenizer.ggml.model") if k in reader.fields
    }
    with claim_output(out, force, "ctxext convert"), _parsed_once(path, reader):
        return _dequantize_and_save(path, out, arch, rope_parameters, gguf_reader_meta, force)


@contextmanager
def _parsed_once(path: Path, reader):
    """transformers' GGUF loader parses the file's metadata again for the model, the config and the tokenizer (about
    10 s each for Gemma's 262,144-token vocabulary): within a conversion each of them gets ``reader``, the one ctxext
    parsed and checked."""
    import gguf

    stock, wanted = gguf.GGUFReader, path.resolve()

    def reader_for(file, *args, **kwargs):
        return reader if not args and not kwargs and Path(file).resolve() == wanted else stock(file, *args, **kwargs)

    gguf.GGUFReader = reader_for
    try:
        yield
    finally:
        gguf.GGUFReader = stock


def _config_rope(config, arch: str, rope_parameters: dict) -> dict:
    """The rebuilt config's ``rope_parameters``: the file's rope, or for a family keyed by layer type (Gemma 3) the
    file's rope on the global layers and llama.cpp's fixed one on the sliding-window layers."""
    if not family_of(config).per_layer_type:
        return rope_parameters
    return {"full_attention": rope_parameters, "sliding_attention": dict(SLIDING_WINDOW_ROPE[arch])}


def _dequantize_and_save(
    path: Path, out, arch: str, rope_parameters: dict, gguf_reader_meta: dict, force: bool
) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.absolute().parent), str(path.absolute())
    log.info("dequantizing %s with transformers' GGUF loader", path)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.rope_parameters = _config_rope(config, arch, rope_parameters)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"internal error: rebuilt model does not match the GGUF weights: {missing} {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with tempfile.TemporaryDirectory(prefix="ctxext-gguf-tokenizer-") as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        pre = _field(gguf_reader_meta, "tokenizer.ggml.pre")
        if pre and restore_pre_tokenizer(tok_dir, pre):
            log.info("tokenizer: restored llama.cpp's %r pre-tokenizer that transformers' GGUF loader drops", pre)
        elif pre and pre not in PRE_TOKENIZERS and _field(gguf_reader_meta, "tokenizer.ggml.model") == "gpt2":
            log.warning(
                "tokenizer: llama.cpp pre-tokenizer %r is not checked by ctxext; transformers' conversion "
                "may split text differently from llama.cpp",
                pre,
            )
        written = save_checkpoint(model.eval(), out, source=tok_dir, force=force)
    log.info("converted %s -> %s (rope %s)", path, written, rope_parameters["rope_type"])
    return written
