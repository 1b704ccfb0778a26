"""Start-up and tear-down shared by the main_* scripts: device and distributed init, seeding, model placement
(device, gradient checkpointing, torch.compile, DDP), and the mapping of failures to one line and an exit code.
"""
import datetime
import os
import sys
import time

import torch

from util import distributed, preemption
from util.args import UsageError
from util.checkpoint import CheckpointError
from util.datasets import DataError
from util.device import DeviceError, Runtime, seed_everything, setup_runtime
from util.distributed import print0
from util.progress import NonFiniteLossError

USER_ERRORS = (UsageError, DeviceError, CheckpointError, DataError)


def start(args) -> Runtime:
    """Resolve the device, join the process group, seed, and record the resolved setup in args."""
    launch = distributed.detect_launch(dist_on_itp=args.dist_on_itp)
    runtime = setup_runtime(args.device, args.amp, local_rank=launch.local_rank)
    distributed.init_distributed(launch, runtime.dist_backend, runtime.device, args.dist_url, args.dist_timeout)
    args.rank, args.world_size, args.gpu = launch.rank, launch.world_size, launch.local_rank
    args.distributed = launch.distributed
    args.device, args.amp = runtime.type, runtime.amp
    seed_everything(args.seed + launch.rank)
    preemption.install_handlers()
    print0(f'job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}')
    print0('{}'.format(args).replace(', ', ',\n'))
    print0(f'device: {runtime.describe()}, {launch.world_size} process{"es" if launch.distributed else ""}')
    return runtime


def effective_lr(args) -> float:
    """lr = blr * effective batch / 256 unless --lr is given; prints the arithmetic like the official scripts."""
    eff_batch_size = args.batch_size * args.accum_iter * distributed.get_world_size()
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print0('base lr: %.2e' % (args.lr * 256 / eff_batch_size))
    print0('actual lr: %.2e' % args.lr)
    print0('accumulate grad iterations: %d' % args.accum_iter)
    print0('effective batch size: %d' % eff_batch_size)
    return args.lr


def place_model(model: torch.nn.Module, runtime: Runtime, args):
    """Move to the device and wrap for training. Returns (model to call, model_without_ddp to save)."""
    if getattr(args, 'grad_checkpointing', False):
        model.set_grad_checkpointing(True)
    model.to(runtime.device)
    model_without_ddp = model
    if getattr(args, 'compile', False):
        model = compile_model(model, runtime)
    if args.distributed:
        device_ids = [runtime.index] if runtime.index is not None else None
        # every trainable parameter is used in each step, so no unused-parameter search (it costs every step)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, model_without_ddp


def compile_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """torch.compile with a clear message and the eager model as fallback when the backend cannot compile."""
    try:
        import torch._dynamo
        # compilation happens at the first call: a graph that fails to compile then runs eagerly, with a warning
        torch._dynamo.config.suppress_errors = True
        compiled = torch.compile(model)
        print0(f'torch.compile: enabled on {runtime.type} (the first steps are slow while it compiles)')
        return compiled
    except Exception as e:  # unsupported backend or missing compiler toolchain
        print0(f'torch.compile is not available here ({type(e).__name__}: {str(e).splitlines()[0]}); '
               'continuing without it')
        return model


def run_main(main_fn, args):
    """Call main_fn(args); turn expected failures into one line on stderr and an exit code."""
    start_time = time.time()
    try:
        main_fn(args)
    except USER_ERRORS as e:
        for line in str(e).splitlines():
            print(f'error: {line}', file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f'error: {e}. {getattr(e, "advice", "")}'.rstrip(), file=sys.stderr, flush=True)
        sys.exit(1)
    except preemption.TrainingInterrupted as e:
        print0(f'{e}; rerun the same command to continue')
        sys.exit(e.exit_code)
    print0(f'Total time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    distributed.cleanup()
