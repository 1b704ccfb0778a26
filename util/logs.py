"""What a training run reports, on rank 0: a short header on the console, every setting in run_details.txt, and
each epoch a line of log.txt (one JSON object per epoch, the official format) and its numbers to the trackers of
--report_to (util/trackers.py; TensorBoard by default)."""
import json
import os
import sys
import time
from typing import List, Optional

import torch

from util.pixels import as_size, normalization_of, size_text
from util import distributed
from util.distributed import print0
from util.lr_sched import LrSchedule, effective_batch
from util.optim import describe_optimizer
from util.trackers import Trackers, resume_step

DETAILS = 'run_details.txt'


def plural(n: int, noun: str) -> str:
    return f'{n} {noun}' + ('' if n == 1 else 's')


def format_count(n: int) -> str:
    """5470000 -> '5.47M', 1540 -> '1.54K', 960 -> '960'."""
    for unit, size in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= size:
            return f'{n / size:.3g}{unit}'
    return str(n)


def run_header(title: str, args, model: torch.nn.Module, optimizer, lr_schedule: LrSchedule, runtime, world_size: int,
               start, data: str, recipe: str, trackers: Trackers) -> List[str]:
    """The few lines a run prints before its first progress line: what trains, on what, with which optimizer and
    how fast it learns, where it starts and where its outputs go. The sizes, the optimizer and the learning rate
    are read off what the run built."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    eff_batch = effective_batch(args, world_size)
    lr = lr_schedule.lr
    processes = f'{world_size} process{"es" if world_size > 1 else ""}'
    where = f'epoch {start.epoch}'
    if start.path:
        where = f'resuming {start.path} at epoch {start.epoch}' + (f', iteration {start.iteration}'
                                                                   if start.iteration else '')
    outputs = (f'{args.output_dir} (checkpoints, log.txt); settings, model and optimizer in '
               f'{os.path.join(args.output_dir, DETAILS)}' if args.output_dir else 'nothing is saved')
    normalization = normalization_of(args)
    images = '' if normalization.imagenet_rgb else f', {normalization.describe()}'
    return [f'{title}: {args.model}, {size_text(as_size(*model.patch_embed.img_size))}{images}, patch '
            f'{model.patch_embed.patch_size[0]}, {format_count(total)} parameters ({format_count(trained)} trained)',
            f'data: {data}',
            f'effective batch size: {eff_batch} ({args.batch_size} per process x {args.accum_iter} accumulated x '
            f'{processes}); base lr: {lr * 256 / eff_batch:.2e}; actual lr: {lr:.2e}',
            f'schedule: {plural(lr_schedule.epochs, "epoch")}, {lr_schedule.warmup_epochs} warm-up, cosine to '
            f'{lr_schedule.min_lr:g}; {describe_optimizer(optimizer)}; {recipe}',
            f'start: {where}',
            f'device: {runtime.describe()}, {processes}',
            f'output: {outputs}; trackers: {trackers.describe(args)}']


def run_details(args, model: torch.nn.Module, optimizer) -> str:
    """Everything about the run that a header leaves out: the command, versions, every flag, the model and the
    optimizer (output_dir/run_details.txt, and the console with --verbose)."""
    import timm
    flags = '\n'.join(f'  {name}: {value!r}' for name, value in sorted(vars(args).items()))
    return (f'=== {time.strftime("%Y-%m-%d %H:%M:%S")}\ncommand: {" ".join(sys.argv)}\n'
            f'torch {torch.__version__}, timm {timm.__version__}\nargs:\n{flags}\nmodel:\n{model}\n'
            f'optimizer:\n{optimizer}\n')


class RunLog:
    """What a training run reports. On creation: the header on the console (rank 0; see run_header) and the
    details (run_details) appended to output_dir/run_details.txt, and printed too with --verbose; TensorBoard opened
    among the run's `trackers` (util/trackers.py, started before the output folder was prepared), which the engines
    send training-step scalars to (`trackers`). Then each epoch: a line of log.txt (one JSON object per epoch) and
    its numbers to every tracker. `constant` values go into every log line."""

    def __init__(self, args, model: torch.nn.Module, optimizer, lr_schedule: LrSchedule, runtime, world_size: int,
                 start, title: str, data: str, recipe: str, trackers: Trackers, **constant):
        self.output_dir = args.output_dir if distributed.is_main_process() else ''
        self.constant = constant
        # TensorBoard purges what an earlier run in the same folder wrote from the run's first step on (a resumed
        # one ran past its last checkpoint; one killed before its first starts over): each step is shown once
        trackers.open_tensorboard(args, resume_step(start, args, world_size))
        self.trackers = trackers
        for line in run_header(title, args, model, optimizer, lr_schedule, runtime, world_size, start, data, recipe,
                               trackers):
            print0(line)
        details = run_details(args, model, optimizer)
        if args.verbose:
            print0(details)
        if self.output_dir:
            with open(os.path.join(self.output_dir, DETAILS), 'a', encoding='utf-8') as f:
                f.write(details)

    def write(self, epoch: int, train: dict, test: Optional[dict] = None, **values):
        """Append one epoch's line: train_* and test_* stats, the epoch and `values`; every tracker gets its numbers
        first. Written before the epoch's checkpoint (see truncate_log)."""
        stats = {**{f'train_{k}': v for k, v in train.items()}, **{f'test_{k}': v for k, v in (test or {}).items()},
                 'epoch': epoch, **self.constant, **values}
        self.trackers.log_epoch(epoch, stats)
        self.trackers.flush()
        if self.output_dir:
            append_log_line(self.output_dir, stats)

    def finish(self):
        """After the last epoch's checkpoint: the tracker runs end as finished (here, not at the process' exit: the
        demo runs three trainings in one process)."""
        self.trackers.close(finished=True)


def append_log_line(output_dir: str, entry: dict):
    """One JSON line onto output_dir/log.txt: an epoch's stats, or an event within an epoch (a rollback), which
    carries its 'epoch' too, so a resumed run's truncate_log treats it as that epoch's."""
    with open(os.path.join(output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
        f.write(json.dumps(entry) + '\n')


def truncate_log(output_dir: str, start_epoch: int):
    """Drop log.txt entries of epochs >= start_epoch: a resumed run redoes them, so none is lost or repeated
    (the log is written before each epoch's checkpoint). A line torn by a kill or a full disk is dropped too."""
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:
        text = f.read()
    kept = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = parse_log_line(line)
        if entry is None and line.strip():
            print(f'{path}: line {number} is not a JSON log entry (a torn write?); dropped: {line.strip()[:80]}')
        elif entry is not None and entry.get('epoch', -1) < start_epoch:
            kept.append(line + '\n')
    if ''.join(kept) == text:
        return
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    os.replace(tmp, path)


def parse_log_line(line: str) -> Optional[dict]:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None

