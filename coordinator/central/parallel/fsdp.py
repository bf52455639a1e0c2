"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the shared layers, one unit per block.

Sharding plan (torchtitan style: inner units first, the root last):

* every block is its own unit — except, in dense mode, the FFN banks of the GQA blocks:
  dense PDR layer ℓ *reuses* bank ``ℓ mod n_gqa`` (the same module runs in several blocks
  per forward), which an FSDP unit that reshards after its block cannot support, so those
  banks stay in the root unit (unsharded for the whole forward/backward);
* the root unit holds the embeddings, the final norm, the LM head (and the dense banks);
* expert weights of :class:`~coordinator.central.parallel.expert_parallel.ExpertParallelMoE`
  layers are ``ignored_params``: they are sharded by expert parallelism instead.

On CUDA the parameters are gathered in bf16 and gradients reduced in fp32
(``MixedPrecisionPolicy``); on CPU everything stays fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from coordinator.central.parallel.distributed import world_size
from coordinator.central.parallel.expert_parallel import expert_parameters


def default_mesh(device: torch.device) -> DeviceMesh:
    """1-D data-parallel mesh over the whole world on ``device``'s type."""
    return init_device_mesh(device.type, (world_size(),), mesh_dim_names=("dp",))


def mixed_precision_policy(device: torch.device, enabled: bool | None = None):
    """bf16 params / fp32 reductions on CUDA (or when ``enabled``), fp32 otherwise."""
    use = device.type == "cuda" if enabled is None else enabled
    if not use:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward (trades compute for memory).

    The block's ``forward`` is wrapped in place (no wrapper module), so parameter names
    and ``model.layers[i]`` stay as they are. Apply before :func:`apply_fsdp`.
    """
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    mixed_precision: bool | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` (a :class:`~shared_model.model.PerspectiveModel`) in place with FSDP2.

    Args:
        model: the model, already on its device (and expert-parallel if wanted).
        mesh: data-parallel mesh (default: the whole world).
        mixed_precision: force bf16 gathering on/off (default: on for CUDA only).
        reshard_after_forward: free gathered block parameters after each block's forward
            (ZeRO-3); False keeps them until backward (ZeRO-2, more memory, less traffic).

    Returns:
        ``model`` (its parameters are now DTensors, names unchanged).
    """
    device = next(model.parameters()).device
    mesh = mesh or default_mesh(device)
    ignored = set(expert_parameters(model))
    kwargs = {
        "mesh": mesh,
        "mp_policy": mixed_precision_policy(device, mixed_precision),
        "ignored_params": ignored or None,
    }
    for block in model.layers:
        shared_bank = not model.moe and block.is_gqa  # reused by other blocks: root unit
        unit = [block.mixer_norm, block.mixer, block.ffn_norm] if shared_bank else block
        fully_shard(unit, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    return model
