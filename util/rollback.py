"""--on_nonfinite rollback: a run that meets a NaN or infinite loss or gradient goes back to a snapshot kept in host
memory, replays to the bad optimizer step, skips that step's batch and goes on, instead of stopping.

- Snapshots: at the start of each epoch's pass and after every --snapshot_every optimizer steps, each rank copies
  what a step changes into host memory (buffers kept from one snapshot to the next, pinned where the device layer
  pins): its parameters and buffers (its own shards under --fsdp), its optimizer and loss-scaler state, its RNG
  streams, the epoch's running sums and the data position. A snapshot first checks the steps since the last
  logging window (the window's one all-reduce), so a bad state is never kept.
- Detection costs healthy steps no host synchronisation: the losses are checked where they always are, at each
  logging window's all-reduce (util/progress.py), which then also carries a per-step 'gradients not finite' flag
  computed on the device. With an fp16 loss scaler the gradients are its own business: its overflow skips are
  not rollbacks. Every rank judges the reduced values, so all agree on the first bad step.
- A rollback: every rank restores its snapshot; the bad optimizer step (its --accum_iter iterations) joins the
  run's skipped steps, which every checkpoint holds, and checkpoint-last.pth is rewritten at the snapshot with
  them, so a run killed afterwards and resumed skips the same batch (a fault that would not recur included); the
  epoch goes on from the snapshot, replaying up to the bad step and passing over it. One console line and one
  log.txt line say which step, which samples (file paths, or SHARD:KEY) and the seconds it cost.
- After --max_rollbacks skipped steps in a run, the next fault stops it as --on_nonfinite stop does.
"""
import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from util import distributed
from util.checkpointer import Checkpointer, ResumeState
from util.distributed import print0
from util.logs import append_log_line
from util.progress import EpochProgress, NonFiniteLossError, NonFiniteStep, local_part
from util.rng import rng_state, set_rng_state

SNAPSHOT_EVERY = 200  # optimizer steps, the --snapshot_every default
MAX_ROLLBACKS = 5  # the --max_rollbacks default
SAMPLES_SHOWN = 3  # on the console; log.txt lists them all


@dataclass
class Position:
    """Where a snapshot was taken: the epoch, its next iteration, this rank's running sums of the epoch so far,
    the epoch's size in images (for the learning rate's position), and when (time.perf_counter()); the epoch's
    clock, images so far and data-loading time, which a new pass continues."""
    epoch: int
    iteration: int
    sums: Dict[str, list]
    epoch_images: int
    taken_at: float
    epoch_start: float = 0.0
    images_done: int = 0
    data_time: float = 0.0


class HostCopies:
    """Host-memory copies of (device) tensors, by key, in buffers reused from one snapshot to the next. Copies
    go in the device's stream order, so they need no synchronisation of their own."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: Dict[str, torch.Tensor] = {}

    def keep(self, key: str, tensor: torch.Tensor):
        tensor = local_part(tensor).detach()
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = self.pin and tensor.device.type != 'cpu'
            buffer = self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        buffer.copy_(tensor, non_blocking=True)

    def put_back(self, key: str, tensor: torch.Tensor):
        local_part(tensor).copy_(self.buffers[key], non_blocking=True)

    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class Snapshot:
    """What an optimizer step changes on this rank, kept in host memory: parameters and buffers, optimizer state
    (tensors copied in place, so the optimizer keeps its references, DTensors under --fsdp included), the loss
    scaler's state and the RNG streams; `position` says where."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_scaler, runtime):
        self.model, self.optimizer, self.loss_scaler, self.runtime = model, optimizer, loss_scaler, runtime
        self.copies = HostCopies(runtime.pin_memory_supported)
        self.optimizer_values: List[dict] = []  # per parameter: its state's keys, non-tensor values copied
        self.scaler_state: dict = {}
        self.rng: dict = {}
        self.position: Optional[Position] = None

    def model_tensors(self) -> Iterator:
        """The trained parameters (a frozen one, a linear probe's encoder, cannot change) and the buffers."""
        yield from (('parameter.' + name, p) for name, p in self.model.named_parameters() if p.requires_grad)
        yield from (('buffer.' + name, b) for name, b in self.model.named_buffers())

    def optimized_parameters(self) -> List[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group['params']]

    @torch.no_grad()
    def take(self, position: Position):
        for key, tensor in self.model_tensors():
            self.copies.keep(key, tensor)
        self.optimizer_values = []
        for i, parameter in enumerate(self.optimized_parameters()):
            kept = {}
            for name, value in self.optimizer.state.get(parameter, {}).items():
                if torch.is_tensor(value):
                    self.copies.keep(f'optimizer.{i}.{name}', value)
                    kept[name] = None
                else:
                    kept[name] = copy.deepcopy(value)
            self.optimizer_values.append(kept)
        self.scaler_state = self.loss_scaler.state_dict()
        self.rng = rng_state(self.runtime)
        self.position = position

    @torch.no_grad()
    def restore(self):
        for key, tensor in self.model_tensors():
            self.copies.put_back(key, tensor)
        for i, parameter in enumerate(self.optimized_parameters()):
            kept = self.optimizer_values[i]
            if not kept:  # no step had touched it yet: the optimizer initialises it again
                self.optimizer.state.pop(parameter, None)
                continue
            state = self.optimizer.state[parameter]
            for name, value in kept.items():
                if value is None:
                    self.copies.put_back(f'optimizer.{i}.{name}', state[name])
                else:
                    state[name] = copy.deepcopy(value)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_scaler.load_state_dict(self.scaler_state)
        set_rng_state(self.rng, self.runtime)


class Rollbacks:
    """The run's --on_nonfinite policy and its skipped optimizer steps (`records`, one dict each, kept in every
    checkpoint and honoured whatever the policy of a resumed run). With `stop` (the default) nothing is copied or
    checked beyond the loss: a fault raises NonFiniteLossError as it always did."""

    def __init__(self, args, checkpointer: Checkpointer, data_loader, start: ResumeState):
        self.enabled = args.on_nonfinite == 'rollback'
        self.every = (args.snapshot_every or SNAPSHOT_EVERY) * args.accum_iter  # in iterations
        self.max_rollbacks = args.max_rollbacks or MAX_ROLLBACKS
        self.accum_iter = args.accum_iter
        self.checkpointer, self.data_loader = checkpointer, data_loader
        self.records: List[dict] = list(start.extra.get('rollbacks') or [])
        if self.records:
            checkpointer.extra_state['rollbacks'] = self.records
            print0(f'Skipping the {len(self.records)} optimizer step{"s" if len(self.records) > 1 else ""} that '
                   f'rollbacks skipped before (epoch:iteration {steps_text(self.records)}; --max_rollbacks counts '
                   'them too)')
        self.snapshot = None
        if self.enabled:
            self.snapshot = Snapshot(checkpointer.model, checkpointer.optimizer, checkpointer.loss_scaler,
                                     checkpointer.runtime)
        # a fault is the loss scaler's when it scales (fp16): its overflow skips are not rollbacks
        self.checks_gradients = self.enabled and not checkpointer.loss_scaler.scales_loss
        self.output_dir = args.output_dir if distributed.is_main_process() else ''
        if self.output_dir:  # truncate_log dropped the lines of the epochs the run redoes: theirs among them
            for record in self.records:
                if record['epoch'] >= start.epoch:
                    append_log_line(self.output_dir, log_entry(record))

    def skipped_in(self, epoch: int) -> frozenset:
        """The iterations of `epoch` to pass over, in this run's division of the epoch: a record holds its images'
        positions in the epoch's order (iteration x images per iteration over all ranks), which for image folders a
        resume at another division of the same effective batch maps onto the same whole optimizer steps
        (util/checkpointer.py: resumed_iteration; shards and Parquet continue an epoch only in its division)."""
        per_iteration = self.data_loader.batch_size * distributed.get_world_size()
        return frozenset(i for r in self.records if r['epoch'] == epoch
                         for i in range(r['images'][0] // per_iteration, -(-r['images'][1] // per_iteration)))

    def attempts(self, epoch: int, start: ResumeState) -> Iterator['Attempt']:
        """The passes over `epoch`: one, unless a fault is rolled back; then another from the snapshot, and so
        on. The caller returns from inside its pass."""
        attempt = Attempt(self, epoch, start, None)
        while True:
            yield attempt
            if attempt.fault is None:
                raise RuntimeError('a pass over the epoch ended without a result or a rollback')
            attempt = Attempt(self, epoch, attempt.next_start, attempt)

    def snapshot_if_due(self, epoch: int, next_iteration: int, progress: EpochProgress):
        """After an optimizer step: every --snapshot_every steps of the epoch, check the steps since the last
        window, then snapshot."""
        if self.enabled and next_iteration % self.every == 0 and next_iteration < progress.iters_per_epoch:
            progress.flush(show=False)
            self.take(epoch, next_iteration, progress)

    def take(self, epoch: int, next_iteration: int, progress: EpochProgress):
        self.snapshot.take(Position(epoch, next_iteration, progress.own_sums(), progress.images_per_epoch,
                                    time.perf_counter(), progress.epoch_start, progress.epoch_images,
                                    progress.data_time))

    def roll_back(self, fault: NonFiniteStep) -> ResumeState:
        """Every rank: record the bad optimizer step, restore the snapshot, and return where the epoch goes on.
        NonFiniteLossError when --max_rollbacks steps were skipped already."""
        first = fault.iteration - fault.iteration % self.accum_iter
        iterations = [first, first + self.accum_iter - 1]
        if len(self.records) >= self.max_rollbacks:
            raise self.exhausted(fault)
        per_iteration = self.data_loader.batch_size * distributed.get_world_size()
        position = self.snapshot.position
        self.snapshot.restore()
        self.records.append({'epoch': fault.epoch, 'iteration': fault.iteration, 'iterations': iterations,
                             'images': [first * per_iteration, (iterations[1] + 1) * per_iteration],
                             'cause': fault.cause,
                             'value': fault.value, 'snapshot_iteration': position.iteration,
                             'samples': self.samples_of(iterations)})
        self.checkpointer.extra_state['rollbacks'] = self.records
        meters = [position.sums] * distributed.get_world_size() if position.iteration else None
        return ResumeState(position.epoch, position.iteration, meters=meters, epoch_images=position.epoch_images)

    def settle(self, progress: EpochProgress):
        """After a rollback, on the new pass: the console and log.txt lines, and checkpoint-last.pth at the snapshot
        with the skipped step (not for a snapshot at the very start of training: no weights to keep)."""
        position, record = self.snapshot.position, self.records[-1]
        # lost: all the work since the snapshot (the replay redoes the part before the bad step) and the restore
        record['seconds'] = round(time.perf_counter() - position.taken_at, 3)
        print0(describe(record, len(self.records), self.max_rollbacks))
        if self.output_dir:
            append_log_line(self.output_dir, log_entry(record))
        if position.iteration:
            self.checkpointer.save(position.epoch, position.iteration, numbered=False, progress=progress)
        elif position.epoch > 0:
            self.checkpointer.save(position.epoch - 1, numbered=False)
        position.taken_at = time.perf_counter()  # from here the state is the snapshot's again

    def check_steps_left(self, progress: EpochProgress):
        """NonFiniteLossError when rollbacks skipped every step of the epoch still to train: no step would be taken,
        and the epoch would 'finish' with no loss."""
        left = set(range(progress.start_iter, progress.iters_per_epoch))
        if left and left <= progress.skipped:
            raise NonFiniteLossError(progress.epoch, progress.start_iter, 'all skipped',
                                     self.checkpointer.describe_last_good(), what='The steps left',
                                     where=f'in epoch {progress.epoch}',
                                     detail=f' by {len(self.records)} rollbacks (epoch:iteration '
                                            f'{steps_text(self.records)}): the fault is not in single batches')

    def samples_of(self, iterations: List[int]) -> List[str]:
        """The samples of those iterations on every rank, rank by rank: file paths, or SHARD:KEY (collective)."""
        sampler, batch_size = self.data_loader.sampler, self.data_loader.batch_size
        share = sampler.epoch_share()[iterations[0] * batch_size:(iterations[1] + 1) * batch_size]
        names = [self.data_loader.dataset.samples[i][0] for i in share]
        gathered = distributed.all_gather_bytes('\n'.join(names).encode())
        return [name for blob in gathered for name in blob.decode().split('\n') if name]

    def exhausted(self, fault: NonFiniteStep) -> NonFiniteLossError:
        count = len(self.records)
        detail = (f', again after {count} rollback{"s" if count > 1 else ""} in this run (--max_rollbacks '
                  f'{self.max_rollbacks}; steps skipped at epoch:iteration {steps_text(self.records)}): the fault is '
                  'not in single batches')
        return NonFiniteLossError(fault.epoch, fault.iteration, fault.value, self.checkpointer.describe_last_good(),
                                  what='Loss' if fault.cause == 'loss' else 'Gradients', detail=detail)


class Attempt:
    """One pass over an epoch: `start` is where it begins (the run's start, or a snapshot after a rollback)."""

    def __init__(self, rollbacks: Rollbacks, epoch: int, start: ResumeState, previous: Optional['Attempt']):
        self.rollbacks, self.epoch, self.start = rollbacks, epoch, start
        self.after_rollback = previous is not None
        self.replay_to = previous.fault.iteration if previous is not None else 0
        self.stop_agreed = previous.stop_agreed if previous is not None else False  # a stop signal the ranks knew of
        self.fault: Optional[NonFiniteStep] = None
        self.next_start: Optional[ResumeState] = None

    def after_step(self, next_iteration: int, progress: EpochProgress):
        """After an optimizer step: checkpoint-last.pth every --save_every_iters iterations, a snapshot every
        --snapshot_every steps, and a stop signal agreed on by every rank saves and raises TrainingInterrupted."""
        checkpointer = self.rollbacks.checkpointer
        checkpointer.save_if_due(self.epoch, next_iteration, progress)
        self.rollbacks.snapshot_if_due(self.epoch, next_iteration, progress)
        if progress.stops_before(next_iteration):
            raise checkpointer.interrupt(self.epoch, next_iteration, progress)

    @contextlib.contextmanager
    def watching(self, progress: EpochProgress):
        """Around the pass: sets what `progress` skips and checks, snapshots its start (or, after a rollback,
        saves and reports it), and turns a fault into the next attempt's start."""
        rollbacks = self.rollbacks
        gradients_of = None
        if rollbacks.checks_gradients:
            gradients_of = [p for p in rollbacks.checkpointer.model.parameters() if p.requires_grad]
        progress.watch(rollbacks.skipped_in(self.epoch), rollbacks.enabled, gradients_of,
                       trackers_from=self.replay_to)
        rollbacks.check_steps_left(progress)
        if self.after_rollback:
            position = rollbacks.snapshot.position
            progress.carry_over(position.epoch_start, position.images_done, position.data_time)
            progress.agree_on_stop(self.stop_agreed)
            rollbacks.settle(progress)
        elif rollbacks.enabled:
            rollbacks.take(self.epoch, progress.start_iter, progress)
        try:
            yield
        except NonFiniteStep as fault:
            self.fault, self.stop_agreed = fault, progress.stop_agreed
            self.next_start = rollbacks.roll_back(fault)


def describe(record: dict, count: int, max_rollbacks: int) -> str:
    """The console line of a rollback."""
    first, last = record['iterations']
    skipped = f'iteration {first}' if first == last else f'iterations {first}-{last}'
    samples = record['samples']
    shown = ', '.join(samples[:SAMPLES_SHOWN]) + (', ...' if len(samples) > SAMPLES_SHOWN else '')
    replay = ', replaying to the step and' if record['snapshot_iteration'] < first else ' and'
    return (f"Rollback {count} of at most {max_rollbacks}: {record['cause']} {record['value']} at epoch "
            f"{record['epoch']}, iteration {record['iteration']}; back to the snapshot of iteration "
            f"{record['snapshot_iteration']}{replay} skipping {skipped} ({len(samples)} samples: {shown}; all in "
            f"log.txt); {record['seconds']:.1f} s lost")


def steps_text(records: List[dict]) -> str:
    return ', '.join(f"{r['epoch']}:{r['iterations'][0]}" for r in records)


def log_entry(record: dict) -> dict:
    return {'epoch': record['epoch'], 'rollback': record}
