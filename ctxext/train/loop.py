"""Progressive-length LoRA fine-tuning on accelerate, as a recipe: setup -> for each stage: switch stage -> steps ->
checkpoint -> save.

    ctxext finetune configs/tiny.yaml                    # one CPU process
    accelerate launch --num_processes 4 -m ctxext.cli finetune configs/llama3-8b-32k.yaml   # DDP
    accelerate launch --num_processes 8 -m ctxext.cli finetune configs/llama3-8b-128k-cp.yaml  # FSDP2 + CP
    accelerate launch --multi_gpu --num_processes 2 -m ctxext.cli finetune configs/tiny.yaml  # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 -m ctxext.cli finetune configs/tiny.yaml distributed.sharding=fsdp  # FSDP2 on CPU

(On a machine without GPUs, ``accelerate launch --cpu`` starts a single process unless MPI is set up; use
``--multi_gpu --num_processes N``, which starts N CPU processes with the gloo backend.)

A run is a list of stages of growing ``seq_len``. The data is tokenized once into a memory-mapped token file
(``ctxext.data``) and packed into blocks of each stage's length (no padding). Every optimizer step sees
``tokens_per_step`` tokens whatever the stage (fewer, longer sequences as the length grows), split over processes
and micro-batches. The loss never materializes full fp32 logits (``ctxext.train.loss.ChunkedLMLoss``). Checkpoints
(trainable weights, optimizer, scheduler, RNG of every process, data position) are written atomically every
``save_every`` steps; ``--resume`` continues the same loss curve. The end result is a merged full checkpoint that
``from_pretrained`` loads as the extended model, plus the adapter alone. The ``distributed`` section shards the
model (FSDP2) and splits sequences over GPUs (context parallel): ``ctxext.train.sharding``; ``ctxext plan`` predicts
the memory per device (``ctxext.train.memory``).

Reliability: the model, its tokenizer, the data and the config are checked before the run folder is created (a
refused fresh run leaves nothing behind); the run folder is locked (``ctxext.io.lock``: a second run into it is
refused, naming the holder); every file of a run is written atomically, so a kill at any moment leaves a run that
``--resume`` finishes on the same loss curve; a full disk stops the run naming its last complete checkpoint; a
non-finite loss stops it with exit code 3 and sets aside the checkpoint whose weights produced that loss, so the
last checkpoint left is good, and ``--resume`` (with a lower ``optimization.lr=...``) continues from it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ctxext.data.text import (
    Blocks,
    Cursor,
    answer_spans,
    document_starts,
    first_blocks,
    next_starts,
    open_token_file,
    pose_position_ids,
    stage_blocks,
    write_token_file,
)
from ctxext.errors import CtxextError, OutputError, TrainingError
from ctxext.io.atomic import TMP_MARK, abandon_on_error, atomic_folder, atomic_write_text, commit_folder, disk_full
from ctxext.io.lock import output_lock
from ctxext.train.config import FinetuneConfig
from ctxext.train.loss import ChunkedLMLoss
from ctxext.train.schedule import lr_multiplier
from ctxext.train.sharding import (
    check_launch,
    clip_gradients,
    data_split,
    gathered_model,
    gradient_sync,
    load_sharded,
    make_accelerator,
    prepare,
    save_sharded,
    sequence_split,
    shard,
    shards_itself,
    shifted_labels,
)

log = logging.getLogger(__name__)
EXIT_DIVERGED = 3


@dataclass
class Position(Cursor):
    """Where the run is: the global optimizer step, plus the stage's data cursor (saved as position.json)."""

    step: int = 0


def finetune(
    cfg: FinetuneConfig, *, output_dir: str | None = None, resume: bool = False, progress: bool = True
) -> dict:
    """Run (or resume) the fine-tuning described by ``cfg``; returns the paths of the results and the last metrics."""
    run = Path(output_dir or cfg.output_dir)
    check_launch(cfg)  # process count and context parallel against the distributed section
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)

    # ---- setup: run folder, model, data, optimizer (FSDP2: sharded weights and states), resume point
    check_config(cfg)
    with contextlib.ExitStack() as held_lock:
        refusal = None
        if accelerator.is_main_process:
            try:
                held_lock.enter_context(output_lock(run, "ctxext finetune" + (" --resume" if resume else "")))
            except OutputError as err:
                refusal = str(err)
        refusal = _from_main_process(accelerator, refusal)
        if refusal:
            raise OutputError(refusal)
        with _disk_full_names_the_last_checkpoint(run):
            return _finetune(cfg, run, resume, progress, accelerator)


def _from_main_process(accelerator, value):
    """``value`` as the main process has it, on every process."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0] if accelerator.num_processes > 1 else value


@contextlib.contextmanager
def _disk_full_names_the_last_checkpoint(run: Path):
    """A full disk anywhere in the run (a checkpoint, metrics.jsonl, a token file) names the checkpoint to resume."""
    try:
        yield
    except Exception as err:
        full = (
            err
            if isinstance(err, OutputError) and "no space left" in str(err)
            else (None if isinstance(err, CtxextError) else disk_full(err, run))
        )
        if full is None:
            raise
        found = checkpoints(run)
        raise OutputError(
            f"{full}. The run stopped; its last complete checkpoint is "
            f"{found[-1] if found else '(none yet)'}: free some space, then rerun with --resume"
        ) from err


def _finetune(cfg: FinetuneConfig, run: Path, resume: bool, progress: bool, accelerator) -> dict:
    # ---- setup: checks, model, run folder, data, optimizer, resume point (nothing is written before the folder)
    occupied = run.exists() and any(run.iterdir())
    accelerator.wait_for_everyone()  # every process looks before the main process writes anything
    if occupied and not resume:
        raise TrainingError(f"{run} already holds a run; pass --resume to continue it or choose another --output-dir")
    model, tokenizer = build_model(cfg)
    created = open_run_folder(run, cfg, accelerator)
    try:
        blocks, held = build_data(cfg, tokenizer, run, accelerator)
    except CtxextError:
        if created and accelerator.is_main_process:  # a refused fresh run leaves nothing behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    loss_module = shard(ChunkedLMLoss(model, cfg.optimization.loss_chunk_tokens), cfg, accelerator)
    opt = torch.optim.AdamW(
        [p for p in loss_module.parameters() if p.requires_grad],
        lr=cfg.optimization.lr,
        betas=cfg.optimization.betas,
        weight_decay=cfg.optimization.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: stage_lr(cfg, step))
    loss_module, opt, sched, params = prepare(accelerator, cfg, loss_module, opt, sched)
    accelerator.register_save_state_pre_hook(_keep_trainable_only(accelerator))
    pos = resume_position(run, accelerator, sched, cfg, loss_module, opt) if resume else Position()
    metrics = MetricsLog(run / "metrics.jsonl", accelerator.is_main_process, keep_until=pos.step)

    # ---- stages
    stage_ends = np.cumsum([cfg.stage_steps(i) for i in range(len(cfg.stages))]).tolist()
    bar = tqdm(
        total=stage_ends[-1],
        initial=pos.step,
        desc="finetune",
        unit="step",
        disable=not (progress and accelerator.is_main_process),
    )
    handle = None
    last: dict = {}
    loss_module.train()
    for stage_index in range(pos.stage, len(cfg.stages)):
        # switch stage: new length, maybe new method parameters
        if stage_index != pos.stage:
            pos.stage, pos.cursor, pos.epoch = stage_index, 0, 0
        handle = patch_for_stage(model, cfg, stage_index, handle)
        stage = cfg.stages[stage_index]
        while pos.step < stage_ends[stage_index]:
            record = train_step(loss_module, opt, sched, params, blocks[stage_index], cfg, pos, accelerator, run)
            if pos.step % cfg.logging.eval_every == 0 or pos.step == stage_ends[stage_index]:
                record["held_out_loss"] = held_out_loss(
                    loss_module, held, stage.seq_len, cfg.logging.eval_blocks, accelerator, cfg
                )
            if pos.step % cfg.logging.log_every == 0 or "held_out_loss" in record:
                metrics.write(record)
            last = record
            bar.update(1)
            bar.set_postfix(
                stage=f"{stage_index + 1}/{len(cfg.stages)}",
                seq_len=stage.seq_len,
                loss=f"{record['loss']:.3f}",
                tok_s=f"{record['tokens_per_s']:,.0f}",
            )
            # checkpoint
            if pos.step % cfg.logging.save_every == 0 or pos.step == stage_ends[-1]:
                save_training_state(accelerator, run, pos, cfg, loss_module, opt)
    bar.close()
    metrics.close()

    # ---- save: the adapter alone, then the merged checkpoint (sharded: gathered into a fresh copy first)
    result = {"run": str(run), "metrics": str(metrics.path), "last": last}
    accelerator.wait_for_everyone()
    trained = gathered_model(accelerator, loss_module, lambda: fresh_model(cfg))
    if accelerator.is_main_process:
        result.update(save_results(trained, tokenizer, run))
    accelerator.wait_for_everyone()
    return result


# ---------------------------------------------------------------- setup


def check_config(cfg: FinetuneConfig) -> None:
    """What the schema cannot see: data sources exist, PoSE stages and context parallel go with a method they
    can train."""
    from ctxext.rope.chain import chain_classes

    windowed = [i for i, s in enumerate(cfg.stages) if s.window]
    if windowed:  # the classes suffice: a factor from target_length is only known once the model is loaded
        odd = [m.name for m in chain_classes(cfg.patch.method) if m.role == "attention" or m.per_forward]
        if odd:
            raise TrainingError(
                f"stages {windowed} use PoSE windows, which skip position ids; {', '.join(odd)} "
                "depends on the sequence itself (attention slots or its length) and would not see the "
                "skips. Drop window from those stages or use a static method (pi, ntk, yarn, ...)"
            )
    if cfg.distributed.cp_size > 1:
        odd = [m.name for m in chain_classes(cfg.patch.method) if m.role == "attention"]
        if odd:
            raise TrainingError(
                f"distributed.cp_size={cfg.distributed.cp_size} with {', '.join(odd)}: the method "
                "replaces the attention function, and context parallel splits only SDPA; use a "
                "frequency method (pi, ntk, yarn, ...) or cp_size: 1"
            )
    sources = [cfg.data.source, cfg.data.held_out, *(s.source for s in cfg.stages)]
    for source in filter(None, sources):
        if (
            not source.startswith(("stdlib:", "package:"))
            and "/" not in source.strip("./")
            and not Path(source).exists()
        ):
            raise TrainingError(
                f"data source {source!r} does not exist; give a file, a folder, stdlib:train or a hub name"
            )
        if (source.startswith((".", "/")) or os.sep in source) and not Path(source).exists():
            raise TrainingError(f"data source {source} does not exist; check data.source / data.held_out")


def open_run_folder(run: Path, cfg: FinetuneConfig, accelerator) -> bool:
    """Create the run folder (if new) with the resolved config; whether this call created it."""
    created = not run.exists()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.resolved.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    accelerator.wait_for_everyone()
    return created


def build_model(cfg: FinetuneConfig):
    """Load the model; for ``tuning: lora`` add adapters (+ optional trainable embeddings / norms); activation
    checkpointing. Returns ``(model, tokenizer)``; the patch comes per stage (``patch_for_stage``)."""
    from ctxext.io.checkpoint import load_model
    from ctxext.io.sources import check_source
    from ctxext.io.validate import load_tokenizer
    from ctxext.models import enable_activation_checkpointing, set_attention_implementation

    path = check_source(cfg.model.path)
    model = load_model(path, dtype=cfg.model.dtype)
    tokenizer = load_tokenizer(path, model.config.vocab_size)
    set_attention_implementation(model, cfg.model.attn_implementation)
    if cfg.tuning == "full":
        model.requires_grad_(True)
        tuned = model
    else:
        tuned = add_lora(model, cfg)
    if cfg.optimization.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    return tuned, tokenizer


def fresh_model(cfg: FinetuneConfig) -> nn.Module:
    """An unsharded copy of the model as it ends training (last stage's patch), to load gathered weights into."""
    model, _ = build_model(cfg)
    patch_for_stage(model, cfg, len(cfg.stages) - 1, None)
    return model


def add_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from ctxext.models import is_embedding_parameter, is_norm_parameter

    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        # tied embeddings share one Parameter with lm_head: training it trains both, and they stay tied
        if (cfg.lora.train_embeddings and is_embedding_parameter(name)) or (
            cfg.lora.train_norms and is_norm_parameter(name)
        ):
            p.requires_grad_(True)
    return peft_model


def needle_rows(cfg: FinetuneConfig, tokenizer, stage_file: list[str]) -> list[dict]:
    """``data.needles``' documents, sized to the blocks of the stages that train on ``data.source``."""
    n = cfg.data.needles
    from ctxext.data.needles import training_rows
    from ctxext.data.text import join_documents, load_texts

    blocks = sorted({s.block_len for s, f in zip(cfg.stages, stage_file) if f == "train"})
    filler = join_documents(tokenizer, load_texts(n.filler, max_documents=400)).tolist()
    rows = training_rows(
        tokenizer,
        filler,
        blocks,
        n.documents,
        keys=n.keys,
        edge_depth_share=n.edge_depth_share,
        full_length_share=n.full_length_share,
        seed=cfg.seed,
    )
    log.info("data.needles: %d named-key documents of %s tokens mixed into %s", len(rows), blocks, cfg.data.source)
    return rows


def build_data(cfg: FinetuneConfig, tokenizer, run: Path, accelerator) -> tuple[list[Blocks], np.ndarray]:
    """The training blocks of every stage and the held-out stream (memory-mapped token files in the run folder,
    written once per source: ``train.bin``, ``held_out.bin``, ``stage-<i>.bin`` for a stage with its own source)."""
    files = {"train": (cfg.data.source, cfg.data.max_documents)}
    if cfg.data.held_out is not None:
        files["held_out"] = (cfg.data.held_out, None)
    stage_file = ["train" if s.source in (None, cfg.data.source) else f"stage-{i}" for i, s in enumerate(cfg.stages)]
    files.update({name: (cfg.stages[i].source, None) for i, name in enumerate(stage_file) if name != "train"})
    if accelerator.is_main_process:
        for name, (source, max_documents) in files.items():
            write_token_file(
                tokenizer,
                source,
                run / "tokens" / f"{name}.bin",
                text_field=cfg.data.text_field,
                max_documents=max_documents,
                extra_rows=(
                    functools.partial(needle_rows, cfg, tokenizer, stage_file)
                    if name == "train" and cfg.data.needles
                    else None
                ),
                seed=cfg.seed,
            )
    accelerator.wait_for_everyone()
    streams = {name: open_token_file(run / "tokens" / f"{name}.bin") for name in files}
    if cfg.data.held_out is not None:
        held = streams.pop("held_out")
    else:
        cut = int(len(streams["train"]) * (1 - cfg.data.held_out_fraction))
        streams["train"], held = streams["train"][:cut], streams["train"][cut:]
    blocks = []
    for i, (stage, name) in enumerate(zip(cfg.stages, stage_file)):
        if len(streams[name]) < stage.block_len:
            raise TrainingError(
                f"the training data of stage {i} has {len(streams[name]):,} tokens, fewer than one "
                f"block (seq_len {stage.block_len}); give more data ({files[name][0]}) or shorter "
                "stages"
            )
        file = run / "tokens" / f"{name}.bin"
        blocks.append(stage_blocks(streams[name], document_starts(file), stage.block_len, answer_spans(file)))
        if cfg.data.answer_weight != 1 and not len(blocks[-1].answers) and accelerator.is_main_process:
            log.warning(
                "data.answer_weight is %g but the data of stage %d (%s) marks no answers (rows with an "
                "'answers' field): its loss is unweighted",
                cfg.data.answer_weight,
                i,
                files[name][0],
            )
    return blocks, held


def stage_lr(cfg: FinetuneConfig, step: int) -> float:
    """LR at global ``step`` relative to ``optimization.lr``: warmup + schedule within each stage."""
    start = 0
    for i, stage in enumerate(cfg.stages):
        n = cfg.stage_steps(i)
        if step < start + n or i == len(cfg.stages) - 1:
            peak = (stage.lr or cfg.optimization.lr) / cfg.optimization.lr
            return peak * lr_multiplier(
                step - start,
                n,
                warmup=cfg.optimization.warmup_steps,
                schedule=cfg.optimization.schedule,
                min_ratio=cfg.optimization.min_lr_ratio,
            )
        start += n
    return 0.0


def stage_patch_params(cfg: FinetuneConfig, stage: int) -> dict:
    params = cfg.patch.given()
    target = cfg.patch.target_length
    override = cfg.stages[stage].patch
    if override is not None:
        params.update(override.given())
        if "factor" in override.given():
            target = None
    return {"scope": cfg.patch.scope, "target_length": target, "trained_context": cfg.patch.trained_context, **params}


def patch_for_stage(model: nn.Module, cfg: FinetuneConfig, stage: int, handle):
    """Undo the previous stage's patch and apply this stage's (the chain with its parameters)."""
    from ctxext.models import causal_lm
    from ctxext.patch.model import patch_model

    if handle is not None:
        handle.remove()
    return patch_model(causal_lm(model), cfg.patch.method, **stage_patch_params(cfg, stage))


# ---------------------------------------------------------------- one optimizer step


def train_step(
    loss_module, opt, sched, params, train: Blocks, cfg: FinetuneConfig, pos: Position, accelerator, run: Path
) -> dict:
    """One optimizer step over ``tokens_per_step`` tokens of the current stage; advances ``pos``."""
    stage = cfg.stages[pos.stage]
    world = accelerator.num_processes
    rank, groups = data_split(accelerator, cfg)  # context parallel: a group of processes shares each sequence
    n_seq = cfg.sequences_per_step(pos.stage)
    t0 = time.perf_counter()
    starts = next_starts(train, n_seq, pos, cfg.seed)
    blocks = train.read(starts)
    weights = None
    if cfg.data.answer_weight != 1 and len(train.answers):  # weight of each target: the answers' tokens weigh more
        weights = 1 + (cfg.data.answer_weight - 1) * train.answer_mask(starts)[:, 1:].float()
    positions = None
    if stage.window:  # PoSE: the same skips on every process, seeded by the step (a resumed run draws them again)
        rng = np.random.default_rng([cfg.seed, pos.step])
        positions = torch.stack([pose_position_ids(stage.window, stage.seq_len, rng) for _ in range(n_seq)])
    mine = blocks[rank::groups]
    mine_positions = positions[rank::groups] if positions is not None else None
    mine_weights = weights[rank::groups] if weights is not None else None
    global_targets = n_seq * (stage.block_len - 1)
    size = cfg.optimization.micro_batch_size
    micro = [mine[i : i + size] for i in range(0, len(mine), size)]
    local_sum = torch.zeros((), device=accelerator.device)
    for j, mb in enumerate(micro):
        mb_positions = mine_positions[j * size : (j + 1) * size] if positions is not None else None
        mb_weights = mine_weights[j * size : (j + 1) * size] if weights is not None else None
        with gradient_sync(accelerator, loss_module, sync=j == len(micro) - 1):
            nll = block_nll(
                loss_module,
                mb,
                mb_positions,
                accelerator,
                cfg,
                backward_scale=world / global_targets,
                weights=mb_weights,
            )
        local_sum += nll
    if not micro:  # more processes than sequences: still join the gradient all-reduce
        block_nll(loss_module, blocks[:1], None, accelerator, cfg, backward_scale=0.0)
    loss = (accelerator.reduce(local_sum, reduction="sum") / global_targets).item()
    if not math.isfinite(loss):
        raise diverged(run, pos, loss, stage.seq_len, accelerator)
    if cfg.optimization.grad_clip:
        clip_gradients(accelerator, params, cfg.optimization.grad_clip)
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    pos.step += 1
    dt = time.perf_counter() - t0
    return {
        "step": pos.step,
        "stage": pos.stage,
        "seq_len": stage.seq_len,
        "processes": world,
        "loss": loss,
        "lr": lr,
        "tokens": n_seq * stage.block_len,
        "tokens_per_s": n_seq * stage.block_len / dt,
    }


def block_nll(
    loss_module,
    blocks: torch.Tensor,
    positions: torch.Tensor | None,
    accelerator,
    cfg,
    backward_scale: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of ``blocks`` on this process (each target times its ``weights`` entry,
    ``[batch, seq - 1]``, when given), and its backward when ``backward_scale`` is given (the scale makes the
    gradient averaged over processes equal the global mean). With context parallel each process of a group holds a
    slice of the sequence: the targets are shifted before the split and the sums of the group add up to the whole
    block's."""
    blocks = blocks.to(accelerator.device)
    positions = positions.to(accelerator.device) if positions is not None else None
    weights = weights.to(accelerator.device) if weights is not None else None
    labels, buffers = None, []
    if cfg.distributed.cp_size > 1:
        labels = shifted_labels(blocks)
        if positions is None:
            positions = torch.arange(blocks.shape[1], device=blocks.device).expand_as(blocks).contiguous()
        buffers = [blocks, labels, positions]
        if weights is not None:  # aligned with the labels (the last position has no target)
            weights = torch.cat([weights, weights.new_zeros(weights.shape[0], 1)], dim=1)
            buffers.append(weights)
    with sequence_split(accelerator, cfg, buffers):  # a no-op without context parallel
        nll = loss_module(blocks, positions, labels=labels, weights=weights)
        if backward_scale is not None:
            accelerator.backward(nll * backward_scale)
    return nll.detach()


def diverged(run: Path, pos: Position, loss: float, seq_len: int, accelerator) -> TrainingError:
    """The error for a non-finite loss at step ``pos.step + 1``. The checkpoint of step ``pos.step`` (if one was
    saved) holds the very weights that gave this loss, so it is set aside as ``diverged-step-N``; every earlier
    checkpoint's weights went on to a finite loss, so the last one left is good."""
    accelerator.wait_for_everyone()
    bad = run / "checkpoints" / f"step-{pos.step:06d}"
    aside = ""
    if accelerator.is_main_process and bad.is_dir():
        os.replace(bad, bad.with_name(f"diverged-{bad.name}"))
        aside = f" (its weights gave this loss: set aside as {bad.with_name(f'diverged-{bad.name}')})"
    accelerator.wait_for_everyone()
    found = checkpoints(run)
    return TrainingError(
        f"loss became {loss} at step {pos.step + 1} (stage {pos.stage}, seq_len {seq_len}); training stopped. "
        f"Last good checkpoint: {found[-1] if found else 'none yet'}{aside}. Lower the learning rate "
        "(optimization.lr=...) and rerun with --resume",
        exit_code=EXIT_DIVERGED,
    )


@torch.no_grad()
def held_out_loss(loss_module, held: np.ndarray, seq_len: int, n_blocks: int, accelerator, cfg) -> float | None:
    """Mean next-token loss on the first ``n_blocks`` held-out blocks of ``seq_len`` (every process computes
    them: a sharded model needs all processes in every forward; context parallel: each its slice)."""
    blocks = list(first_blocks(held, seq_len, n_blocks))
    if not blocks:
        return None
    module = accelerator.unwrap_model(loss_module)
    was_training = module.training
    module.eval()
    total = sum(block_nll(module, block, None, accelerator, cfg) for block in blocks)
    if cfg.distributed.cp_size > 1:  # each group's slices add up to the blocks; every group computed them
        total = accelerator.reduce(total, reduction="sum") / data_split(accelerator, cfg)[1]
    module.train(was_training)
    return total.item() / (len(blocks) * (seq_len - 1))


class MetricsLog:
    """``metrics.jsonl``, one JSON record a line, written by the main process. On resume the lines after the resumed
    step are dropped (also a line cut short by a kill), so the file is the curve of one uninterrupted run."""

    def __init__(self, path: Path, main: bool, keep_until: int):
        self.path = path
        self.file = None
        if not main:
            return
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the last line of a killed run
                if record.get("step", 0) <= keep_until:
                    kept.append(line)
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# ---------------------------------------------------------------- checkpoints


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def _keep_trainable_only(accelerator):
    def hook(models, weights, output_dir):
        for i, model in enumerate(models[: len(weights)]):  # accelerate's FSDP saves sharded weights itself
            names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    return hook


def save_training_state(accelerator, run: Path, pos: Position, cfg: FinetuneConfig, loss_module, opt) -> Path:
    """``checkpoints/step-N``: trainable weights, optimizer, scheduler, RNG (every process), position. Atomic.
    Sharded on CPU: accelerate saves scheduler and RNG, every process its weight and optimizer shards (DCP)."""
    final = run / "checkpoints" / f"step-{pos.step:06d}"
    tmp = final.parent / f".{final.name}{TMP_MARK}"  # one name that every process knows
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with abandon_on_error(tmp, final):
        accelerator.save_state(str(tmp))
        if shards_itself(cfg, accelerator):
            save_sharded(tmp, loss_module, opt)
        accelerator.wait_for_everyone()  # every process has written its RNG state before the folder moves
        if accelerator.is_main_process:
            (tmp / "position.json").write_text(json.dumps(asdict(pos)))
            commit_folder(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resume_position(run: Path, accelerator, sched, cfg: FinetuneConfig, loss_module, opt) -> Position:
    """Load the last checkpoint into the prepared objects; the run's position (a fresh one when none exists). The
    learning rate is the config's (a diverged run resumes with a lower ``optimization.lr``)."""
    found = checkpoints(run)
    if not found:
        return Position()
    try:
        accelerator.load_state(str(found[-1]), strict=False)
        if shards_itself(cfg, accelerator):
            load_sharded(found[-1], loss_module, opt)
        pos = Position(**json.loads((found[-1] / "position.json").read_text()))
    except Exception as err:  # noqa: BLE001  (damaged outside ctxext: its writes are atomic)
        raise TrainingError(
            f"{found[-1]} cannot be loaded ({type(err).__name__}: {err}); move it out of "
            f"{found[-1].parent} to resume from the checkpoint before it"
        ) from None
    inner = getattr(sched, "scheduler", sched)  # accelerate wraps it
    inner.base_lrs = [cfg.optimization.lr for _ in inner.base_lrs]
    for group in inner.optimizer.param_groups:
        group["initial_lr"] = cfg.optimization.lr
        group["lr"] = cfg.optimization.lr * stage_lr(cfg, inner.last_epoch)  # what LambdaLR computes
    inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
    log.info("resumed from %s", found[-1])
    return pos


# ---------------------------------------------------------------- results


def save_results(peft_model, tokenizer, run: Path) -> dict:
    """``adapter/`` (LoRA weights, trainable extras, the patch record) and ``merged/`` (a full checkpoint); a fully
    fine-tuned model has no adapter."""
    from safetensors.torch import save_file

    from ctxext.io.checkpoint import save_checkpoint
    from ctxext.models import causal_lm, disable_activation_checkpointing

    if not hasattr(peft_model, "merge_and_unload"):  # tuning: full
        peft_model.config.use_cache = True
        disable_activation_checkpointing(peft_model)
        return {"merged": str(save_checkpoint(peft_model, run / "merged", tokenizer=tokenizer, force=True))}
    adapter = run / "adapter"
    with atomic_folder(adapter, replace=True) as tmp:
        peft_model.save_pretrained(tmp)
        extras = {
            n: p.detach().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n
        }
        if extras:
            save_file({n: t.cpu() for n, t in extras.items()}, str(tmp / "ctxext_extras.safetensors"))
        (tmp / "ctxext_patch.json").write_text(
            json.dumps(getattr(causal_lm(peft_model).config, "ctxext", {}), indent=2)
        )
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    disable_activation_checkpointing(merged)
    out = save_checkpoint(merged, run / "merged", tokenizer=tokenizer, force=True)
    return {"adapter": str(adapter), "merged": str(out)}
