"""Fine-tuning run configuration: YAML -> validated, frozen pydantic models.

Strict: an unknown key is an error naming it (with the closest valid key), a wrong type names the field.
``key=value`` overrides use dotted paths (``optimization.lr=1e-4``, ``stages.0.steps=50``); values are YAML.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctxext.errors import ConfigError
from ctxext.options import Options
from ctxext.rope.registry import all_parameters

MAX_STEPS = 10_000_000  # optimizer steps per stage: more is a typo (days per step at any real length)
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a bigger file is not one
MAX_YAML_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors' aliases (``*name``: nine nested aliases in 1 KB expand to billions of nodes) and without
    nesting deeper than MAX_YAML_DEPTH (thousands of ``[`` exhaust the stack after seconds of scanning)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(
                f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: aliases are not "
                "allowed in ctxext configs (write the value out)"
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise ConfigError(
                f"the YAML is nested too deeply at line {self.peek_event().start_mark.line + 1} (more "
                f"than {MAX_YAML_DEPTH} levels); a ctxext config has a handful"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml(text: str):
    """Parse config YAML safely (no Python objects, no aliases, no deep nesting)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass


class ModelSection(Options):
    path: str = Field("reference", description="checkpoint folder, hub id, or 'reference' (the shipped model)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype for training"
    )
    attn_implementation: str = Field("sdpa", description="transformers attention implementation (xpos sets its own)")


class MethodParams(BaseModel):
    """Method parameters, the same names as `ctxext patch` flags, checked against the method registry when the
    config is read (so a newly registered method's parameters are valid keys); unset ones keep the method's
    default, and the method checks the values."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_parameters(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = all_parameters()
        own = set(cls.model_fields)
        out = {}
        for key, value in data.items():
            if key in own:
                out[key] = value
            elif key not in known:
                raise ValueError(f"unknown method parameter {key!r}{_closest(str(key), sorted({*known, *own}))}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"method parameter {key}={value!r} is not a number")
            else:
                out[key] = known[key]["type"](value) if value is not None else None
        return out

    def given(self) -> dict[str, float]:
        return {k: v for k, v in (self.model_extra or {}).items() if v is not None}


class PatchSection(MethodParams):
    method: str = Field(..., description="method or chain, e.g. yarn or prope+pi")
    target_length: int | None = Field(None, gt=0, description="sets factor = target_length / the model's context")
    scope: Literal["all", "global", "sliding"] | None = None
    trained_context: int | None = Field(
        None,
        gt=1,
        description="the context the model was trained at, where its "
        "config's max_position_embeddings states more (ctxext patch --trained-context)",
    )


class Stage(Options):
    seq_len: int = Field(..., gt=0, description="packed block length in tokens (with window: the positions covered)")
    window: int | None = Field(
        None,
        gt=1,
        description="PoSE (Zhu et al. 2023): train on blocks of this many tokens "
        "whose position ids skip ahead to cover seq_len (cheaper steps at the same reach)",
    )
    source: str | None = Field(
        None, description="data source of this stage (default data.source), e.g. a retrieval-only phase"
    )
    steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="optimizer steps in this stage (or give tokens)")
    tokens: int | None = Field(
        None, gt=0, description="training tokens in this stage (steps = tokens / tokens_per_step)"
    )
    lr: float | None = Field(None, gt=0, description="peak learning rate of this stage (default optimization.lr)")
    patch: MethodParams | None = Field(None, description="method parameters for this stage, e.g. {factor: 2}")

    @model_validator(mode="after")
    def _steps_or_tokens(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        if self.window is not None and self.window >= self.seq_len:
            raise ValueError(
                f"window={self.window} must be shorter than seq_len={self.seq_len} (PoSE trains short "
                "windows that cover seq_len positions); drop window for plain training"
            )
        return self

    @property
    def block_len(self) -> int:
        """Tokens per training sequence: the PoSE window, or seq_len."""
        return self.window or self.seq_len


class LoraSection(Options):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="module names; 'all-linear' for every linear layer",
    )
    train_embeddings: bool = Field(False, description="also train the input embeddings (tied output too)")
    train_norms: bool = Field(False, description="also train every norm weight (LongLoRA's LoRA+)")


class NeedlesSection(Options):
    """Named-key retrieval documents mixed into the training text (``ctxext.data.needles``: the format the
    ``needles`` evaluation asks), each as long as a stage's block (its PoSE window where it has one)."""

    documents: int = Field(..., gt=0, description="named-key documents added to data.source")
    keys: int = Field(4, gt=0, le=32, description="named keys per document; its question asks for one of them")
    edge_depth_share: float = Field(0.2, ge=0, le=1, description="share of asked keys at depth exactly 0 or 1")
    full_length_share: float = Field(0.5, ge=0, le=1, description="share of documents a whole block long")
    filler: str = Field("stdlib:train", description="text the keys are hidden in (never the evaluation's filler)")


class DataSection(Options):
    source: str = Field("stdlib:train", description="stdlib:train, a file/folder, or a hub dataset name")
    text_field: str = "text"
    held_out: str | None = Field(
        "stdlib:held_out", description="held-out source (None: last held_out_fraction of source)"
    )
    held_out_fraction: float = Field(0.02, gt=0, lt=1)
    max_documents: int | None = Field(None, gt=0)
    answer_weight: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="loss weight of answer tokens: a table row's "
        "'answers' character spans, e.g. the key a retrieval document asks for (1: none)",
    )
    needles: NeedlesSection | None = Field(None, description="named-key retrieval documents mixed into source")


class OptimizationSection(Options):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0, description="linear warmup at the start of every stage")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    tokens_per_step: int = Field(16384, gt=0, description="tokens per optimizer step, constant across stages")
    micro_batch_size: int = Field(1, gt=0, description="sequences per forward pass (gradient accumulation)")
    grad_clip: float | None = Field(1.0, gt=0)
    activation_checkpointing: bool = True
    loss_chunk_tokens: int = Field(
        1024, gt=0, description="LM head + cross-entropy computed this many tokens at a time"
    )


class LoggingSection(Options):
    log_every: int = Field(1, gt=0)
    eval_every: int = Field(50, gt=0, description="held-out loss every N steps (and at the end of each stage)")
    eval_blocks: int = Field(4, gt=0, description="held-out blocks per evaluation")
    save_every: int = Field(50, gt=0, description="training checkpoint every N steps")


class DistributedSection(Options):
    """How several processes share the work (docs/guides/scaling.md). The launcher starts the processes
    (``accelerate launch`` / ``torchrun``); this section says what they do."""

    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="none: every process holds the whole model (DDP "
        "with several processes); fsdp: FSDP2 shards weights, gradients and "
        "optimizer states over the processes",
    )
    cp_size: int = Field(
        1,
        ge=1,
        description="context parallel: split every sequence over this many GPUs (needs "
        "sharding: fsdp and SDPA; accelerate's ParallelismConfig(cp_size=...))",
    )
    num_processes: int | None = Field(
        None,
        gt=0,
        description="processes (one per device) the run is planned for; "
        "checked at launch and used by `ctxext plan` (None: whatever is launched)",
    )

    @model_validator(mode="after")
    def _cp_needs_fsdp(self):
        if self.cp_size > 1 and self.sharding != "fsdp":
            raise ValueError(
                f"cp_size={self.cp_size} needs sharding: fsdp (accelerate runs context parallel only "
                "on FSDP2); set distributed.sharding: fsdp, or cp_size: 1"
            )
        if self.num_processes is not None and self.num_processes % self.cp_size:
            raise ValueError(
                f"num_processes={self.num_processes} is not a multiple of cp_size={self.cp_size}: every "
                "sequence goes to a group of cp_size processes"
            )
        return self


class FinetuneConfig(Options):
    model: ModelSection = ModelSection()
    patch: PatchSection
    stages: list[Stage] = Field(..., min_length=1)
    tuning: Literal["lora", "full"] = Field(
        "lora",
        description="lora: adapters (+ optional embeddings/norms), "
        "merged at the end; full: every weight (small models)",
    )
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    optimization: OptimizationSection = OptimizationSection()
    logging: LoggingSection = LoggingSection()
    distributed: DistributedSection = DistributedSection()
    seed: int = 0
    output_dir: str = "runs/finetune"

    @model_validator(mode="after")
    def _fits(self):
        for i, s in enumerate(self.stages):
            if self.stage_steps(i) > MAX_STEPS:
                raise ValueError(
                    f"stages.{i}.tokens={s.tokens} makes {self.stage_steps(i):,} optimizer steps of "
                    f"{self.optimization.tokens_per_step} tokens; at most {MAX_STEPS:,} per stage"
                )
            if s.block_len > self.optimization.tokens_per_step:
                what = "window" if s.window else "seq_len"
                raise ValueError(
                    f"stages.{i}.{what}={s.block_len} exceeds optimization.tokens_per_step="
                    f"{self.optimization.tokens_per_step}; raise tokens_per_step"
                )
        cp = self.distributed.cp_size
        if cp > 1:
            if self.model.attn_implementation != "sdpa":
                raise ValueError(
                    f"distributed.cp_size={cp} needs model.attn_implementation: sdpa (context parallel "
                    f"replaces SDPA), not {self.model.attn_implementation!r}"
                )
            for i, s in enumerate(self.stages):
                if s.block_len % (2 * cp):
                    what = "window" if s.window else "seq_len"
                    raise ValueError(
                        f"stages.{i}.{what}={s.block_len} is not divisible by 2 x distributed.cp_size = "
                        f"{2 * cp}: context parallel cuts every sequence into 2 x cp_size equal chunks "
                        "(two per process, for causal load balance)"
                    )
        return self

    def stage_steps(self, index: int) -> int:
        s = self.stages[index]
        return s.steps if s.steps is not None else math.ceil(s.tokens / self.optimization.tokens_per_step)

    def sequences_per_step(self, index: int) -> int:
        return self.optimization.tokens_per_step // self.stages[index].block_len


# ---------------------------------------------------------------- loading, overrides, errors


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (valid: {', '.join(options)})"


def _model_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        for candidate in [ann, *args]:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _format(err: ValidationError, root: type[BaseModel], kind: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(e["loc"], root)
            hint = _closest(str(e["loc"][-1]), list(parent.model_fields)) if parent else ""
            lines.append(f"unknown key {loc}{hint}")
        elif e["type"] == "value_error":  # our own validators: the message names the value
            lines.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid {kind}:\n  " + "\n  ".join(lines)


def read_config_file(path: str | Path, kind: str, sections: str) -> dict:
    """The YAML mapping in ``path``; ``ConfigError`` when it is missing, not YAML (or uses aliases), or not a
    mapping (``sections`` names what it should hold)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path} is {path.stat().st_size:,} bytes; a {kind} is a few KB of YAML (is it the right file?)"
        )
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    except ConfigError as err:  # aliases, nesting: say which file
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {kind} must be a mapping of sections ({sections})")
    return raw


def validate(model: type[BaseModel], raw: dict, kind: str):
    """``model.model_validate(raw)`` with every bad field in one ``ConfigError``."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, model, kind)) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optimization.lr=1e-4")
        node: Any = raw
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            parsed = read_yaml(value)
            if isinstance(node, list):
                node[int(parts[-1])] = parsed
            else:
                node[parts[-1]] = parsed
        except (IndexError, ValueError, TypeError, AttributeError, yaml.YAMLError) as err:
            raise ConfigError(f"override {item!r}: {key} is not a settable key of this config ({err})") from None
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> FinetuneConfig:
    """Read, override and validate a config (from ``path`` or an already-parsed ``raw`` dict)."""
    sections = "model, patch, stages, ..."
    if raw is None:
        raw = read_config_file(path, "fine-tuning config", sections)
    if not isinstance(raw, dict):
        raise ConfigError(f"a fine-tuning config must be a mapping of sections ({sections})")
    kind = f"fine-tuning config {path}" if path is not None else "fine-tuning config"
    return validate(FinetuneConfig, apply_overrides(raw, overrides or []), kind)
