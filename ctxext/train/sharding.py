"""Several processes: the weights sharded (FSDP2) and the sequence split (context parallel), for ``ctxext.train``.

The config's ``distributed`` section chooses; the launcher starts the processes (docs/guides/scaling.md):

    torchrun --nproc_per_node 2 -m ctxext.cli finetune configs/tiny.yaml distributed.sharding=fsdp   # CPU, gloo
    accelerate launch --num_processes 8 -m ctxext.cli finetune configs/llama3-8b-128k-cp.yaml       # GPUs, FSDP2 + CP

Two routes to the same FSDP2 (``fully_shard`` on every decoder layer, then on the loss module as the root):

- GPUs: accelerate's FSDP2 plugin with ``ParallelismConfig(dp_shard_size, cp_size)``; accelerate shards at
  ``prepare``, saves sharded state with torch.distributed.checkpoint, and provides ``maybe_context_parallel``.
- CPU (gloo): accelerate 1.15 ignores an FSDP2 plugin there (it reports MULTI_CPU and wraps the model in DDP), so
  ctxext calls ``fully_shard`` itself, leaves model and optimizer out of ``prepare``, and saves their shards with
  torch.distributed.checkpoint next to what accelerate saves (scheduler, RNG). Context parallel cannot run on CPU
  (torch has no sharding rule for the CPU flash-attention kernel) and is refused there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ctxext.errors import ConfigError

log = logging.getLogger(__name__)
SHARDED_STATE = "sharded"  # subfolder of a checkpoint: the DCP shards of weights and optimizer (CPU route)


def check_launch(cfg, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Refuse a launch that does not match the ``distributed`` section, before anything is loaded."""
    dist = cfg.distributed
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if dist.num_processes is not None and world != dist.num_processes:
        raise ConfigError(
            f"distributed.num_processes={dist.num_processes} but {world} process(es) were launched; "
            f"launch {dist.num_processes} (accelerate launch --num_processes {dist.num_processes} ...) "
            "or change num_processes"
        )
    if world % dist.cp_size:
        raise ConfigError(
            f"distributed.cp_size={dist.cp_size} does not divide the {world} launched process(es): "
            "every sequence goes to a group of cp_size processes"
        )
    if dist.cp_size > 1 and not cuda:
        raise ConfigError(
            f"distributed.cp_size={dist.cp_size} needs CUDA GPUs: context parallel replaces SDPA with "
            "a ring over GPUs, and torch has no rule for the CPU attention kernel "
            "(aten._scaled_dot_product_flash_attention_for_cpu); use cp_size: 1 on CPU"
        )


def make_accelerator(cfg):
    """The Accelerator for the run: on GPUs with ``sharding: fsdp``, accelerate's FSDP2 and ParallelismConfig."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    kwargs = {}
    dist = cfg.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cuda and dist.sharding == "fsdp" and world > 1:  # one process: nothing to shard
        from accelerate.utils import FullyShardedDataParallelPlugin, ParallelismConfig

        # the decoder layers are wrapped one by one (ChunkedLMLoss names them in _no_split_modules); ctxext
        # enables activation checkpointing itself, before sharding
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
            activation_checkpointing=False,
        )
        kwargs["parallelism_config"] = ParallelismConfig(dp_shard_size=world // dist.cp_size, cp_size=dist.cp_size)
    # the global batch is split over processes, so the scheduler steps once per optimizer step (not per process)
    return Accelerator(cpu=not cuda, step_scheduler_with_optimizer=False, **kwargs)


def shards_itself(cfg, accelerator) -> bool:
    """True on the CPU route: FSDP2 asked for, several processes, and accelerate does not provide it."""
    return cfg.distributed.sharding == "fsdp" and accelerator.num_processes > 1 and not accelerator.is_fsdp2


def shard(loss_module: torch.nn.Module, cfg, accelerator) -> torch.nn.Module:
    """CPU route: ``fully_shard`` every decoder layer, then the loss module (the root, whose forward gathers the
    embeddings and head). Call before the optimizer is built. A no-op otherwise."""
    if cfg.distributed.cp_size > 1:
        check_full_attention(loss_module.model)
    if not shards_itself(cfg, accelerator):
        return loss_module
    return fully_shard_model(loss_module, accelerator.device.type, accelerator.num_processes)


def check_full_attention(model: torch.nn.Module) -> None:
    """Context parallel drops the attention mask for plain causal attention: refuse sliding-window layers (accelerate
    checks this only on a transformers model, and ctxext hands it the loss module)."""
    from ctxext.models import causal_lm

    config = causal_lm(model).config
    kinds = set(getattr(config, "layer_types", None) or []) - {"full_attention"}
    if kinds or (getattr(config, "sliding_window", None) and getattr(config, "layer_types", None) is None):
        raise ConfigError(
            f"context parallel cannot run {config.model_type}: its layers use "
            f"{sorted(kinds) or ['sliding_attention']}, and the ring computes only full causal "
            "attention; use cp_size: 1 for this model"
        )


def fully_shard_model(loss_module: torch.nn.Module, device_type: str, processes: int) -> torch.nn.Module:
    """``fully_shard`` over all ``processes`` (the default process group): each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ctxext.models import decoder_layers

    mesh = init_device_mesh(device_type, (processes,))
    for layer in decoder_layers(loss_module.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    log.info("FSDP2 (fully_shard) over %d %s processes", processes, device_type)
    return loss_module


def prepare(accelerator, cfg, loss_module, opt, sched):
    """``accelerator.prepare`` of what accelerate should wrap (CPU route: the scheduler only) and the trainable
    parameters as the prepared model holds them (accelerate's FSDP2 replaces them by sharded ones)."""
    if shards_itself(cfg, accelerator):
        sched = accelerator.prepare(sched)
    else:
        loss_module, opt, sched = accelerator.prepare(loss_module, opt, sched)
    params = [p for p in accelerator.unwrap_model(loss_module).parameters() if p.requires_grad]
    return loss_module, opt, sched, params


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradient_sync(accelerator, module, sync: bool):
    """Gradient accumulation. DDP: all-reduce only at the last micro-batch (no_sync). FSDP2: reduce-scatter at
    every micro-batch, so that gradients stay sharded (skipping it would keep every layer's full gradient until the
    last micro-batch: the unsharded trainable size, which ``ctxext.train.memory`` does not budget)."""
    if sync or is_sharded(module):
        yield
    else:
        with accelerator.no_sync(module):
            yield


def clip_gradients(accelerator, params: list[torch.Tensor], max_norm: float) -> None:
    """Clip by the global norm; sharded gradients (DTensors) need their norm gathered first."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        accelerator.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


# ---------------------------------------------------------------- data and sequence split


def data_split(accelerator, cfg) -> tuple[int, int]:
    """``(index, count)`` of this process's data-parallel group: the processes of one context-parallel group
    (consecutive ranks: accelerate's mesh puts cp inside dp_shard) train on the same sequences."""
    cp = cfg.distributed.cp_size
    return accelerator.process_index // cp, accelerator.num_processes // cp


def shifted_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """The next-token targets at every position (the last one ignored): split along the sequence with the inputs,
    each shard keeps its own targets."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), -100)], dim=1)


@contextlib.contextmanager
def sequence_split(accelerator, cfg, buffers: list[torch.Tensor]):
    """Context parallel: ``buffers`` ([batch, seq] each) are split along the sequence, in place, for the forward
    and backward run inside; SDPA becomes a ring over the group. A no-op without context parallel."""
    if cfg.distributed.cp_size == 1:
        yield
        return
    with accelerator.maybe_context_parallel(
        buffers=buffers, buffer_seq_dims=[1] * len(buffers), no_restore_buffers=set(buffers)
    ):
        yield


# ---------------------------------------------------------------- checkpoints and the gathered model


def _dcp_state(loss_module, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(loss_module, opt, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model_state, "optim": optim_state}


def save_sharded(folder: Path, loss_module, opt) -> None:
    """CPU route: every process writes its shards of the trainable weights and optimizer states (DCP)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(loss_module, opt), checkpoint_id=str(folder / SHARDED_STATE))


def load_sharded(folder: Path, loss_module, opt) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _dcp_state(loss_module, opt)
    dcp.load(state, checkpoint_id=str(folder / SHARDED_STATE))
    set_state_dict(
        loss_module,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )


def gathered_model(accelerator, loss_module, rebuild):
    """The trained model, whole, on the main process (None elsewhere). Sharded: every process takes part in
    gathering the full state dict, which the main process loads into ``rebuild()``, a fresh unsharded copy."""
    module = accelerator.unwrap_model(loss_module)
    if not is_sharded(module):
        return module.model if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    fresh = rebuild()
    fresh.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return fresh
