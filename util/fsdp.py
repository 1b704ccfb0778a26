"""Fully sharded training (--fsdp) on PyTorch's FSDP2: every transformer block and then the root module are
sharded over the processes, so each holds 1/N of the parameters, gradients and AdamW state instead of all of
them (DDP). Checkpoints stay in the official format: the full model state dict, gathered on rank 0, and the
optimizer state in torch's own layout (integer parameter ids), so a run resumes at any process count, with or
without --fsdp."""
import contextlib
from typing import Dict, List

import torch
import torch.distributed
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_EVERYWHERE = StateDictOptions(full_state_dict=True)


def shard(model: nn.Module, runtime, world_size: int) -> nn.Module:
    """Shard each block (encoder and decoder) and then the rest of `model` over the `world_size` processes, in
    place. With --amp the parameters are computed in that precision and gradients reduced in float32; the root
    does not cast its inputs, so an MAE's pixel targets stay float32 (autocast still picks per-op precision)."""
    mesh = init_device_mesh(runtime.type, (world_size,))
    with torch.no_grad():  # every rank starts from rank 0's weights, as DDP makes them (each rank seeds seed + rank)
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
    dtype = runtime.amp_dtype
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for name in ('blocks', 'decoder_blocks'):
        for block in getattr(model, name, []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def root_unsharded(model: nn.Module):
    """Inside: a sharded model's root parameters (patch embedding, class token, position table, final norms) are
    whole, as in its forward. Code that reads them outside forward (the k-NN monitor's features) runs in this; the
    blocks unshard themselves when called. A collective under --fsdp; nothing otherwise."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's full state dict on the CPU of rank 0 ({} on the other ranks). A collective."""
    return get_model_state_dict(model, options=FULL_ON_RANK0)


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor]):
    """Full (unsharded) weights into the sharded model; every rank passes the whole state (each read the file)."""
    set_model_state_dict(model, state, options=FULL_EVERYWHERE)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[List[str]]:
    """The names of each param group's parameters, in the optimizer's order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group['params']] for group in optimizer.param_groups]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state on rank 0 ({} elsewhere), in torch's own layout: parameters numbered in
    param-group order, as `optimizer.state_dict()` of an unsharded run writes it. A collective."""
    by_name = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not by_name:
        return {}
    number = {name: i for i, name in enumerate(n for names in parameter_names(model, optimizer) for n in names)}
    groups = [{**group, 'params': [number[name] for name in group['params']]} for group in by_name['param_groups']]
    return {'state': {number[name]: state for name, state in by_name['state'].items()}, 'param_groups': groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """Torch's own optimizer layout (integer ids, any process count, sharded or not) into the sharded optimizer.
    Raises ValueError when the parameter groups do not match."""
    names = [n for group in parameter_names(model, optimizer) for n in group]
    saved_groups = state['param_groups']
    if [len(g['params']) for g in saved_groups] != [len(g['params']) for g in optimizer.param_groups]:
        raise ValueError('the saved parameter groups do not match this model\'s')
    groups = [{**group, 'params': [names[i] for i in group['params']]} for group in saved_groups]
    by_name = {'state': {names[i]: value for i, value in state['state'].items()}, 'param_groups': groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=FULL_EVERYWHERE)
