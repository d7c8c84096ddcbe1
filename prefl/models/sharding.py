"""Sharding prefl's models with FSDP2 under Lightning's ``ModelParallelStrategy``.

Lightning's ``ModelParallelStrategy`` hands the LightningModule a device mesh and leaves the
parallelisation to ``configure_model``. prefl's modules (``CausalLMModule.configure_model``)
then build every model they hold (policy, frozen reference, reward and value models) this way:

1. only global rank 0 reads the weights (or draws the random init); the other ranks build the
   same architecture on the ``meta`` device (:func:`empty_weights`), so no rank but one ever
   holds a full copy in CPU memory;
2. every decoder layer (the classes in the model's ``_no_split_modules``) and then the root are
   wrapped with ``fully_shard`` over the data-parallel mesh, frozen models included (they are
   sharded for inference and never reach the optimizer);
3. rank 0's full state dict is broadcast into the shards (``set_model_state_dict`` with
   ``broadcast_from_rank0``), buffers too.

Generation runs a data-dependent number of forwards on each rank, which must not issue
collectives: :func:`gathered_params` unshards the policy once for the whole ``generate`` call
(FSDP2 ``unshard``; FSDP1 ``summon_full_params``; DeepSpeed ZeRO-3 ``GatheredParameters``).
:func:`full_state_dict` gathers a sharded model's weights for a Hugging Face export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.distributed as dist

_EMPTY: ContextVar[bool] = ContextVar("prefl_empty_weights", default=False)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Within this context prefl's model builders create parameters on the ``meta`` device and
    read no weight file (``build_hf_model`` uses the checkpoint's config only)."""
    token = _EMPTY.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _EMPTY.reset(token)


def building_empty() -> bool:
    """Whether :func:`empty_weights` is active (read by ``build_hf_model``)."""
    return _EMPTY.get()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (classes named in ``_no_split_modules``),
    found through wrappers such as peft's or :class:`~prefl.models.RewardModel`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def data_parallel_mesh(mesh: object) -> object:
    """The mesh prefl shards over: Lightning's ``data_parallel`` dimension.

    Raises:
        ValueError: If the strategy was set up with tensor parallelism (prefl uses FSDP only).
    """
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "prefl shards with FSDP2 only: set trainer.strategy.init_args.tensor_parallel_size=1 "
            "and data_parallel_size to the world size (nodes x devices)"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_model(model: torch.nn.Module, mesh: object) -> torch.nn.Module:
    """``fully_shard`` every decoder layer of ``model`` and then ``model`` itself (in place); a
    frozen model's root is resharded after each forward too.

    Args:
        model: A Hugging Face model or a wrapper around one, on CPU, its device or ``meta``.
        mesh: A 1-D device mesh (see :func:`data_parallel_mesh`).

    Raises:
        ValueError: If the model names no decoder-layer class to shard on.
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no `_no_split_modules` layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # FSDP2 keeps a root's parameters gathered after forward, for the backward that follows; a
    # frozen model has no backward, so its root is resharded like every layer
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)
    return model


def broadcast_sharded(
    model: torch.nn.Module, mesh: object, device: torch.device, rank0: bool
) -> torch.nn.Module:
    """Shard ``model`` (real on rank 0, built inside :func:`empty_weights` elsewhere) and fill
    every rank's shards and buffers with rank 0's values.

    Args:
        model: The model, on CPU on global rank 0 and on ``meta`` on the other ranks.
        mesh: The data-parallel device mesh.
        device: This rank's device (the shards live there).
        rank0: Whether this is global rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = {k: v.detach().clone() for k, v in model.state_dict().items()} if rank0 else {}
    shard_model(model, mesh)
    if rank0:
        model.to(device)
    else:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    with torch.no_grad():
        for buffer in model.buffers():  # non-persistent buffers (rotary frequencies) too
            dist.broadcast(buffer, src=0)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any part of ``model`` is wrapped by FSDP2 (``fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextlib.contextmanager
def gathered_params(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold ``model``'s full parameters on every rank for the duration (for ``generate``).

    FSDP2 modules are unsharded once and kept unsharded across forwards; FSDP1 uses
    ``summon_full_params``; DeepSpeed ZeRO-3 parameters are gathered with
    ``GatheredParameters``. A model that is not sharded is yielded as is.
    """
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    fsdp2 = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if fsdp2:
        for m in fsdp2:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield model
        finally:
            for m in fsdp2:
                m.reshard()  # the root keeps FSDP2's default: gathered from forward to backward
                m.set_reshard_after_forward(m is not model, recurse=False)
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield model
        return
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield model
        return
    yield model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of ``model`` on CPU.

    A collective for a sharded model: every rank must call it; rank 0 gets the state dict and
    the others None. An unsharded model returns its own state dict.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if dist.get_rank() == 0 else None
