"""Recipes: a whole experiment (extend, fine-tune, evaluate) as one YAML file, e.g. ``configs/recipes/demo.yaml``.

``ctxext demo`` and ``scripts/leaderboard.py`` read a recipe; its ``finetune`` section becomes a fine-tuning config
(``ctxext.train.config.FinetuneConfig``) once the model, the method and the data are known. Sweeps (``configs/sweeps/``)
are rows of methods: ``kind: finetune`` (default; a recipe, ``scripts/leaderboard.py``) or ``kind: training-free``
(factors and an evaluation plan, no fine-tuning: ``scripts/real_model_leaderboard.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ctxext.errors import ConfigError
from ctxext.options import Options
from ctxext.train.config import (
    FinetuneConfig,
    LoggingSection,
    LoraSection,
    OptimizationSection,
    apply_overrides,
    load_config,
    read_config_file,
    validate,
)

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_RECIPE = "configs/recipes/demo.yaml"


class RecipeData(Options):
    passkey_documents: int = Field(2000, ge=0, description="passkey documents mixed into the stdlib train files")
    edge_depth_share: float = Field(0.2, ge=0, le=1, description="share of passkey documents with the key at an edge")
    full_length_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of passkey documents as long as their stage's "
        "blocks (keys up to a whole block back); the others are 1/4 to 1 block long",
    )
    train_documents: int | None = Field(None, gt=0, description="stdlib train files used (None: all)")
    task_documents: dict[str, int] = Field(
        default_factory=dict,
        description="RULER-style training documents per task (multikey, multivalue, vartrack), from training seeds",
    )
    answer_weight: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="loss weight of the answer tokens of retrieval documents (1: as every other token)",
    )


class RecipeEvaluation(Options):
    ppl_documents: int = Field(24, gt=0)
    passkey_trials: int = Field(10, gt=0)
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    ood_data: str | None = Field(
        None, description="code outside the training domain, perplexity at the trained context (e.g. package:numpy)"
    )
    retrieval_tasks: list[str] = Field(default_factory=list, description="RULER-style tasks evaluated too")
    retrieval_trials: int = Field(20, gt=0)
    retrieval_depths: list[float] | None = Field(
        None, min_length=1, description="depths of the RULER-style tasks (null: the passkey depths)"
    )

    def run(
        self,
        models: list[str],
        labels: list[str],
        output: Path,
        *,
        lengths: list[int],
        passkey_lengths: list[int] | None = None,
        context: int | None = None,
        ood_models: list[str] | None = None,
        retrieval_lengths: list[int] | None = None,
        retrieval_models: list[str] | None = None,
    ) -> dict[str, Any]:
        """Evaluate ``models`` (named ``labels``) under this budget, as the demo and the leaderboard do: perplexity
        at ``lengths``, passkey at ``passkey_lengths`` (default: ``lengths``), and where the evaluation asks for
        them perplexity on code outside the training domain at ``context`` and the RULER-style tasks at
        ``retrieval_lengths`` (of ``ood_models`` / ``retrieval_models``, default all). Returns each
        evaluation's result and the ``ctxext eval`` commands that reproduce them."""
        from ctxext.evals.run import evaluate_passkey, evaluate_perplexity, evaluate_retrieval

        joined = " ".join(models)
        label_of = dict(zip(models, labels, strict=True))

        def csv(values) -> str:
            return ",".join(map(str, values))

        passkey_lengths = passkey_lengths or lengths
        out = {
            "ppl": evaluate_perplexity(
                models, lengths=lengths, output=output, max_documents=self.ppl_documents, batch_size=4, labels=labels
            ),
            "passkey": evaluate_passkey(
                models,
                lengths=passkey_lengths,
                depths=self.depths,
                trials=self.passkey_trials,
                output=output,
                labels=labels,
            ),
            "ood": None,
            "retrieval": None,
        }
        commands = [
            f"ctxext eval ppl {joined} --lengths {csv(lengths)} --max-documents {self.ppl_documents} --output {output}",
            f"ctxext eval passkey {joined} --lengths {csv(passkey_lengths)} --depths {csv(self.depths)} "
            f"--trials {self.passkey_trials} --output {output}",
        ]
        if self.ood_data and context:
            chosen = ood_models or models
            out["ood"] = evaluate_perplexity(
                chosen,
                lengths=[context],
                data=self.ood_data,
                output=output / "ood",
                max_documents=self.ppl_documents,
                batch_size=4,
                labels=[label_of[m] for m in chosen],
            )
            commands.append(
                f"ctxext eval ppl {' '.join(chosen)} --lengths {context} --data {self.ood_data} "
                f"--max-documents {self.ppl_documents} --output {output / 'ood'}"
            )
        if self.retrieval_tasks:
            chosen = retrieval_models or models
            depths = self.retrieval_depths or self.depths
            retrieval_lengths = retrieval_lengths or lengths
            out["retrieval"] = evaluate_retrieval(
                chosen,
                tasks=self.retrieval_tasks,
                lengths=retrieval_lengths,
                depths=depths,
                trials=self.retrieval_trials,
                output=output,
                labels=[label_of[m] for m in chosen],
            )
            commands.append(
                f"ctxext eval retrieval {' '.join(chosen)} --tasks {csv(self.retrieval_tasks)} --lengths "
                f"{csv(retrieval_lengths)} --depths {csv(depths)} --trials {self.retrieval_trials} --output {output}"
            )
        out["commands"] = commands
        return out


class RetrievalPhase(Options):
    steps: int = Field(..., gt=0, description="optimizer steps of a last stage at the target length")
    documents: int = Field(..., gt=0, description="retrieval-only documents it trains on (passkey and tasks)")


class RecipeFinetune(Options):
    stage_steps: list[int] = Field(..., min_length=1, description="optimizer steps at 2x, 4x and the target length")
    stage_windows: list[int | None] | None = Field(None, description="PoSE windows per stage (null: plain)")
    tuning: str = Field("lora", description="lora or full")
    retrieval_phase: RetrievalPhase | None = None
    lora: LoraSection = LoraSection()
    optimization: OptimizationSection = OptimizationSection()
    logging: LoggingSection = LoggingSection()
    seed: int = 0

    def tuning_label(self) -> str:
        """What trains, in a report's words: ``LoRA r16 + embeddings/norms`` or ``full (every weight)``."""
        if self.tuning == "full":
            return "full (every weight)"
        extra = [
            name for name, on in (("embeddings", self.lora.train_embeddings), ("norms", self.lora.train_norms)) if on
        ]
        return f"LoRA r{self.lora.r}" + (f" + {'/'.join(extra)}" if extra else "")


class Recipe(Options):
    method: str = "pi"
    factor: float = Field(8.0, gt=1)
    data: RecipeData = RecipeData()
    evaluation: RecipeEvaluation = RecipeEvaluation()
    finetune: RecipeFinetune
    quick: dict[str, Any] = Field(default_factory=dict, description="values that --quick replaces")

    def plan(self) -> dict:
        """The budget in the flat form the reports print (and results.json keeps)."""
        return {
            "ppl_docs": self.evaluation.ppl_documents,
            "passkey_trials": self.evaluation.passkey_trials,
            "depths": list(self.evaluation.depths),
            "steps": list(self.finetune.stage_steps),
            "retrieval_depths": list(self.evaluation.retrieval_depths or self.evaluation.depths),
            "tokens_per_step": self.finetune.optimization.tokens_per_step,
            "tuning": self.finetune.tuning_label(),
            "passkey_docs": self.data.passkey_documents,
            "train_docs": self.data.train_documents,
        }

    def _windows(self, stage_lengths: list[int]) -> list[int | None]:
        """The PoSE window of each stage (None: the stage trains on whole blocks of its length)."""
        return self.finetune.stage_windows or [None] * len(stage_lengths)

    def finetune_config(
        self,
        base: str,
        method: str,
        target: int,
        stage_lengths: list[int],
        data: Path,
        params: dict | None = None,
        retrieval_data: Path | None = None,
    ) -> FinetuneConfig:
        """The fine-tuning config for ``base`` patched with ``method`` to ``target`` tokens on ``data`` (and the
        retrieval phase on ``retrieval_data``)."""
        windows = self._windows(stage_lengths)
        stages = [
            {"seq_len": L, "steps": s, **({"window": w} if w else {})}
            for L, s, w in zip(stage_lengths, self.finetune.stage_steps, windows)
        ]
        if self.finetune.retrieval_phase:
            if retrieval_data is None:
                raise ValueError("the recipe has a retrieval phase: pass its data")
            stages.append(
                {"seq_len": target, "steps": self.finetune.retrieval_phase.steps, "source": str(retrieval_data)}
            )
        raw = {
            "model": {"path": base, "dtype": "float32"},
            "patch": {"method": method, "target_length": target, **(params or {})},
            "stages": stages,
            "data": {"source": str(data), "held_out": "stdlib:held_out", "answer_weight": self.data.answer_weight},
            **self.finetune.model_dump(mode="json", exclude={"stage_steps", "stage_windows", "retrieval_phase"}),
        }
        return load_config(raw=raw)

    def build_data(self, tokenizer, folder: Path, stage_lengths: list[int], target: int) -> tuple[Path, Path | None]:
        """The fine-tuning JSONL (and the retrieval phase's) under ``folder``. Retrieval documents are sized to the
        blocks a stage trains on: its PoSE window where it has one, so that no document is cut and the window's
        position skip, not its length, makes the distance from key to question."""
        from ctxext.experiments.mix import build_finetune_data

        d = self.data
        blocks = [w or L for L, w in zip(stage_lengths, self._windows(stage_lengths))]
        data = build_finetune_data(
            tokenizer,
            folder / "finetune.jsonl",
            blocks,
            d.passkey_documents,
            d.train_documents,
            edge_depth_share=d.edge_depth_share,
            full_length_share=d.full_length_share,
            task_documents=d.task_documents,
        )
        phase = self.finetune.retrieval_phase
        if phase is None:
            return data, None
        tasks = {t: phase.documents // (len(d.task_documents) + 1) for t in d.task_documents}
        retrieval = build_finetune_data(
            tokenizer,
            folder / "retrieval.jsonl",
            [target],
            phase.documents - sum(tasks.values()),
            d.train_documents,
            seed=1,
            edge_depth_share=d.edge_depth_share,
            full_length_share=d.full_length_share,
            task_documents=tasks,
            code=False,
        )
        return data, retrieval


class _Row(BaseModel):
    """A sweep row: a method chain (other keys are its parameters), or a checkpoint made beforehand; neither: the
    unextended model."""

    model_config = ConfigDict(extra="allow", frozen=True)  # method parameters (keep, scale_base, ...) go to the patch
    method: str | None = Field(None, description="method chain; null: the unextended model (or a checkpoint row)")

    @model_validator(mode="after")
    def _method_or_checkpoint(self):
        if getattr(self, "checkpoint", None) is not None and (self.method is not None or self.model_extra):
            raise ValueError("a checkpoint row takes no method and no method parameters (the checkpoint holds them)")
        return self


class SweepRow(_Row):
    """A leaderboard row; a checkpoint row (a ``ctxext search`` result; a path relative to the repository) is
    measured as saved, without fine-tuning."""

    finetune: bool = Field(True, description="false: measured without fine-tuning only (a training-free method)")
    checkpoint: str | None = Field(None, description="an extended checkpoint folder (method null, no parameters)")


class Sweep(Options):
    """A leaderboard sweep (``configs/sweeps/*.yaml``): rows of methods on one recipe."""

    kind: Literal["finetune"] = Field("finetune", description="finetune: every row without and with fine-tuning")
    model: str = "reference"
    factor: float = Field(8.0, gt=1)
    recipe: str = Field(DEFAULT_RECIPE, description="the fine-tuning and evaluation budget, relative to the repository")
    overrides: list[str] = Field(default_factory=list, description="key=value changes to the recipe")
    methods: dict[str, SweepRow] = Field(..., min_length=1)


Dtype = Literal["float32", "bfloat16", "float16"]


class TrainingFreeRow(_Row):
    """A row of a training-free sweep: a method chain patched in memory, or checkpoints made beforehand (a
    ``ctxext search`` result, one per factor)."""

    checkpoint: str | dict[float, str] | None = Field(
        None, description="an extended checkpoint folder, or {factor: folder}; its cells are measured on it as saved"
    )


class PerplexityPlan(Options):
    texts: dict[str, str] = Field(
        ...,
        min_length=1,
        description="name: data source (see ctxext.data); each row is scored on the longest documents of each",
    )
    documents: int = Field(
        1,
        gt=0,
        description="documents per text, the longest ones (first factor x context tokens "
        "of each, for the largest factor)",
    )
    buckets_per_context: int = Field(4, gt=0, description="position buckets per trained context in the report")
    at_target: bool = Field(True, description="score the first factor x context tokens (false: too long to afford)")
    inside: list[int] = Field(
        default_factory=list,
        description="also score the first L tokens for each L here (at most the trained context): what a patch "
        "costs where the model was trained",
    )
    dtype: Dtype = Field("float32", description="model dtype for these cells")


class RetrievalPlan(Options):
    lengths: list[int] = Field(
        ...,
        min_length=1,
        description="prompt lengths; a row measures those up to its extended context (factor x context)",
    )
    depths: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    trials: dict[str, int] = Field(
        ..., min_length=1, description="task (passkey or a ctxext.evals.retrieval task): prompts per depth"
    )
    filler: str = "stdlib:held_out"
    seed: int = 0
    dtype: Dtype = Field("float32", description="model dtype for these cells")

    @field_validator("trials")
    @classmethod
    def _known_tasks(cls, trials: dict[str, int]) -> dict[str, int]:
        from ctxext.evals.retrieval import TASKS

        unknown = [t for t in trials if t != "passkey" and t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; valid: passkey, {', '.join(TASKS)}")
        if any(n < 1 for n in trials.values()):
            raise ValueError("trials must be >= 1 per task")
        return trials


class NeedlesPlan(Options):
    """Named-key retrieval answered from one prefill per prompt (``ctxext.evals.shared_prefill``): several needles
    per prompt, so a CPU affords it at 8k-16k tokens. Needles in one prompt are each other's distractors."""

    lengths: list[int] = Field(
        ..., min_length=1, description="prompt lengths; a row measures those up to its extended context"
    )
    bands: list[tuple[float, float]] = Field(
        [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)], min_length=1, description="depth bands (lo, hi)"
    )
    per_band: int = Field(2, gt=0, description="needles per band in every prompt")
    prompts: int = Field(10, gt=0, description="prompts per length: prompts x per_band needles per band")
    prompts_by_row: dict[str, int] = Field(
        default_factory=dict, description="row name: prompts, for rows measured with more (or fewer) needles"
    )
    filler: str = "stdlib:held_out"
    seed: int = 0
    dtype: Dtype = Field("float32", description="model dtype for these cells")


class TrainingFreeSweep(Options):
    """A training-free sweep (``configs/sweeps/smollm2.yaml``): every row patched in memory at every factor and
    evaluated without fine-tuning (``scripts/real_model_leaderboard.py``).

    A row parameter may be a mapping ``{factor: value}`` (``group_size: {2: 3, 4: 5}``): the value for each factor.
    """

    kind: Literal["training-free"]
    model: str = Field(..., description="checkpoint folder, .gguf file or GGUF source name (smollm2)")
    context: int | None = Field(
        None,
        gt=1,
        description="trained context (None: the checkpoint's); a smaller value "
        "pretends the model was trained that short, for quick runs of the pipeline",
    )
    factors: list[float] = Field(..., min_length=1)
    perplexity: PerplexityPlan
    retrieval: RetrievalPlan | None = None
    needles: NeedlesPlan | None = None
    methods: dict[str, TrainingFreeRow] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _per_factor_values_cover_every_factor(self):
        for factor in self.factors:
            if factor <= 1:
                raise ValueError(f"factors: {factor} is not an extension; give factors > 1")
            for name in self.methods:
                if self.has_factor(name, factor):
                    self.row(name, factor)
        unknown = [r for r in (self.needles.prompts_by_row if self.needles else {}) if r not in self.methods]
        if unknown:
            raise ValueError(f"needles.prompts_by_row: {', '.join(unknown)} not in methods")
        return self

    def has_factor(self, name: str, factor: float) -> bool:
        """False for a row of saved checkpoints that names none for ``factor`` (it has no cells there)."""
        checkpoint = self.methods[name].checkpoint
        return not isinstance(checkpoint, dict) or float(factor) in {float(k) for k in checkpoint}

    def row(self, name: str, factor: float) -> tuple[str | None, dict, str | None]:
        """``(chain, params, checkpoint)`` of row ``name`` at ``factor`` (per-factor values resolved)."""
        row = self.methods[name]

        def at_factor(key: str, value):
            if not isinstance(value, dict):
                return value
            by_factor = {float(k): v for k, v in value.items()}
            if float(factor) not in by_factor:
                raise ValueError(
                    f"methods.{name}.{key}: no value for factor {factor:g} (given for "
                    f"{', '.join(f'{k:g}' for k in by_factor)})"
                )
            return by_factor[float(factor)]

        params = {key: at_factor(key, value) for key, value in (row.model_extra or {}).items()}
        return row.method, params, at_factor("checkpoint", row.checkpoint)


SWEEP_KINDS = {"finetune": Sweep, "training-free": TrainingFreeSweep}


def load_sweep(path: str | Path) -> Sweep | TrainingFreeSweep:
    """A sweep of either kind (the ``kind`` key; default ``finetune``)."""
    raw = read_config_file(path, "sweep", "kind, model, factor(s), recipe or perplexity/retrieval, methods")
    kind = raw.get("kind", "finetune")
    if kind not in SWEEP_KINDS:
        raise ConfigError(f"sweep {path}: kind {kind!r} is unknown; valid: {', '.join(SWEEP_KINDS)}")
    return validate(SWEEP_KINDS[kind], raw, f"sweep {path}")


def stage_lengths(context: int, target: int) -> list[int]:
    """Fine-tuning lengths: 2x and 4x the trained context, then the target (at most three, none beyond it)."""
    return [L for L in (2 * context, 4 * context, target) if L <= target][-3:]


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(path: str | Path | None = None, *, quick: bool = False, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe (default ``configs/recipes/demo.yaml``); ``quick`` applies its ``quick`` section,
    ``overrides`` are ``key=value`` pairs as for fine-tuning configs (``data.passkey_documents=8000``)."""
    path = Path(path) if path else REPO_CONFIGS / "recipes" / "demo.yaml"
    raw = read_config_file(path, "recipe", "method, factor, data, evaluation, finetune, quick")
    raw = apply_overrides(raw, overrides or [])
    if quick:
        raw = _merge(raw, raw.get("quick") or {})
    return validate(Recipe, raw, f"recipe {path}")
