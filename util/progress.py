"""Progress of one training epoch, and the batches of an evaluation. Training losses stay on the device and are
synchronised once per logging window (not every iteration): one all-reduce gives the cross-rank loss for
TensorBoard, the non-finite check, the stop-signal agreement and the unreadable images so far. Logs images/s over
all ranks, data-loading time, ETA and peak device memory. Evaluations agree on stops and unreadable images every
so many batches the same way (evaluation_batches)."""
import datetime
import json
import math
import time
from typing import Optional

import torch

from util import distributed, preemption
from util.distributed import print0
from util.bad_images import BadImageBudget, BadImageBudgetError
from util.datasets import batches_on_every_rank, start_epoch_of
from util.metrics import MetricLogger, SmoothedValue


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients, or the weights about to be saved) became NaN or infinite; the message names
    where (`where` replaces 'at epoch E, iteration I'), what else is known (`detail`: e.g. the rollbacks that ran
    out), the last good checkpoint and what to try."""

    def __init__(self, epoch: int, iteration: int, value, last_good: str, what: str = 'Loss', detail: str = '',
                 where: str = ''):
        self.epoch, self.iteration, self.value = epoch, iteration, value
        verb = 'is' if what == 'Loss' else 'are'
        where = where or f'at epoch {epoch}, iteration {iteration}'
        rerun = ('rerunning with --allow_recipe_change continues from that checkpoint' if last_good.startswith('Last')
                 else 'then rerun: it starts over')
        super().__init__(f'{what} {verb} {value} {where}{detail}, stopping training. '
                         f'{last_good} With fp16, try --amp bf16; else set --clip_grad, or lower --blr ({rerun}).')


class NonFiniteStep(RuntimeError):
    """With --on_nonfinite rollback: the first step of a logging window whose loss (`cause` 'loss') or gradients
    ('gradients') were not finite on some rank. Every rank raises it at the same iteration (the values are the
    all-reduced ones), and util/rollback.py catches it."""

    def __init__(self, epoch: int, iteration: int, value: str, cause: str):
        self.epoch, self.iteration, self.value, self.cause = epoch, iteration, value, cause
        super().__init__(f'{cause} {value} at epoch {epoch}, iteration {iteration}')


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class EpochProgress:
    """Collects per-iteration loss/lr; every `print_freq` iterations prints a line and writes TensorBoard, and
    checks the window's losses: a non-finite one raises NonFiniteLossError naming its iteration. A checkpoint
    also syncs the window first, so no non-finite weights are ever saved."""

    def __init__(self, runtime, epoch: int, iters_per_epoch: int, print_freq: int = 20, start_iter: int = 0,
                 log_writer=None, tb_loss_name: str = 'train_loss',
                 describe_last_good=lambda: '', budget: Optional[BadImageBudget] = None,
                 images_per_iteration: int = 1, images_per_epoch: Optional[int] = None):
        self.runtime = runtime
        # the learning rate's position in the epoch, counted in images (epoch_fraction)
        self.images_per_iteration = images_per_iteration
        self.images_per_epoch = images_per_epoch or iters_per_epoch * images_per_iteration
        self.budget = budget  # --max_bad_images, checked at every window
        self.describe_last_good = describe_last_good
        self.epoch = epoch
        self.iters_per_epoch = iters_per_epoch
        self.print_freq = max(1, print_freq)
        self.start_iter = start_iter
        self.log_writer = log_writer
        self.tb_loss_name = tb_loss_name
        self.header = f'Epoch: [{epoch}]'
        self.meters = MetricLogger()
        self.meters.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
        self.window = []  # (iteration, loss on device, lr, an optimizer step, its gradients' fault flag or None)
        # set by util/rollback.py (watch): optimizer steps to pass over, and the --on_nonfinite rollback checks
        self.skipped: frozenset = frozenset()
        self.rollback = False
        self.gradients_of = None  # the parameters whose gradients each optimizer step checks, or None
        self.trackers_from = 0  # a replay after a rollback does not write the iterations already written
        self.window_due = False  # a window ended (--print_freq) but waits for its optimizer step
        self.world_size = distributed.get_world_size()
        self._stop_agreed = False
        self.epoch_images = 0
        self.data_time = 0.0
        self.runtime.reset_peak_memory_stats()
        self.epoch_start = self.window_start = time.perf_counter()
        self.window_images = 0
        self.window_data_time = 0.0

    def watch(self, skipped: frozenset, rollback: bool, gradients_of: Optional[list], trackers_from: int):
        """What util/rollback.py sets before the pass: the iterations to pass over (the run's skipped optimizer
        steps in this epoch), whether a fault raises NonFiniteStep (rollback) rather than NonFiniteLossError, and
        the parameters whose gradients each optimizer step checks (None: the loss only)."""
        self.skipped, self.rollback = skipped, rollback
        self.gradients_of, self.trackers_from = gradients_of, trackers_from

    def iterate(self, loader, accum_iter: int):
        """Yield (iteration, ends an accumulation cycle, batch), timing how long the loop waits for each batch.
        The optimizer steps on the iterations that end a cycle of `accum_iter`. Skipped iterations (a step a
        rollback passed over) are read from the loader, so the data position moves on, but not yielded."""
        iteration = self.start_iter
        waited_since = time.perf_counter()
        for batch in preemption.iterate(loader):
            wait = time.perf_counter() - waited_since
            self.data_time += wait
            self.window_data_time += wait
            if iteration not in self.skipped:
                yield iteration, (iteration + 1) % accum_iter == 0, batch
            iteration += 1
            waited_since = time.perf_counter()

    def update(self, iteration: int, loss: torch.Tensor, lr: float, batch_size: int, is_update: bool = True):
        """Record an iteration's loss (on the device; checked at the window's end). `is_update`: an optimizer
        step ended here, so TensorBoard gets it and, when watched (--on_nonfinite rollback), its gradients are
        checked, on the device: call it before zero_grad."""
        fault = None
        if is_update and self.gradients_of is not None:
            fault = gradient_fault(self.gradients_of)
        self.window.append((iteration, loss.detach(), lr, is_update, fault))
        self.window_images += batch_size
        self.epoch_images += batch_size
        last = iteration + 1 == self.iters_per_epoch
        self.window_due = self.window_due or (iteration + 1) % self.print_freq == 0
        # watched, a window ends on an optimizer step: a fault found mid-cycle would leave the cycle's gradients
        # (FSDP keeps them apart from .grad) to leak into the replay
        if (self.window_due and (is_update or not self.rollback)) or last:
            self.flush()
            self.window_due = False

    @property
    def stop_agreed(self) -> bool:
        """True once every rank knows a stop signal arrived (single process: as soon as it arrives)."""
        if self.world_size == 1:
            return preemption.stop_requested()
        return self._stop_agreed

    def carry_over(self, epoch_start: float, epoch_images: int, data_time: float):
        """A rollback's new pass continues the epoch's clock and counts from its snapshot: the epoch's time then
        includes what the rollback cost, and its images/s the images it kept."""
        self.epoch_start, self.epoch_images, self.data_time = epoch_start, epoch_images, data_time

    def agree_on_stop(self, agreed: bool):
        """Carry over a stop every rank already agreed on (a rollback's new pass), so it is not waited for again."""
        self._stop_agreed = self._stop_agreed or agreed

    def hold_budget(self, summed_local_counts: Optional[float] = None) -> int:
        """--max_bad_images at a window (the ranks' local counts, summed) or, without them, at the epoch's end (the
        exact count, a collective; returned). Over it, BadImageBudgetError also names the last good checkpoint."""
        try:
            if summed_local_counts is None:
                return self.budget.check()
            self.budget.check_if_over(summed_local_counts)
            return 0
        except BadImageBudgetError as e:
            raise BadImageBudgetError(f'{e}. {self.describe_last_good()}') from None

    def epoch_fraction(self, iteration: int) -> float:
        """How far into the epoch `iteration` starts, for the learning-rate schedule: the official iteration /
        iterations-per-epoch (the same float: the same ratio, rounded once), counted in images, so that a run
        resumed mid-epoch at another division of the same effective batch gives each optimizer step the learning
        rate the stopped run would have given it (images_per_epoch: the stopped run's, for that epoch)."""
        return iteration * self.images_per_iteration / self.images_per_epoch

    def stops_before(self, next_iteration: int) -> bool:
        """Stop the epoch before `next_iteration`: a stop was agreed on and iterations are left. A stop agreed on at
        the epoch's last iteration lets the epoch end (its evaluation stops at once, or its checkpoint is saved
        and the run stops): a mid-epoch checkpoint of a finished epoch would count the padding of the ranks'
        shares among the images taken, which another process count cannot place."""
        return self.stop_agreed and next_iteration < self.iters_per_epoch

    def flush(self, show: bool = True):
        """Synchronise the window: reduce losses across ranks, check them, log, write TensorBoard. `show`: print
        its line (a snapshot checks the window without printing; the next line covers it)."""
        if not self.window:
            return
        count = len(self.window)
        local = torch.stack([loss.float() for _, loss, _, _, _ in self.window])
        checked = [local]
        if self.gradients_of is not None:  # 1 where a step's gradients were not finite on this rank
            checked.append(torch.stack([torch.zeros((), device=local.device) if fault is None else fault.float()
                                        for *_, fault in self.window]))
        bad_images = self.budget.local_count() if self.budget is not None else 0
        flags = torch.tensor([float(preemption.stop_requested()), float(bad_images)], device=local.device)
        reduced = distributed.all_reduce_sum(torch.cat([*checked, flags]))
        self._stop_agreed = self._stop_agreed or reduced[-2].item() > 0
        if self.budget is not None:
            self.hold_budget(reduced[-1].item())  # over --max_bad_images: stop now, not at the epoch's end
        reduced_losses = (reduced[:count] / self.world_size).tolist()
        gradient_faults = reduced[count:-2].tolist() or [0.0] * count
        local_losses = local.tolist()
        self.runtime.synchronize()  # the window's time includes its last backward and step
        for (iteration, _, lr, is_update, _), value, value_all, gradients_bad in zip(
                self.window, local_losses, reduced_losses, gradient_faults):
            self.check_finite(iteration, value, value_all, gradients_bad)
            self.meters.update(loss=value, lr=lr)
            if self.log_writer is not None and is_update and iteration >= self.trackers_from:
                step = int((iteration / self.iters_per_epoch + self.epoch) * 1000)  # epoch_1000x, as official
                self.log_writer.add_scalar(self.tb_loss_name, value_all, step)
                self.log_writer.add_scalar('lr', lr, step)
        if hasattr(self.log_writer, 'end_window'):  # Trackers (a SummaryWriter has no such step)
            self.log_writer.end_window()
        if show:
            self.print_window(self.window[-1][0])
        self.window = []

    def check_finite(self, iteration: int, value: float, value_all: float, gradients_bad: float):
        """NonFiniteLossError for a non-finite loss; watched (--on_nonfinite rollback), NonFiniteStep for a loss
        or gradients not finite on any rank, judged on the reduced values only, so every rank agrees."""
        if self.rollback:
            if not math.isfinite(value_all):
                raise NonFiniteStep(self.epoch, iteration, repr(value_all), 'loss')
            if gradients_bad:
                raise NonFiniteStep(self.epoch, iteration, 'not finite', 'gradients')
        elif not math.isfinite(value) or not math.isfinite(value_all):
            bad = value if not math.isfinite(value) else value_all
            raise NonFiniteLossError(self.epoch, iteration, bad, self.describe_last_good())

    def own_sums(self) -> dict:
        """This rank's running sums of the epoch so far, {meter: [total, count]} (no collective)."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.meters.items()}

    def partial_state(self) -> list:
        """The epoch so far, for a mid-epoch checkpoint: every rank's running sums, [{meter: [total, count]}]
        indexed by rank. A collective: call it on every rank."""
        self.flush()
        gathered = distributed.all_gather_bytes(json.dumps(self.own_sums()).encode())
        return [json.loads(blob.decode()) for blob in gathered]

    def restore(self, per_rank: list):
        """Continue a partial epoch's averages: each rank its own sums. If the world size changed, rank 0
        carries them all, so the epoch-end reduction still gives the uninterrupted run's average."""
        if len(per_rank) == self.world_size:
            mine = per_rank[distributed.get_rank()]
        elif distributed.is_main_process():
            mine = {name: [sum(r[name][0] for r in per_rank), sum(r[name][1] for r in per_rank)]
                    for name in per_rank[0]}
        else:
            mine = {name: [0.0, 0] for name in per_rank[0]}
        for name, (total, count) in sorted(mine.items()):  # every rank gets every meter: reductions must match
            meter = self.meters.meters[name]
            meter.total, meter.count = total, int(count)

    def print_window(self, iteration: int):
        now = time.perf_counter()
        elapsed = now - self.window_start
        images_per_sec = self.window_images * self.world_size / max(elapsed, 1e-9)
        done = iteration + 1 - self.start_iter
        eta = (now - self.epoch_start) / max(done, 1) * (self.iters_per_epoch - iteration - 1)
        width = len(str(self.iters_per_epoch))
        print0(f'{self.header}  [{iteration + 1:>{width}}/{self.iters_per_epoch}]  eta: {format_seconds(eta)}  '
               f'{self.meters}  img/s: {images_per_sec:.1f}  '
               f'data: {self.window_data_time / max(elapsed, 1e-9):.0%}  '
               f'mem: {self.runtime.max_memory_allocated() / 2 ** 30:.2f} GiB')
        self.window_start = now
        self.window_images = 0
        self.window_data_time = 0.0

    def finish(self) -> dict:
        """Flush, average over ranks, print the epoch's summary line; returns the epoch's stats."""
        self.flush()
        self.runtime.synchronize()
        elapsed = time.perf_counter() - self.epoch_start
        local_loss = self.meters.meters['loss'].global_avg if 'loss' in self.meters.meters else float('nan')
        self.meters.synchronize_between_processes()
        stats = self.meters.global_averages()
        if self.world_size > 1:  # each rank's own average: a rank drifting away from the others shows here
            gathered = distributed.all_gather_bytes(repr(local_loss).encode())
            stats['loss_per_rank'] = [float(b.decode()) for b in gathered]
        stats.update(images_per_sec=self.epoch_images * self.world_size / max(elapsed, 1e-9),
                     data_wait_frac=self.data_time / max(elapsed, 1e-9), epoch_time_sec=elapsed,
                     peak_mem_gib=self.runtime.max_memory_allocated() / 2 ** 30)
        print0(f'{self.header} done in {format_seconds(elapsed)}: loss {stats.get("loss", float("nan")):.4f}  '
               f'lr {stats.get("lr", 0):.3g}  {stats["images_per_sec"]:.1f} img/s '
               f'({self.world_size} process{"es" if self.world_size > 1 else ""})  '
               f'data wait {stats["data_wait_frac"]:.0%}  peak mem {stats["peak_mem_gib"]:.2f} GiB')
        return stats


def gradient_fault(parameters: list) -> Optional[torch.Tensor]:
    """On the device, no host sync: True when a gradient of `parameters` holds a NaN or an infinity (under --fsdp,
    in this rank's shards; the window's all-reduce combines the ranks); None when there are no gradients."""
    return any_non_finite([p.grad for p in parameters if p.grad is not None])


def any_non_finite(tensors: list) -> Optional[torch.Tensor]:
    """A 0-dim bool tensor on the device, True when one of `tensors` (this rank's part of each) holds a NaN or an
    infinity; None for no tensors. One fused L2 norm per device and dtype (the max-abs and L1 norms have no fused
    CPU kernel: 10 and 80 times slower there): a norm is finite when every element is, and below float32's range,
    which a tensor holding values near 1e19 leaves, as no trained weight or usable gradient does."""
    parts = [local_part(t) for t in tensors]
    if not parts:
        return None
    norms = torch._foreach_norm(parts)
    return ~torch.stack([norm.float() for norm in norms]).isfinite().all()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds: its shard of an --fsdp DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, 'to_local') else tensor


def begin_epoch(model: torch.nn.Module, optimizer, data_loader, runtime, epoch: int, args, log_writer,
                checkpointer, start, tb_loss_name: str) -> EpochProgress:
    """The start of a training epoch: training mode, gradients cleared, the loader reshuffled for `epoch` with its
    workers reseeded (skipping the iterations a resumed run already did), and the epoch's EpochProgress, which
    continues the running sums saved with a mid-epoch checkpoint. `start` is the run's ResumeState."""
    model.train(True)
    optimizer.zero_grad()
    start_iter = start.iteration_in(epoch)
    start_epoch_of(data_loader, epoch, distributed.get_rank(), args.seed, skip_batches=start_iter)
    iters_per_epoch = start_iter + len(data_loader)  # a resumed epoch's loader holds only what is left
    dataset = data_loader.dataset
    budget = BadImageBudget(dataset.bad_images, len(dataset), args.max_bad_images, args.output_dir)
    progress = EpochProgress(runtime, epoch, iters_per_epoch, args.print_freq, start_iter, log_writer, tb_loss_name,
                             describe_last_good=checkpointer.describe_last_good, budget=budget,
                             images_per_iteration=args.batch_size * distributed.get_world_size(),
                             images_per_epoch=start.epoch_images_in(epoch))
    if start.meters_in(epoch):
        progress.restore(start.meters_in(epoch))
    return progress


def end_epoch(progress: EpochProgress) -> dict:
    """The epoch's stats (averaged over ranks), after holding its unreadable images to --max_bad_images."""
    bad_images = progress.hold_budget()
    return {**progress.finish(), 'bad_images': bad_images}


def evaluation_batches(loader, budget: BadImageBudget, every: int = 50):
    """Yield (index, batch) of an evaluation loader. Every `every` batches, at a batch every rank has (shares differ
    by one batch at most), the ranks agree: on a stop signal, raising EvaluationInterrupted on every rank, and on
    the unreadable images so far, raising BadImageBudgetError once they exceed --max_bad_images; the budget is
    checked once more at the end (collective). Call it on every rank."""
    common = batches_on_every_rank(loader)
    for i, batch in enumerate(preemption.iterate(loader)):
        yield i, batch
        if (i + 1) % every == 0 and i < common:
            flags = torch.tensor([float(preemption.stop_requested()), float(budget.local_count())],
                                 dtype=torch.float64, device=distributed.comm_device())
            stop, bad_images = distributed.all_reduce_sum(flags).tolist()
            if stop:
                raise preemption.EvaluationInterrupted(preemption.received_signal())
            budget.check_if_over(bad_images)
    budget.check()
