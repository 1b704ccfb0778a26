"""Distributed start-up (torchrun, SLURM, OpenMPI or one process), rank-0 printing and small collectives.

The collective backend comes from the device layer (nccl / hccl / tccl / gloo); reductions run on the device
that backend wants (the accelerator, or the CPU for gloo), never a hard-coded 'cuda'.
"""
import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

DEFAULT_MASTER_PORT = '29500'
_comm_device = torch.device('cpu')


@dataclass
class LaunchInfo:
    """Where this process sits in the job, as told by its launcher."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = 'single'  # 'torchrun', 'slurm', 'openmpi' or 'single'
    master_addr: Optional[str] = None
    master_port: Optional[str] = None

    @property
    def distributed(self) -> bool:
        """Launched by torchrun, SLURM or OpenMPI: the process group is joined even by a single process, as the
        official code does (the collectives then run, e.g. on nccl, though nothing is shared)."""
        return self.launcher != 'single'


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,009],cpu1' -> 'gpu003', 'n[1-2]-ib' -> 'n1-ib'."""
    match = re.match(r'([^,\[]*)(?:\[([^\]]*)\])?([^,]*)', nodelist.strip())
    prefix, ranges, suffix = match.groups()
    if not ranges:
        return prefix + suffix
    first = ranges.split(',')[0].split('-')[0]
    return prefix + first + suffix


def detect_launch(environ: Mapping[str, str] = os.environ, dist_on_itp: bool = False) -> LaunchInfo:
    """Read rank / world size / local rank from torchrun, OpenMPI (--dist_on_itp) or SLURM variables."""
    if 'RANK' in environ and 'WORLD_SIZE' in environ:
        return LaunchInfo(int(environ['RANK']), int(environ['WORLD_SIZE']), int(environ.get('LOCAL_RANK', 0)),
                          'torchrun', environ.get('MASTER_ADDR'), environ.get('MASTER_PORT'))
    if dist_on_itp or 'OMPI_COMM_WORLD_RANK' in environ:
        return LaunchInfo(int(environ['OMPI_COMM_WORLD_RANK']), int(environ['OMPI_COMM_WORLD_SIZE']),
                          int(environ['OMPI_COMM_WORLD_LOCAL_RANK']), 'openmpi', environ.get('MASTER_ADDR'),
                          environ.get('MASTER_PORT', DEFAULT_MASTER_PORT))
    if 'SLURM_PROCID' in environ and int(environ.get('SLURM_NTASKS', '1')) > 1:
        nodelist = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST') or environ.get(
            'SLURM_NODELIST', '')
        master = environ.get('MASTER_ADDR') or (first_slurm_host(nodelist) if nodelist else None)
        return LaunchInfo(int(environ['SLURM_PROCID']), int(environ['SLURM_NTASKS']),
                          int(environ.get('SLURM_LOCALID', 0)), 'slurm', master,
                          environ.get('MASTER_PORT', DEFAULT_MASTER_PORT))
    return LaunchInfo()


def init_distributed(launch: LaunchInfo, backend: str, comm_device: torch.device, dist_url: str = 'env://',
                     timeout_minutes: float = 30.) -> None:
    """Join the process group (a no-op for one process). The local device must already be set.

    The timeout makes a dead peer end the job instead of hanging it.
    """
    global _comm_device
    _comm_device = comm_device if backend != 'gloo' else torch.device('cpu')
    if not launch.distributed:
        return
    if dist_url == 'env://':
        if launch.master_addr is None:
            raise RuntimeError(f'{launch.launcher} launch: set MASTER_ADDR (and MASTER_PORT) to the rank-0 host')
        os.environ['MASTER_ADDR'] = launch.master_addr
        os.environ['MASTER_PORT'] = launch.master_port or DEFAULT_MASTER_PORT
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=launch.world_size,
                            rank=launch.rank, timeout=datetime.timedelta(minutes=timeout_minutes))
    print0(f'| distributed init ({launch.launcher}, {backend}): rank {launch.rank} of {launch.world_size}, '
           f'init {dist_url}', force=True)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """This process's rank; before the process group is up, the one its launcher gave it (0 without one)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else detect_launch().rank


def is_main_process() -> bool:
    return get_rank() == 0


def comm_device() -> torch.device:
    """The device collective tensors must live on for the current backend."""
    return _comm_device


def print0(*args, force: bool = False, **kwargs):
    """print on rank 0 only (or on every rank with force=True), prefixed with the time."""
    if force or is_main_process():
        now = datetime.datetime.now().strftime('%H:%M:%S')
        prefix = f'[{now}]' if get_world_size() == 1 else f'[{now} rank {get_rank()}]'
        print(prefix, *args, **kwargs, flush=True)


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on the backend's device; returns a new tensor on the input's device."""
    if get_world_size() == 1:
        return tensor
    t = tensor.detach().to(_comm_device)
    dist.all_reduce(t)
    return t.to(tensor.device)


def all_gather_bytes(data: bytes) -> List[bytes]:
    """Every rank's `data`, in rank order, on every rank (sizes may differ between ranks)."""
    world_size = get_world_size()
    if world_size == 1:
        return [data]
    local = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_comm_device)
    size = torch.tensor([local.numel()], dtype=torch.int64, device=_comm_device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=_comm_device)
    padded[:local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, sizes)]


def all_gather_interleaved(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows split over the ranks as ShardedEvalSampler splits images (rank r holds rows r, r + w, r + 2w, ... of
    `total`) -> all `total` rows in order, on every rank, on local's device. One all_gather on the backend's
    device; the shares are padded to the largest, so it holds world_size x ceil(total / w) rows there at once."""
    world_size = get_world_size()
    if world_size == 1:
        return local
    share = -(-total // world_size)
    padded = torch.zeros((share, *local.shape[1:]), dtype=local.dtype, device=_comm_device)
    padded[:local.shape[0]] = local.to(_comm_device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    rows = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for rank, part in enumerate(gathered):
        count = len(range(rank, total, world_size))
        rows[rank::world_size] = part[:count].to(local.device)
    return rows


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Context for forward + backward: with enabled=False, gradients accumulate locally instead of being reduced
    over the processes (DDP's no_sync, FSDP's set_requires_gradient_sync): the same sum after the final
    micro-step, one reduction per optimizer step."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    module = getattr(model, '_orig_mod', model)  # under torch.compile
    if isinstance(module, FSDPModule):
        return fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def cleanup():
    """Leave the process group so the launcher sees a clean exit."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size_of_launch(args) -> int:
    """The number of processes the launcher (torchrun, SLURM, OpenMPI) started, known before the process group
    is up, so that the checks that depend on it run before any work."""
    return detect_launch(dist_on_itp=args.dist_on_itp).world_size
