"""One epoch of fine-tuning or linear probing, and evaluation (top-1 / top-5 accuracy and loss)."""
from typing import Callable, Dict, Optional

import torch

from util import distributed
from util.bad_images import BadImageBudget, BadImageBudgetError
from util.checkpointer import Checkpointer, ResumeState
from util.distributed import grad_sync, print0
from util.metrics import topk_hits
from util.datasets import LEFT_OUT
from util.lr_sched import LrSchedule
from util.progress import begin_epoch, end_epoch, evaluation_batches
from util.rollback import Rollbacks
from util.transforms import to_device_normalized


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader,
                    optimizer: torch.optim.Optimizer,
                    lr_schedule: LrSchedule, runtime, epoch: int, loss_scaler, args, log_writer,
                    checkpointer: Checkpointer, start: ResumeState, rollbacks: Rollbacks,
                    mixup_fn: Optional[Callable] = None, clip_grad: Optional[float] = None) -> dict:
    trained = start.training_done(epoch)
    if trained is not None:  # stopped during this epoch's evaluation: train no further
        return trained
    for attempt in rollbacks.attempts(epoch, start):  # one pass; --on_nonfinite rollback: again from a snapshot
        progress = begin_epoch(model, optimizer, data_loader, runtime, epoch, args, log_writer, checkpointer,
                               attempt.start, 'loss')
        with attempt.watching(progress):
            for it, is_update, (samples, targets) in progress.iterate(data_loader, args.accum_iter):
                if it % args.accum_iter == 0:  # per-iteration (not per-epoch) LR schedule
                    lr_schedule.apply(optimizer, progress.epoch_fraction(it) + epoch)
                samples = to_device_normalized(samples, runtime.device)
                targets = targets.to(runtime.device, non_blocking=True)
                if mixup_fn is not None:
                    samples, targets = mixup_fn(samples, targets)

                with grad_sync(model, is_update):  # accumulation micro-steps skip the gradient all-reduce
                    with runtime.autocast():
                        loss = criterion(model(samples), targets)
                    loss_scaler(loss / args.accum_iter, optimizer, clip_grad=clip_grad,
                                parameters=model.parameters(), update_grad=is_update)

                # checked every --print_freq steps (one host sync): NonFiniteLossError names the step, or a
                # rollback goes back to the snapshot; before zero_grad, as it may check the gradients too
                progress.update(it, loss, max(group['lr'] for group in optimizer.param_groups), samples.shape[0],
                                is_update)
                if is_update:
                    optimizer.zero_grad()
                    attempt.after_step(it + 1, progress)  # saves, snapshots, stops, when due
            return end_epoch(progress)  # holds the unreadable images to --max_bad_images


@torch.no_grad()
def evaluate(data_loader, model: torch.nn.Module, runtime, args, output_dir: Optional[str] = None) -> dict:
    """Top-1 / top-5 accuracy and the mean cross-entropy over the images, as named values (a new metric is one entry
    in metric_sums). From args: --dist_eval, --max_bad_images, --print_freq; the list of unreadable images is written
    to `output_dir` (default --output_dir; '' for none, as --eval does). With --dist_eval each rank
    holds a disjoint share and the sums are added over ranks, so every image counts exactly once and the figures
    equal one process's (up to float rounding of the sums); else each rank evaluates every image itself.

    An image that cannot be read is left out of every count (the printed count says how many), never replaced
    by another; more than --max_bad_images of them stop the evaluation when they are met (BadImageBudgetError,
    the list in output_dir/bad_images.txt). A stop signal ends it on every rank (EvaluationInterrupted).

    The official code reports the mean of per-batch losses; this is the mean per image, the same number when
    every batch is full (ImageNet val at batch 16) and independent of the batch size and process count."""
    criterion = torch.nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    dataset = data_loader.dataset
    sharded, print_freq = args.dist_eval, args.print_freq
    output_dir = args.output_dir if output_dir is None else output_dir
    budget = BadImageBudget(dataset.bad_images, len(dataset), args.max_bad_images, output_dir)
    sums = None  # {metric name: its sum over this rank's images so far, on the device}
    num_batches = len(data_loader)
    for i, (images, target) in evaluation_batches(data_loader, budget, print_freq):
        readable = target != LEFT_OUT
        images, target = images[readable], target[readable]
        if target.numel():
            batch = batch_sums(model, images, target, criterion, runtime)
            sums = batch if sums is None else {name: sums[name] + value for name, value in batch.items()}
        if (i + 1) % print_freq == 0:
            so_far = 100 * sums['acc1'].item() / sums['images'].item() if sums is not None else 0.0
            print0(f'Test:  [{i + 1}/{num_batches}]  acc1 {so_far:.3f} (so far)')
    if sums is None:  # this rank read no image: zeros under the same names, so that every rank takes part alike
        nothing = torch.zeros(0, 1, device=runtime.device)
        sums = metric_sums(nothing, torch.zeros(0, dtype=torch.long, device=runtime.device), criterion, runtime)
    totals = reduce_sums(sums, sharded)
    num_images = totals.pop('images')
    if not num_images:
        raise BadImageBudgetError(f'{dataset.root}: none of its {len(dataset)} images could be read')
    stats = {name: SCALE.get(name, 1) * total / num_images for name, total in totals.items()}
    stats.update(num_images=int(num_images), left_out=len(dataset.bad_images))
    print0('* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(**stats))
    count = stats['left_out']
    left_out = f' ({count} unreadable image{"s" if count > 1 else ""} left out)' if count else ''
    print0(f"Accuracy of the network on the {stats['num_images']} test images: {stats['acc1']:.3f}%{left_out}")
    return stats


# evaluation metrics are sums over images, divided by the image count at the end; these are then percentages
SCALE = {'acc1': 100, 'acc5': 100}


def batch_sums(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor, criterion,
               runtime) -> Dict[str, torch.Tensor]:
    """One batch's sums, on the device (no host sync): metric_sums of the model's output. A new metric is one more
    entry there (a per-image sum; SCALE if it is a percentage)."""
    images = to_device_normalized(images, runtime.device)
    target = target.to(runtime.device, non_blocking=True)
    with runtime.autocast():
        output = model(images)
    return metric_sums(output, target, criterion, runtime)


def metric_sums(output: torch.Tensor, target: torch.Tensor, criterion, runtime) -> Dict[str, torch.Tensor]:
    """The sums of `output` [N, classes] against `target` [N]: the summed loss, top-1 and top-5 hits, the images."""
    with runtime.autocast():
        loss_sum = criterion(output, target)
    hits1, hits5 = topk_hits(output, target, (1, 5))
    return {'loss': loss_sum.to(runtime.sum_dtype), 'acc1': hits1.to(runtime.sum_dtype),
            'acc5': hits5.to(runtime.sum_dtype),
            'images': torch.tensor(output.shape[0], dtype=runtime.sum_dtype, device=output.device)}


def reduce_sums(sums: Dict[str, torch.Tensor], sharded: bool) -> Dict[str, float]:
    """The sums as floats, added over the ranks with `sharded` (one all-reduce of them stacked)."""
    names = list(sums)
    stacked = torch.stack([sums[name] for name in names])
    if sharded:
        stacked = distributed.all_reduce_sum(stacked)
    return dict(zip(names, stacked.tolist()))
