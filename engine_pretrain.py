"""One epoch of MAE pretraining: forward, loss, backward, step, log."""
import torch

from util.checkpointer import Checkpointer, ResumeState
from util.distributed import grad_sync
from util.lr_sched import LrSchedule
from util.pixels import normalization_of
from util.progress import begin_epoch, end_epoch
from util.rollback import Rollbacks
from util.transforms import to_device_normalized


def train_one_epoch(model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer,
                    lr_schedule: LrSchedule, runtime, epoch: int,
                    loss_scaler, args, log_writer, checkpointer: Checkpointer, start: ResumeState,
                    rollbacks: Rollbacks) -> dict:
    trained = start.training_done(epoch)
    if trained is not None:  # stopped during this epoch's evaluation: train no further
        return trained
    normalization = normalization_of(args)
    for attempt in rollbacks.attempts(epoch, start):  # one pass; --on_nonfinite rollback: again from a snapshot
        progress = begin_epoch(model, optimizer, data_loader, runtime, epoch, args, log_writer, checkpointer,
                               attempt.start, 'train_loss')
        with attempt.watching(progress):
            for it, is_update, (samples, _) in progress.iterate(data_loader, args.accum_iter):
                if it % args.accum_iter == 0:  # per-iteration (not per-epoch) LR schedule
                    lr_schedule.apply(optimizer, progress.epoch_fraction(it) + epoch)
                samples = to_device_normalized(samples, runtime.device, normalization)

                with grad_sync(model, is_update):  # accumulation micro-steps skip the gradient all-reduce
                    with runtime.autocast():
                        loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
                    loss_scaler(loss / args.accum_iter, optimizer, parameters=model.parameters(),
                                update_grad=is_update)

                # checked every --print_freq steps (one host sync): NonFiniteLossError names the step, or a
                # rollback goes back to the snapshot; before zero_grad, as it may check the gradients too
                progress.update(it, loss, optimizer.param_groups[0]['lr'], samples.shape[0], is_update)
                if is_update:
                    optimizer.zero_grad()
                    attempt.after_step(it + 1, progress)  # saves, snapshots, stops, when due
            return end_epoch(progress)  # holds the unreadable images to --max_bad_images
