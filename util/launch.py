"""Start-up and tear-down shared by the main_* scripts: device and distributed init, seeding, model placement
(device, gradient checkpointing, torch.compile, DDP), and the mapping of failures to one line and an exit code.
"""
import datetime
import signal
import sys
import time

import torch

from util import distributed, preemption
from util import fsdp as util_fsdp
from util.bad_images import BadImageBudgetError
from util.checkpoint_files import CheckpointError
from util.checks import UsageError
from util.classes import ClassListError
from util.arrays import ChannelMismatch
from util.datasets import DataError
from util.device import DeviceError, Runtime, setup_runtime
from util.distributed import print0
from util.progress import NonFiniteLossError
from util.trackers import TrackerError, failures_end_runs
from util.rng import seed_everything

# failures that are the user's to fix: one line on stderr, exit code 2
USER_ERRORS = (UsageError, DeviceError, CheckpointError, DataError, ClassListError, BadImageBudgetError,
               ChannelMismatch, TrackerError)


def start(args, training: bool) -> Runtime:
    """Resolve the device, join the process group, seed (seed + rank), install the stop-signal handlers (with
    `training`, a first Ctrl-C stops at the next optimizer step and saves)."""
    launch = distributed.detect_launch(dist_on_itp=args.dist_on_itp)
    runtime = setup_runtime(args.device, args.amp, local_rank=launch.local_rank)
    distributed.init_distributed(launch, runtime.dist_backend, runtime.device, args.dist_url, args.dist_timeout)
    seed_everything(args.seed + launch.rank)
    preemption.install_handlers(training)
    preemption.note_dropped_signals()
    return runtime


def place_model(model: torch.nn.Module, runtime: Runtime, args, fsdp: bool):
    """Move to the device and wrap for training: DDP over several processes, or with `fsdp` (--fsdp) sharded
    over them (util/fsdp.py). Returns (model to call, the module whose state is saved)."""
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(runtime.device)
    if fsdp:
        model = util_fsdp.shard(model, runtime, distributed.get_world_size())
    model_to_save = model
    if args.compile:
        model = compile_model(model, runtime)
    if distributed.get_world_size() > 1 and not fsdp:
        device_ids = [runtime.index] if runtime.index is not None else None
        # every trainable parameter is used in each step, so no unused-parameter search (it costs every step)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, model_to_save


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


def raised_in_worker(message: str) -> str:
    """The error's own message when a DataLoader worker raised it (the loader re-raises it in the main process
    wrapped in 'Caught X in DataLoader worker process N.' and the worker's traceback, whose last line holds it)."""
    if not message.startswith('Caught ') or 'Original Traceback' not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(': ', 1)[1] if ': ' in last else last


def run_main(main_fn, args):
    """Call main_fn(args); turn expected failures into one line on stderr and an exit code."""
    start_time = time.time()
    try:
        with failures_end_runs():
            main_fn(args)
    except USER_ERRORS as e:
        for line in raised_in_worker(str(e)).splitlines():
            print(f'error: {line}', file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    except preemption.TrainingInterrupted as e:
        print0(f'{e}; rerun the same command to continue')
        sys.exit(e.exit_code)
    except preemption.EvaluationInterrupted as e:  # an evaluation-only run: nothing to save
        print0(f'{e}; nothing was saved (an evaluation has no state to keep): rerun the command to evaluate')
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it
        print('Interrupted (Ctrl-C): stopped at once; a training run continues from its last checkpoint when the '
              'same command is run again', file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    print0(f'Total time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    distributed.cleanup()
