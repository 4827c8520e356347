"""Predicted peak memory per device of one fine-tuning step: will the job fit before it is launched?

    ctxext plan configs/llama3-8b-128k-cp.yaml --shape llama3-8b        # what `ctxext plan` prints
    estimate(SHAPES["llama3-8b"], Setup(seq_len=32768, tuning="full", devices=8, sharding="fsdp"))

The model counts what the training loop of ``ctxext.train`` keeps alive (formulas and their check against measured
peaks: docs/guides/scaling.md):

- weights: every parameter in the model's dtype, LoRA adapters in float32 (peft upcasts bf16/fp16 adapters);
- gradients and AdamW's two states in the dtype of each trainable parameter (torch's AdamW keeps no fp32 master
  copy), plus the optimizer step's temporary (foreach on GPU: one tensor per trainable parameter at once);
- activations under checkpointing: one hidden state per layer and token, plus one layer recomputed in backward
  with the gradients in flight (``layer_bytes_per_token``);
- the chunked loss (``ctxext.train.loss``): ``[chunk, vocab]`` fp32 logits, the stored gradient of the hidden states
  and, when the LM head trains (tied embeddings), its fp32 gradient accumulator;
- FSDP2 (``fully_shard`` per decoder layer and on the root): weights, gradients and states divided by the
  devices, plus two gathered layers (current and prefetched) and the root's gathered weights (embeddings, head);
- context parallel: every per-token term divided by ``cp_size``, plus the gathered keys and values of one layer.

Not counted: the CUDA context and kernels' workspaces (about 0.5-1 GiB per GPU), allocator fragmentation and
communication buffers; ``fits`` keeps a headroom for them.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, replace
from typing import Literal

from ctxext.errors import ConfigError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FIT_HEADROOM = 0.10  # share of the device kept free for the CUDA context, fragmentation and communication buffers


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-like decoder (the families ctxext supports share this layout)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config (object or config.json dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=head_dim,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden_size  # + two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, an untied LM head."""
        return self.embedding_params * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params


# Llama-3-like shapes (the published configs of Llama 3.2 1B, Llama 3.1 8B and 70B)
SHAPES = {
    "llama3-1b": ModelShape(128256, 2048, 8192, 16, 32, 8, 64, True),
    "llama3-8b": ModelShape(128256, 4096, 14336, 32, 32, 8, 128, False),
    "llama3-70b": ModelShape(128256, 8192, 28672, 80, 64, 8, 128, False),
}


@dataclass(frozen=True)
class Setup:
    """One training step as ``ctxext.train`` runs it (defaults: the config's defaults)."""

    seq_len: int
    micro_batch_size: int = 1
    tuning: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train_embeddings: bool = False
    train_norms: bool = False
    dtype: str = "bfloat16"
    activation_checkpointing: bool = True
    loss_chunk_tokens: int = 1024
    devices: int = 1
    sharding: Literal["none", "fsdp"] = "none"
    cp_size: int = 1
    device_type: Literal["cuda", "cpu"] = "cuda"  # the optimizer step's temporaries differ (foreach on GPU)


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per device. ``phases`` holds every phase of the step with its named parts; the largest
    is the peak (``phase``), and ``parts`` are its parts."""

    phases: dict[str, dict[str, int]]
    trainable: int
    params: int

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda k: sum(self.phases[k].values()))

    @property
    def parts(self) -> dict[str, int]:
        return {k: v for k, v in self.phases[self.phase].items() if v}

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= device_bytes * (1 - FIT_HEADROOM)


def _adapted(shape: ModelShape, s: Setup) -> dict[str, tuple[int, int]]:
    """The linear layers that carry LoRA adapters (none for full tuning)."""
    if s.tuning == "full":
        return {}
    if list(s.lora_targets) == ["all-linear"]:
        return shape.linears()
    return {n: d for n, d in shape.linears().items() if n in s.lora_targets}


def layer_saved_bytes_per_token(shape: ModelShape, s: Setup) -> int:
    """What autograd keeps of one decoder layer for its backward, per token: the layer as it is recomputed under
    checkpointing (or kept without). A tensor is kept only when a backward formula needs it: a frozen linear keeps
    nothing of its input, an adapted one keeps its input (a float32 copy per adapter in a bf16/fp16 model), SDPA
    (flash / memory-efficient kernel: no [L, L] scores) keeps q, k, v, its output and the logsumexp."""
    b = DTYPE_BYTES[s.dtype]
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    full = s.tuning == "full"
    adapted = _adapted(shape, s)
    saved = 4 * h + (4 * h if b < 4 else 0)  # the norms' float32 inputs (the first one is the checkpoint in fp32)
    saved += b * (2 * q + 2 * kv) + 4 * shape.num_heads  # rotated q, k; v; SDPA output; logsumexp
    saved += b * 3 * i  # gate, silu(gate), up
    if full or s.train_norms:
        saved += 2 * b * h  # the normalized inputs of the two norm weights
    # the inputs of the linear layers, by the tensor they read: (width, the linears that read it)
    for width, readers in (
        (h, ("q_proj", "k_proj", "v_proj")),
        (q, ("o_proj",)),
        (h, ("gate_proj", "up_proj")),
        (i, ("down_proj",)),
    ):
        n = sum(r in adapted for r in readers)
        if full:
            saved += b * width
        elif n:
            saved += 4 * width * (n if b < 4 else 1)
        saved += n * 4 * s.lora_r  # lora_B's input
    return saved


def layer_in_flight_bytes_per_token(shape: ModelShape, s: Setup) -> int:
    """Beside the saved tensors while a layer runs (forward) or runs backward: the MLP's three [intermediate]-wide
    tensors (or their gradients) and the hidden state coming in and going out."""
    return DTYPE_BYTES[s.dtype] * (3 * shape.intermediate_size + 2 * shape.hidden_size)


def estimate(shape: ModelShape, s: Setup) -> Estimate:
    """Predicted peak memory per device of one optimizer step (a step after the first: optimizer states exist)."""
    if s.cp_size > 1 and s.sharding != "fsdp":
        raise ConfigError(f"cp_size={s.cp_size} needs sharding='fsdp' (context parallel runs on FSDP2)")
    if s.devices % s.cp_size:
        raise ConfigError(f"devices={s.devices} is not a multiple of cp_size={s.cp_size}")
    b = DTYPE_BYTES[s.dtype]
    h, v, n_layers = shape.hidden_size, shape.vocab_size, shape.num_layers
    shard = s.devices if s.sharding == "fsdp" else 1
    sharded = s.sharding == "fsdp" and shard > 1
    full = s.tuning == "full"

    # ---- parameters, gradients, optimizer states
    adapter_params = n_layers * sum(s.lora_r * (a + c) for a, c in _adapted(shape, s).values())
    native_trainable = (
        shape.params
        if full
        else ((shape.embedding_params if s.train_embeddings else 0) + ((2 * n_layers + 1) * h if s.train_norms else 0))
    )
    trainable = native_trainable * b + adapter_params * 4  # bytes; adapters in float32
    head_trains = full or s.train_embeddings  # the LM head's weight (tied: the embeddings)
    layer_trainable = (
        shape.layer_params * b if full else adapter_params // n_layers * 4 + (2 * h * b if s.train_norms else 0)
    )
    weights = (shape.params * b + adapter_params * 4) // shard
    states = 2 * trainable // shard  # AdamW's exp_avg and exp_avg_sq, in each parameter's dtype
    grads = trainable // shard
    if s.device_type == "cuda":  # foreach AdamW: a temporary as large as all trainable parameters
        step_temp = trainable // shard
    else:  # single-tensor AdamW: two temporaries as large as the largest trainable parameter
        largest = max(
            [shape.embedding_params * b] * head_trains
            + [max(a * c for a, c in shape.linears().values()) * b] * full
            + [s.lora_r * max(a for a, _ in shape.linears().values()) * 4]
        )
        step_temp = 2 * largest // shard
    fixed = {"weights": weights, "optimizer states": states}
    if s.devices > 1 and s.sharding == "none":
        fixed["DDP gradient buckets"] = trainable
    if sharded:  # the root (embeddings, head, final norm) stays gathered for forward and backward; two layers
        # gathered at a time (current + prefetched)
        fixed["FSDP gathered weights"] = shape.root_params * b + 2 * (
            shape.layer_params * b + (adapter_params // n_layers * 4)
        )

    # ---- activations: tokens per device
    tokens = s.micro_batch_size * s.seq_len // s.cp_size
    hidden = tokens * h * b
    per_layer = tokens * layer_saved_bytes_per_token(shape, s)
    in_flight = tokens * layer_in_flight_bytes_per_token(shape, s)
    rope = tokens * 2 * shape.head_dim * b  # cos and sin, shared by the layers
    # under checkpointing every layer keeps its input; without, everything it saves
    kept_layer = hidden if s.activation_checkpointing else per_layer + hidden
    recompute = per_layer if s.activation_checkpointing else 0
    cp_kv = 0
    if s.cp_size > 1:  # the all-gathered keys and values of the running layer, and their gradients in backward
        cp_kv = 4 * s.micro_batch_size * s.seq_len * shape.num_kv_heads * shape.head_dim * b
    chunk = min(s.loss_chunk_tokens, tokens)
    final = tokens * 4 * h + hidden  # the final norm's float32 input, its output
    logits = chunk * v * (4 + (b if b < 4 else 0)) + (chunk * h * 4 if head_trains else 0)
    head_accumulator = v * h * 4 if head_trains else 0
    layer_grads = layer_trainable // shard
    head_grad = shape.embedding_params * b // shard if head_trains else 0

    phases = {
        "forward": {
            **fixed,
            "layer inputs": n_layers * kept_layer + rope,
            "layer in flight": in_flight,
            "context-parallel K/V": cp_kv // 2,
        },
        "loss": {
            **fixed,
            "layer inputs": n_layers * kept_layer + rope,
            "final norm": final,
            "loss: hidden gradient": hidden,
            "loss: logits chunk": logits,
            "loss: head gradient (fp32)": head_accumulator,
        },
        "loss backward": {
            **fixed,
            "layer inputs": n_layers * kept_layer + rope,
            "hidden gradients": 2 * hidden,
            "head gradient": head_grad + (2 * 4 * v * h if head_trains else 0),
        },
        # through the layers, last to first: the inputs still to go shrink while the layers' gradients (full
        # tuning) grow; the larger end is the peak
        "backward": {
            **fixed,
            **max(
                (
                    {"layer inputs": n_layers * kept_layer + rope, "gradients": head_grad},
                    {"layer inputs": kept_layer + rope, "gradients": head_grad + (n_layers - 1) * layer_grads},
                ),
                key=lambda d: sum(d.values()),
            ),
            "layer recomputed": recompute,
            "layer in flight": in_flight,
            "hidden gradients": hidden,
            "context-parallel K/V": cp_kv,
            "FSDP unsharded layer gradients": layer_trainable if sharded else 0,
        },
        "optimizer step": {**fixed, "gradients": grads, "optimizer temporaries": step_temp},
    }
    return Estimate(
        phases={k: {n: int(x) for n, x in d.items() if x} for k, d in phases.items()},
        trainable=native_trainable + adapter_params,
        params=shape.params + adapter_params,
    )


def setups_from_config(
    cfg, *, devices: int | None = None, cp_size: int | None = None, device_type: str = "cuda", dtype: str | None = None
) -> list[Setup]:
    """One ``Setup`` per stage of a ``FinetuneConfig`` (``devices`` / ``cp_size`` override its distributed
    section; a model dtype ``auto`` needs ``dtype``: the checkpoint's stored dtype)."""
    dist = cfg.distributed
    n = devices or dist.num_processes or 1
    cp = cp_size or dist.cp_size
    model_dtype = cfg.model.dtype if cfg.model.dtype != "auto" else (dtype or "bfloat16")
    base = Setup(
        seq_len=1,
        micro_batch_size=cfg.optimization.micro_batch_size,
        tuning=cfg.tuning,
        lora_r=cfg.lora.r,
        lora_targets=tuple(cfg.lora.target_modules),
        train_embeddings=cfg.lora.train_embeddings,
        train_norms=cfg.lora.train_norms,
        dtype=model_dtype,
        activation_checkpointing=cfg.optimization.activation_checkpointing,
        loss_chunk_tokens=cfg.optimization.loss_chunk_tokens,
        devices=n,
        sharding="fsdp" if cp > 1 else dist.sharding,
        cp_size=cp,  # CP runs on FSDP2
        device_type=device_type,
    )
    return [replace(base, seq_len=stage.block_len) for stage in cfg.stages]


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def model_shape(path: str) -> tuple[ModelShape, str | None]:
    """The shape and stored dtype of a checkpoint, from its config.json alone: a local folder, ``reference``, or a
    hub id whose config.json is in the local Hugging Face cache or can be fetched. A local config.json is checked
    like every checkpoint's (``ctxext.io.validate``); ``CheckpointError`` / ``ConfigError`` when it cannot be used."""
    from pathlib import Path

    from ctxext.io.sources import resolve_model
    from ctxext.io.validate import RESTORE, check_config_values, hub_config, read_raw_config

    folder = Path(resolve_model(path))
    config_path, config = (
        read_raw_config(folder)
        if folder.is_dir()
        else hub_config(path, fix=f"or a shape with --shape ({', '.join(SHAPES)})")
    )
    check_config_values(config, config_path)
    if isinstance(config.get("text_config"), dict):  # a multimodal config: the decoder's sizes
        config = config["text_config"]
        check_config_values(config, config_path)
    missing = [k for k in SHAPE_KEYS if not isinstance(config.get(k), int)]
    if missing:
        from ctxext.errors import CheckpointError

        raise CheckpointError(
            f"{config_path} does not set {', '.join(missing)}, which size the model; {RESTORE}, "
            f"or give a shape with --shape ({', '.join(SHAPES)})"
        )
    try:
        return ModelShape.from_config(config), config.get("dtype") or config.get("torch_dtype")
    except Exception as err:  # noqa: BLE001  (not a decoder config ctxext can size)
        raise ConfigError(
            f"cannot read the shape of model {path!r} from {config_path} ({type(err).__name__}: "
            f"{str(err)[:200]}); give one with --shape ({', '.join(SHAPES)})"
        ) from None


def plan(
    cfg,
    *,
    shape: str | ModelShape | None = None,
    devices: int | None = None,
    cp_size: int | None = None,
    device_gib: float | None = None,
) -> dict:
    """The predicted peak per device of every stage of the fine-tuning config ``cfg``: what ``ctxext plan``
    prints. ``shape`` (a name in ``SHAPES``) replaces reading the model's config.json; ``devices`` / ``cp_size``
    replace the config's ``distributed`` section; ``device_gib`` adds whether each stage fits."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ConfigError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
        shape, stored = SHAPES[shape], None
    elif shape is None:
        shape, stored = model_shape(cfg.model.path)
    else:
        stored = None
    setups = setups_from_config(cfg, devices=devices, cp_size=cp_size, dtype=stored if stored in DTYPE_BYTES else None)
    stages = []
    for setup in setups:
        if setup.cp_size > 1 and setup.seq_len % (2 * setup.cp_size):
            raise ConfigError(f"seq_len {setup.seq_len} is not divisible by 2 x cp_size = {2 * setup.cp_size}")
        e = estimate(shape, setup)
        stages.append(
            {
                "seq_len": setup.seq_len,
                "peak_bytes": e.peak,
                "phase": e.phase,
                "parts": e.parts,
                "fits": e.fits(device_gib * GiB) if device_gib else None,
            }
        )
    first = setups[0]
    return {
        "model": cfg.model.path,
        "shape": shape,
        "params": shape.params,
        "tuning": first.tuning,
        "dtype": first.dtype,
        "devices": first.devices,
        "sharding": first.sharding,
        "cp_size": first.cp_size,
        "trainable": estimate(shape, first).trainable,
        "device_gib": device_gib,
        "stages": stages,
    }


# ---------------------------------------------------------------- measuring on CPU

# torch has no peak counter for CPU memory, so a measurement reads the process's peak resident set (ru_maxrss). By
# default glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the heap and
# the resident set keeps growing (measured: 861 MB "peak" for a step whose live tensors peak near 136 MB). A fixed
# threshold returns every freed tensor to the OS, so the peak resident set tracks live tensors. Run the measured
# process with this environment.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def rss_bytes() -> int:
    """The resident set of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
