"""Run by tests under torchrun or with SLURM variables: start up through util/, reduce metrics, report as JSON."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from util import distributed  # noqa: E402
from util.device import setup_runtime  # noqa: E402
from util.metrics import MetricLogger  # noqa: E402
from util.progress import EpochProgress  # noqa: E402


def main(out_dir):
    launch = distributed.detect_launch()
    runtime = setup_runtime('cpu', local_rank=launch.local_rank)
    distributed.init_distributed(launch, runtime.dist_backend, runtime.device, timeout_minutes=2)
    rank = distributed.get_rank()
    logger = MetricLogger()
    logger.update(loss=float(rank + 1))  # rank 0 logs 1.0, rank 1 logs 2.0
    logger.update(loss=float(rank + 1) * 3)
    logger.synchronize_between_processes()
    result = dict(launcher=launch.launcher, rank=rank, world_size=distributed.get_world_size(),
                  local_rank=launch.local_rank, backend=runtime.dist_backend,
                  sum=distributed.all_reduce_sum(torch.tensor([float(rank + 1)])).item(),
                  loss_global_avg=logger.meters['loss'].global_avg,
                  loss_count=logger.meters['loss'].count, main=distributed.is_main_process())
    result.update(resumed_epoch_stats(runtime, rank))
    distributed.barrier()
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    distributed.cleanup()


def resumed_epoch_stats(runtime, rank: int) -> dict:
    """Save a partial epoch's averages (2 of 4 iterations), resume it with nothing left to run (a stop agreed
    at the epoch's last window), finish: every rank must reach the same collectives, and the averages hold."""
    progress = EpochProgress(runtime, epoch=0, iters_per_epoch=4, print_freq=100)
    for it in range(2):
        progress.update(it, torch.tensor(float(rank + 1) * (it + 1)), 0.1, batch_size=8)
    saved = progress.partial_state()
    resumed = EpochProgress(runtime, epoch=0, iters_per_epoch=2, print_freq=100, start_iter=2)
    resumed.restore(saved)
    stats = resumed.finish()
    return dict(resumed_loss=stats['loss'], resumed_loss_per_rank=stats['loss_per_rank'])


if __name__ == '__main__':
    main(sys.argv[1])
