"""Check a checkpoint before anything loads it: config.json, the safetensors files, shapes, values, tokenizer.

Every command that reads a checkpoint comes through here (``hub.load_config`` / ``hub.load_model`` /
``hub.describe_checkpoint``, so patch, info, eval, analyze, finetune, the demo and the GGUF export), and a damaged
or hostile checkpoint gets the same ``CheckpointError`` everywhere: the file, the problem and the fix, raised
before anything is written.

    config = read_config(src)                     # config.json: JSON, model_type, values (head_dim 0, NaN theta ...)
    checked = check_checkpoint(src)               # + every safetensors header, names and shapes against the config
    check_checkpoint(src, finite=True)            # + every tensor's values: NaN / inf (one tensor at a time)
    check_finite_model(model, checked)            # the same on a loaded model
    tokenizer = load_tokenizer(src, vocab_size)   # present, loadable, no ids beyond the embedding

Only headers are read unless ``finite``: safetensors' ``safe_open`` validates the header and that the data covers
the file exactly (a truncated or padded file fails), and the expected shapes come from the model built on the
``meta`` device (no memory).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxext.errors import CheckpointError

RESTORE = "restore it from the original checkpoint (or rerun the command that wrote it)"
POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "head_dim",
    "sliding_window",
    "original_max_position_embeddings",
)
POSITIVE_NUMBERS = (
    "rope_theta",
    "factor",
    "attention_factor",
    "low_freq_factor",
    "high_freq_factor",
    "rms_norm_eps",
    "partial_rotary_factor",
    "scale_base",
    "group_size",
    "window",
)
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # org/name; ./x or ../x are paths
TOKENIZER_CORE = re.compile(r"^(tokenizer\.json|tokenizer\.model|vocab\.(json|txt)|spiece\.model|.*\.tiktoken)$")


@dataclass
class CheckedCheckpoint:
    """What ``check_checkpoint`` read: the config, the raw config.json, and where each tensor is stored."""

    path: str
    config: Any
    raw: dict
    files: list[Path] = field(default_factory=list)
    tensors: dict[str, tuple[Path, tuple[int, ...]]] = field(default_factory=dict)


# ---------------------------------------------------------------- config.json


def read_raw_config(src: str | os.PathLike) -> tuple[Path, dict]:
    """``(path, mapping)`` of SRC/config.json; ``CheckpointError`` when it is unreadable, not JSON or not a model's
    config."""
    path = Path(src) / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); {RESTORE}") from None
    try:
        raw = json.loads(text)
    except ValueError as err:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({err})"
        raise CheckpointError(f"{path} {problem}; {RESTORE}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not a model config (an object); {RESTORE}")
    if not isinstance(raw.get("model_type"), str):
        raise CheckpointError(f"{path} has no model_type, so it is no Hugging Face model config; {RESTORE}")
    return path, raw


def _bad_value(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the config value ``key`` (None: it can)."""
    if isinstance(value, bool):
        return None if key not in POSITIVE_INTS + POSITIVE_NUMBERS else "a number, not true/false"
    if key in POSITIVE_INTS and value is not None and (not isinstance(value, int) or value < 1):
        return "a positive integer"
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if key in POSITIVE_NUMBERS and isinstance(value, (int, float)) and value <= 0:
        return "a positive number"
    if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        return "a list of finite numbers"
    return None


def _rope_dicts(values: Mapping) -> list[tuple[str, Mapping]]:
    out = []
    for key in ("rope_parameters", "rope_scaling"):
        rope = values.get(key)
        if isinstance(rope, Mapping):
            nested = [(f"{key}.{k}", v) for k, v in rope.items() if isinstance(v, Mapping)]
            out += nested or [(key, rope)]
    return out


def check_config_values(values: Mapping, path: Path) -> None:
    """Absurd values (head_dim 0, max_position_embeddings -1, rope_theta NaN, ...) name the key and the rule."""
    checks = [(k, values[k]) for k in POSITIVE_INTS + POSITIVE_NUMBERS if k in values]
    for key in ("rope_parameters", "rope_scaling"):
        if values.get(key) is not None and not isinstance(values[key], Mapping):
            raise CheckpointError(
                f"{path}: {key} is {values[key]!r} ({type(values[key]).__name__}); it must be a mapping such as "
                f'{{"rope_type": "default", "rope_theta": 10000.0}} (or one per layer type). Correct it, or {RESTORE}'
            )
    for where, rope in _rope_dicts(values):
        checks += [(f"{where}.{k}", v) for k, v in rope.items() if isinstance(v, (int, float, list))]
    for key, value in checks:
        why = _bad_value(key.rsplit(".", 1)[-1], value)
        if why:
            raise CheckpointError(f"{path}: {key} is {value!r}; it must be {why}. Correct it, or {RESTORE}")


def check_config_shape(config, path: Path) -> None:
    """Values that only make sense together: heads, key/value heads and the rotary head size."""
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise CheckpointError(
            f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; {RESTORE}"
        )
    if getattr(config, "head_dim", None) is None and isinstance(heads, int) and config.hidden_size % heads:
        raise CheckpointError(
            f"{path}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
            f"{heads} and no head_dim is given; {RESTORE}"
        )
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int) and head_dim % 2:
        raise CheckpointError(
            f"{path}: head_dim {head_dim} is odd; rotary embeddings rotate pairs of dimensions, "
            f"so it must be even. {RESTORE[0].upper() + RESTORE[1:]}"
        )


def hub_config(model_id: str, fix: str = "") -> tuple[str, dict]:
    """``(where, config.json)`` of a hub id: from the local Hugging Face cache first; from the Hub only when it is
    reachable. Offline (``HF_HUB_OFFLINE``, or the Hub's host does not answer within a few seconds) an id that is
    not cached fails at once, instead of after huggingface_hub's retries (30-60 s). ``fix``: what else the caller
    accepts, ending every error's advice (e.g. "or a shape with --shape ...")."""
    if HUB_ID.fullmatch(model_id) is None:
        raise CheckpointError(
            f"model {model_id!r} is neither a local checkpoint folder nor an org/name hub id; give "
            f"a folder that holds config.json{', ' + fix if fix else ''}"
        )
    from huggingface_hub import constants, hf_hub_download

    def read(file: str) -> tuple[str, dict]:
        try:
            return file, json.loads(Path(file).read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{file} (config.json of {model_id}) cannot be read: {err}") from None

    try:
        cached = hf_hub_download(model_id, "config.json", local_files_only=True)
    except Exception:  # noqa: BLE001  (not in the cache, in any of huggingface_hub's wordings)
        cached = None
    if cached is not None:
        return read(cached)
    unreachable = (
        "HF_HUB_OFFLINE is set"
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        else hub_unreachable(constants.ENDPOINT)
    )
    if unreachable:
        raise CheckpointError(
            f"model {model_id!r} is not a local folder and its config.json is not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the Hub cannot be reached "
            f"({unreachable}). Download the model when online, or give a local checkpoint folder"
            f"{', ' + fix if fix else ''}"
        )
    try:
        fetched = hf_hub_download(model_id, "config.json")
    except Exception as err:  # noqa: BLE001  (gated, missing, no config.json, a network error)
        raise CheckpointError(
            f"cannot fetch config.json of model {model_id!r} ({type(err).__name__}: "
            f"{str(err)[:200]}); give a local checkpoint folder{', ' + fix if fix else ''}"
        ) from None
    return read(fetched)


def hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why ``endpoint`` cannot be reached now (None: a TCP connection opened). Behind a proxy nothing is probed."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"
    return None


def read_config(src: str | os.PathLike):
    """The transformers config of checkpoint SRC (a folder or a hub id), after checking config.json."""
    from transformers import AutoConfig

    from ctxext.models.attention import register_with_transformers

    register_with_transformers()  # a config of ctxext's attention types validates before any model class loads

    path = Path(src) / "config.json"
    if Path(src).is_dir():
        path, raw = read_raw_config(src)
        check_config_values(raw, path)
    else:  # a hub id: a missing folder, or an id neither cached nor reachable, fails here at once
        hub_config(str(src))
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001  (transformers raises many types; all mean "this file")
        raise CheckpointError(f"cannot read the config of {src} ({type(err).__name__}: {err}); {RESTORE}") from None
    check_config_values(config.to_dict(), path)  # transformers' defaults for what config.json leaves out
    check_config_shape(config, path)
    return config


# ---------------------------------------------------------------- weights


def weight_files(src: Path) -> list[Path]:
    """The safetensors files transformers would read: the index's shards, else model.safetensors, else all."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err}); {RESTORE}") from None
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                f"missing from {src}; copy every shard of the checkpoint"
            )
        return [src / s for s in shards]
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    return sorted(src.glob("*.safetensors"))


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """``name -> (file, shape)`` from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    tensors: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        size = f.stat().st_size
        if size == 0:
            raise CheckpointError(f"{f} is empty (0 bytes); {RESTORE}")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118  (safe_open is not iterable)
                    tensors[name] = (f, tuple(sf.get_slice(name).get_shape()))
        except Exception as err:  # noqa: BLE001  (safetensors' Rust error or OSError: header or data damaged)
            reason = str(err).removeprefix("Error while deserializing header: ")
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({reason}; {size:,} bytes): it is truncated "
                f"or corrupt; {RESTORE}"
            ) from None
    return tensors


def expected_shapes(config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """``(name -> shape, names that may be absent)`` of the model ``config`` describes, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = set(getattr(model, "all_tied_weights_keys", None) or {})
    optional |= {
        k for k in shapes for pattern in (model._keys_to_ignore_on_load_missing or []) if re.search(pattern, k)
    }
    return shapes, optional


def check_shapes(checked: CheckedCheckpoint) -> None:
    """Every tensor the config describes is stored, with the shape the config implies."""
    try:
        expected, optional = expected_shapes(checked.config)
    except (ValueError, KeyError):  # no causal LM of this model_type: the family check says so in its own words
        return
    stored = checked.tensors
    prefix = getattr(checked.config, "base_model_prefix", None) or "model"
    if stored and not set(stored) & set(expected):  # a base-model checkpoint: names lack the "model." prefix
        stored = {f"{prefix}.{k}": v for k, v in stored.items()}
    unset = [k for k in ARCHITECTURE_KEYS if k not in checked.raw]
    note = f" (config.json does not set {', '.join(unset)}: transformers' defaults apply)" if unset else ""
    for name, shape in expected.items():
        if name not in stored:
            continue
        file, got = stored[name]
        if got != shape:
            rows = (
                f"; vocab_size is {checked.config.vocab_size} in config.json but the weights have {got[0]} rows"
                if name.endswith(("embed_tokens.weight", "lm_head.weight")) and got[1:] == shape[1:]
                else ""
            )
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(got)} but config.json describes {list(shape)}{rows}{note}; "
                "the weights and config.json belong to different models. Restore the matching config.json or weights"
            )
    missing = [n for n in expected if n not in stored and n not in optional]
    if missing:
        names = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(
            f"{checked.path}: the weights ({', '.join(f.name for f in checked.files)}) lack {names}, which config.json "
            f"describes{note}; the weights and config.json belong to different models, or shards are missing. "
            "Restore the matching config.json or weights"
        )


def _nonfinite(tensor) -> tuple[int, int]:
    import torch

    if not tensor.is_floating_point():
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def _nonfinite_error(where: str, name: str, nan: int, inf: int) -> CheckpointError:
    return CheckpointError(
        f"{where}: tensor {name} holds {nan:,} NaN and {inf:,} infinite values; the weights are "
        "corrupt or come from a diverged training run. Use an earlier (good) checkpoint"
    )


def check_finite_files(checked: CheckedCheckpoint) -> None:
    """Every floating tensor of every file is finite (read one tensor at a time)."""
    from safetensors import safe_open

    for f in checked.files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118  (safe_open is not iterable)
                nan, inf = _nonfinite(sf.get_tensor(name))
                if nan or inf:
                    raise _nonfinite_error(str(f), name, nan, inf)


def check_finite_model(model, checked: CheckedCheckpoint | None = None) -> None:
    """Every parameter of a loaded model is finite; the error names the file that stored a bad tensor."""
    for name, p in model.named_parameters():
        nan, inf = _nonfinite(p.detach())
        if nan or inf:
            where = checked.tensors.get(name, (Path(checked.path),))[0] if checked else "the loaded model"
            raise _nonfinite_error(str(where), name, nan, inf)


def check_checkpoint(src: str | os.PathLike, *, finite: bool = False) -> CheckedCheckpoint:
    """config.json, then (for a local folder) every safetensors header, then names and shapes against the config;
    ``finite`` also reads every tensor for NaN / inf."""
    config = read_config(src)
    path = Path(src)
    if not path.is_dir():  # a hub id: transformers downloads and checks it
        return CheckedCheckpoint(str(src), config, {})
    checked = CheckedCheckpoint(str(src), config, read_raw_config(path)[1], files=weight_files(path))
    if not checked.files:
        return checked  # pickled weights or none: hub.check_weights_format says which
    checked.tensors = read_headers(checked.files)
    check_shapes(checked)
    if finite:
        check_finite_files(checked)
    return checked


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(src: str | os.PathLike, vocab_size: int | None = None):
    """The tokenizer of checkpoint SRC; ``CheckpointError`` when it has none, cannot be loaded, or makes ids that
    the model's embedding (``vocab_size`` rows) does not have."""
    from transformers import AutoTokenizer

    path = Path(src)
    files = sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    if path.is_dir() and not any(TOKENIZER_CORE.match(f) for f in files):
        raise CheckpointError(
            f"{src} has no tokenizer (no tokenizer.json, tokenizer.model or vocab file); copy the "
            "tokenizer files of the model it came from into it"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as err:  # noqa: BLE001  (many types on damaged files)
        shown = ", ".join(f for f in files if f.startswith(("tokenizer", "vocab", "merges", "special", "spiece")))
        raise CheckpointError(
            f"the tokenizer of {src} cannot be loaded ({type(err).__name__}: {str(err)[:200]}); its "
            f"files ({shown}) are damaged or incomplete: copy them again from the original model"
        ) from None
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer of {src} has {len(tokenizer):,} tokens but the model's vocab_size is "
            f"{vocab_size:,}: ids past the embedding would crash. Use the model's own tokenizer"
        )
    return tokenizer
