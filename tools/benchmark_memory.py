"""The memory benchmark of `python -m tools.benchmark --memory`: bytes each process holds of parameters, gradients
and AdamW state after a training step, with DDP (every rank a full replica) and with --fsdp (each rank 1/N), at
several process counts. Counted from the tensors themselves (a shard's local part under FSDP), so the figures are
exact and independent of the allocator; activations are not included.

One process count is one torchrun launch of this module as a worker:
python -m torch.distributed.run --nproc_per_node=2 -m tools.benchmark_memory --model mae_vit_base_patch16 --fsdp
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(argv: List[str]):
    """Inside torchrun: one step of the model, then every rank's bytes, gathered; rank 0 prints them as JSON."""
    import argparse

    from tools.benchmark_step import build, build_optimizer, make_forward
    from util import distributed, launch
    from util.loss_scaler import LossScaler
    from util.device import setup_runtime
    parser = argparse.ArgumentParser()
    for flag in ('--model', '--device'):
        parser.add_argument(flag, required=True)
    parser.add_argument('--input_size', type=int, required=True)
    parser.add_argument('--patch_size', type=int, default=None)
    parser.add_argument('--fsdp', action='store_true')
    args = parser.parse_args(argv)
    info = distributed.detect_launch()
    runtime = setup_runtime(args.device, 'off', local_rank=info.local_rank)
    distributed.init_distributed(info, runtime.dist_backend, runtime.device)
    step_args = SimpleNamespace(model=args.model, input_size=args.input_size, patch_size=args.patch_size,
                                batch_size=2, mask_ratio=0.75, grad_checkpointing=False, compile=False,
                                adamw_impl='auto')
    torch.manual_seed(0)
    model, module = launch.place_model(build(args.model, step_args, 'sdpa'), runtime, step_args, fsdp=args.fsdp)
    optimizer = build_optimizer(args.model, module, 'auto', runtime)
    images = torch.randn(2, 3, args.input_size, args.input_size, device=runtime.device)
    LossScaler(None)(make_forward(args.model, step_args, runtime)(model, images), optimizer,
                     parameters=model.parameters())
    own = local_bytes(module, optimizer)
    gathered = [json.loads(blob) for blob in distributed.all_gather_bytes(json.dumps(own).encode())]
    if distributed.is_main_process():
        total = sum(p.numel() for p in module.parameters())  # a DTensor counts its full size
        print('MEMORY ' + json.dumps({'parameters_total': total, 'per_rank': gathered}))
    distributed.cleanup()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch_one(model: str, device: str, input_size: int, patch_size, processes: int, fsdp: bool) -> Dict:
    """One torchrun launch of the worker; its per-rank bytes and the largest of each kind."""
    command = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}',
               f'--master_port={free_port()}', '-m', 'tools.benchmark_memory', '--model', model, '--device', device,
               '--input_size', str(input_size), *(['--patch_size', str(patch_size)] if patch_size else []),
               *(['--fsdp'] if fsdp else [])]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    line = next((line for line in proc.stdout.splitlines() if line.startswith('MEMORY ')), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f'memory benchmark ({processes} processes, fsdp={fsdp}) failed: {proc.stderr[-2000:]}')
    result = json.loads(line[len('MEMORY '):])
    worst = {key: max(rank[key] for rank in result['per_rank']) for key in result['per_rank'][0]}
    total = sum(worst.values())
    return {'model': model, 'sharding': 'fsdp' if fsdp else 'ddp', 'processes': processes,
            'parameters': result['parameters_total'], **{f'{k}_bytes': v for k, v in worst.items()},
            'total_bytes': total, 'bytes_per_parameter': total / result['parameters_total']}


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards under FSDP)."""
    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, 'to_local') else t
        return local.numel() * local.element_size()
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {'parameters': sum(nbytes(p) for p in params),
            'gradients': sum(nbytes(p.grad) for p in params if p.grad is not None),
            'optimizer_state': sum(nbytes(t) for t in state)}


if __name__ == '__main__':
    worker(sys.argv[1:])
