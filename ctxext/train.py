"""Progressive-length LoRA fine-tuning on accelerate: setup -> stages -> merged checkpoint.

    ctxext finetune configs/tiny.yaml                    # one CPU process
    accelerate launch --num_processes 4 -m ctxext.cli finetune configs/llama3.2-1b-32k.yaml   # DDP / FSDP / DS
    accelerate launch --multi_gpu --num_processes 2 -m ctxext.cli finetune configs/tiny.yaml  # 2 CPU processes (gloo)

(On a machine without GPUs, ``accelerate launch --cpu`` starts a single process unless MPI is set up; use
``--multi_gpu --num_processes N``, which starts N CPU processes with the gloo backend.)

A run is a list of stages of growing ``seq_len``. Documents are tokenized once, joined with EOS and packed into
blocks of each stage's length (no padding). Every optimizer step sees ``tokens_per_step`` tokens whatever the
stage (fewer, longer sequences as the length grows), split over processes and micro-batches. The loss never
materializes full fp32 logits: the LM head and cross-entropy run ``loss_chunk_tokens`` at a time under activation
checkpointing. Checkpoints (trainable weights, optimizer, scheduler, RNG of every process, data position) are
written atomically every ``save_every`` steps; ``--resume`` continues the same loss curve. The end result is a
merged full checkpoint that ``from_pretrained`` loads as the extended model, plus the adapter alone.
"""

from __future__ import annotations

import contextlib
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
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .config import FinetuneConfig
from .data import load_texts, tokenize_documents
from .loss import linear_cross_entropy

log = logging.getLogger(__name__)
EXIT_DIVERGED = 3


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, diverged loss); the message says what happened and what is kept."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Position:
    """Where the run is: global step, stage, blocks consumed in the stage, and the stage's epoch over its blocks."""

    step: int = 0
    stage: int = 0
    cursor: int = 0
    epoch: int = 0


# ---------------------------------------------------------------- data


def token_stream(cfg: FinetuneConfig, tokenizer, source: str, cache: Path, max_documents: int | None) -> np.ndarray:
    """Documents of ``source`` tokenized once, joined with EOS (cached in the run folder for resumes)."""
    if cache.is_file():
        return np.load(cache)
    texts = load_texts(source, text_field=cfg.data.text_field, max_documents=max_documents)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = [t for doc in tokenize_documents(tokenizer, texts) for t in (*doc, eos)]
    stream = np.asarray(ids, dtype=np.int64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, stream)
    return stream


def block_order(n_blocks: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, epoch]).permutation(n_blocks)


def step_blocks(stream: np.ndarray, seq_len: int, count: int, pos: Position, seed: int) -> torch.Tensor:
    """The next ``count`` packed blocks ``[count, seq_len]`` of the stage; advances ``pos`` (wraps into epochs)."""
    n_blocks = len(stream) // seq_len
    rows = []
    for _ in range(count):
        if pos.cursor >= n_blocks:
            pos.cursor, pos.epoch = 0, pos.epoch + 1
        b = int(block_order(n_blocks, seed, pos.stage, pos.epoch)[pos.cursor])
        rows.append(stream[b * seq_len : (b + 1) * seq_len])
        pos.cursor += 1
    return torch.from_numpy(np.stack(rows))


# ---------------------------------------------------------------- model


class ChunkedLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM; ``forward(input_ids)`` returns the summed next-token NLL of the block.

    The decoder runs once; the LM head and cross-entropy run ``chunk`` positions at a time
    (``ctxext.loss.linear_cross_entropy``: gradients computed chunk by chunk in the forward pass), so at most
    ``[chunk, vocab]`` fp32 logits exist at any moment and nothing is recomputed.
    """

    def __init__(self, model: nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def _causal_lm(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lm = self._causal_lm()
        hidden = lm.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        targets = input_ids[:, 1:]
        head = lm.lm_head
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if type(head) is nn.Linear and head.bias is None:
            return linear_cross_entropy(hidden.flatten(0, 1), head.weight, targets.flatten(), chunk=self.chunk,
                                        softcap=softcap)
        # an adapted or biased head (e.g. LoRA on lm_head): chunks under activation checkpointing instead
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, targets.shape[1], self.chunk):
            h, t = hidden[:, s : s + self.chunk], targets[:, s : s + self.chunk]
            total = total + checkpoint(self._chunk_nll, h, t, head, softcap, use_reentrant=False)
        return total

    @staticmethod
    def _chunk_nll(hidden, targets, head, softcap):
        logits = head(hidden).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def stage_patch_params(cfg: FinetuneConfig, stage: int) -> dict:
    params = cfg.patch.given()
    target = cfg.patch.target_length
    override = cfg.stages[stage].patch
    if override is not None:
        params.update(override.given())
        if "factor" in override.given():
            target = None
    return {"scope": cfg.patch.scope, "target_length": target, **params}


def build_model(cfg: FinetuneConfig):
    """Load, patch for stage 0, add LoRA (+ optional trainable embeddings / norms). Returns (peft model, handle)."""
    from peft import LoraConfig, get_peft_model

    from .hub import check_source, load_model
    from .patch import patch_model
    from .reference import resolve_model

    path = check_source(resolve_model(cfg.model.path))
    model = load_model(path, dtype=cfg.model.dtype)
    if model.config._attn_implementation != cfg.model.attn_implementation:
        model.set_attn_implementation(cfg.model.attn_implementation)
    handle = patch_model(model, cfg.patch.method, **stage_patch_params(cfg, 0))
    targets = cfg.lora.target_modules
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        # tied embeddings share one Parameter with lm_head: training it trains both, and they stay tied
        if cfg.lora.train_embeddings and "embed_tokens" in name:
            p.requires_grad_(True)
        if cfg.lora.train_norms and "norm" in name.rsplit(".", 2)[-2]:
            p.requires_grad_(True)
    if cfg.optimization.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return peft_model, handle, path


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lr_multiplier(cfg: FinetuneConfig, step: int) -> float:
    """LR at global ``step`` relative to ``optimization.lr``: warmup + schedule within each stage."""
    start = 0
    for i, stage in enumerate(cfg.stages):
        n = cfg.stage_steps(i)
        if step < start + n or i == len(cfg.stages) - 1:
            k = step - start
            peak = (stage.lr or cfg.optimization.lr) / cfg.optimization.lr
            warm = cfg.optimization.warmup_steps
            if k < warm:
                return peak * (k + 1) / warm
            t = min(1.0, (k - warm) / max(1, n - warm))
            floor = cfg.optimization.min_lr_ratio
            shape = {"constant": 1.0, "linear": 1 - (1 - floor) * t,
                     "cosine": floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))}[cfg.optimization.schedule]
            return peak * shape
        start += n
    return 0.0


# ---------------------------------------------------------------- checkpoints


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))


def save_training_state(accelerator, run: Path, pos: Position) -> Path:
    """``checkpoints/step-N``: trainable weights, optimizer, scheduler, RNG (every process), position. Atomic."""
    final = run / "checkpoints" / f"step-{pos.step:06d}"
    tmp = run / "checkpoints" / f".tmp-step-{pos.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder moves
    if accelerator.is_main_process:
        (tmp / "position.json").write_text(json.dumps(asdict(pos)))
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig, *, output_dir: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the fine-tuning described by ``cfg``; returns the paths of the results and the last metrics."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    run = Path(output_dir or cfg.output_dir)
    # the global batch is split over processes, so the scheduler steps once per optimizer step (not per process)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    torch.manual_seed(cfg.seed)
    occupied = run.exists() and any(run.iterdir())
    accelerator.wait_for_everyone()  # every process looks before the main process writes anything
    if occupied and not resume:
        raise TrainingError(f"{run} already holds a run; pass --resume to continue it or choose another --output-dir")
    if accelerator.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.resolved.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    accelerator.wait_for_everyone()

    # ---- setup: model, data, optimizer
    for source in filter(None, (cfg.data.source, cfg.data.held_out)):
        if not source.startswith("stdlib:") and "/" not in source.strip("./") and not Path(source).exists():
            raise TrainingError(f"data source {source!r} does not exist; give a file, a folder, stdlib:train or a hub name")
        if (source.startswith((".", "/")) or os.sep in source) and not Path(source).exists():
            raise TrainingError(f"data source {source} does not exist; check data.source / data.held_out")
    peft_model, handle, model_path = build_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if accelerator.is_main_process:
        token_stream(cfg, tokenizer, cfg.data.source, run / "tokens" / "train.npy", cfg.data.max_documents)
        if cfg.data.held_out is not None:
            token_stream(cfg, tokenizer, cfg.data.held_out, run / "tokens" / "held_out.npy", None)
    accelerator.wait_for_everyone()
    train = token_stream(cfg, tokenizer, cfg.data.source, run / "tokens" / "train.npy", cfg.data.max_documents)
    if cfg.data.held_out is not None:
        held = token_stream(cfg, tokenizer, cfg.data.held_out, run / "tokens" / "held_out.npy", None)
    else:
        cut = int(len(train) * (1 - cfg.data.held_out_fraction))
        train, held = train[:cut], train[cut:]
    for i, stage in enumerate(cfg.stages):
        if len(train) < stage.seq_len:
            raise TrainingError(f"the training data has {len(train):,} tokens, fewer than one block of stage {i} "
                                f"(seq_len {stage.seq_len}); give more data ({cfg.data.source}) or shorter stages")

    loss_module = ChunkedLMLoss(peft_model, cfg.optimization.loss_chunk_tokens)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optimization.lr, betas=cfg.optimization.betas,
                            weight_decay=cfg.optimization.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(cfg, s))
    loss_module, opt, sched = accelerator.prepare(loss_module, opt, sched)

    def keep_trainable_only(models, weights, output_dir):
        for i, model in enumerate(models):
            names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(keep_trainable_only)

    pos = Position()
    metrics_path = run / "metrics.jsonl"
    if resume:
        found = checkpoints(run)
        if found:
            accelerator.load_state(str(found[-1]), strict=False)
            pos = Position(**json.loads((found[-1] / "position.json").read_text()))
            if accelerator.is_main_process and metrics_path.is_file():  # drop lines after the checkpoint
                lines = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= pos.step]
                metrics_path.write_text("".join(ln + "\n" for ln in lines))
            log.info("resumed from %s", found[-1])
            if pos.stage > 0:
                handle.remove()
                from .patch import patch_model

                handle = patch_model(peft_model.get_base_model(), cfg.patch.method, **stage_patch_params(cfg, pos.stage))

    # ---- train
    world, rank = accelerator.num_processes, accelerator.process_index
    total_steps = sum(cfg.stage_steps(i) for i in range(len(cfg.stages)))
    stage_ends = np.cumsum([cfg.stage_steps(i) for i in range(len(cfg.stages))]).tolist()
    bar = tqdm(total=total_steps, initial=pos.step, desc="finetune", unit="step",
               disable=not (progress and accelerator.is_main_process))
    metrics_file = metrics_path.open("a") if accelerator.is_main_process else None
    last = {}
    loss_module.train()
    while pos.step < total_steps:
        stage_index = next(i for i, end in enumerate(stage_ends) if pos.step < end)
        if stage_index != pos.stage:  # new stage: new length, maybe new method parameters
            pos.stage, pos.cursor, pos.epoch = stage_index, 0, 0
            handle.remove()
            from .patch import patch_model

            handle = patch_model(peft_model.get_base_model(), cfg.patch.method, **stage_patch_params(cfg, stage_index))
        stage = cfg.stages[pos.stage]
        n_seq = cfg.sequences_per_step(pos.stage)
        t0 = time.perf_counter()
        blocks = step_blocks(train, stage.seq_len, n_seq, pos, cfg.seed)
        mine = blocks[rank::world]
        global_targets = n_seq * (stage.seq_len - 1)
        micro = [mine[i : i + cfg.optimization.micro_batch_size] for i in range(0, len(mine), cfg.optimization.micro_batch_size)]
        local_sum = torch.zeros((), device=accelerator.device)
        for j, mb in enumerate(micro):
            sync = j == len(micro) - 1
            ctx = accelerator.no_sync(loss_module) if not sync else contextlib.nullcontext()
            with ctx:
                nll = loss_module(mb.to(accelerator.device))
                accelerator.backward(nll * world / global_targets)  # DDP averages over processes
            local_sum += nll.detach()
        if not micro:  # more processes than sequences: still join the gradient all-reduce
            nll = loss_module(blocks[:1].to(accelerator.device)) * 0.0
            accelerator.backward(nll)
        loss = (accelerator.reduce(local_sum, reduction="sum") / global_targets).item()
        if not math.isfinite(loss):
            found = checkpoints(run)
            where = found[-1] if found else "none yet"
            raise TrainingError(
                f"loss became {loss} at step {pos.step + 1} (stage {pos.stage}, seq_len {stage.seq_len}); training "
                f"stopped. Last good checkpoint: {where}. Lower the learning rate (optimization.lr=...) and rerun "
                f"with --resume", exit_code=EXIT_DIVERGED)
        if cfg.optimization.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.optimization.grad_clip)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pos.step += 1
        dt = time.perf_counter() - t0
        record = {"step": pos.step, "stage": pos.stage, "seq_len": stage.seq_len, "processes": world, "loss": loss,
                  "lr": lr, "tokens": n_seq * stage.seq_len, "tokens_per_s": n_seq * stage.seq_len / dt}
        end_of_stage = pos.step in stage_ends
        if pos.step % cfg.logging.eval_every == 0 or end_of_stage:
            record["held_out_loss"] = held_out_loss(loss_module, held, stage.seq_len, cfg.logging.eval_blocks,
                                                    accelerator)
        last = record
        if metrics_file and (pos.step % cfg.logging.log_every == 0 or "held_out_loss" in record):
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        bar.update(1)
        bar.set_postfix(stage=f"{pos.stage + 1}/{len(cfg.stages)}", seq_len=stage.seq_len, loss=f"{loss:.3f}",
                        tok_s=f"{record['tokens_per_s']:,.0f}")
        if pos.step % cfg.logging.save_every == 0 or pos.step == total_steps:
            save_training_state(accelerator, run, pos)
    bar.close()
    if metrics_file:
        metrics_file.close()

    # ---- save: adapter alone, then the merged checkpoint
    result = {"run": str(run), "metrics": str(metrics_path), "last": last}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.update(save_results(accelerator.unwrap_model(loss_module).model, tokenizer, run, cfg))
    accelerator.wait_for_everyone()
    return result


@torch.no_grad()
def held_out_loss(loss_module, held: np.ndarray, seq_len: int, n_blocks: int, accelerator) -> float | None:
    n = min(n_blocks, len(held) // seq_len)
    if n == 0:
        return None
    module = accelerator.unwrap_model(loss_module)
    was_training = module.training
    module.eval()
    blocks = torch.from_numpy(np.stack([held[i * seq_len : (i + 1) * seq_len] for i in range(n)]))
    total = sum(module(blocks[i : i + 1].to(accelerator.device)).item() for i in range(n))
    module.train(was_training)
    return total / (n * (seq_len - 1))


def save_results(peft_model, tokenizer, run: Path, cfg: FinetuneConfig) -> dict:
    from safetensors.torch import save_file

    from .hub import save_checkpoint

    adapter = run / "adapter"
    peft_model.save_pretrained(adapter)
    extras = {n: p.detach().contiguous() for n, p in peft_model.named_parameters()
              if p.requires_grad and "lora_" not in n}
    if extras:
        save_file({n: t.cpu() for n, t in extras.items()}, str(adapter / "ctxext_extras.safetensors"))
    (adapter / "ctxext_patch.json").write_text(json.dumps(getattr(peft_model.get_base_model().config, "ctxext", {}),
                                                          indent=2))
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True
    getattr(merged, "activation_checkpointing_disable", merged.gradient_checkpointing_disable)()  # no-op when off
    out = save_checkpoint(merged, run / "merged", force=True)
    tokenizer.save_pretrained(out)
    return {"adapter": str(adapter), "merged": str(out)}
