"""One epoch of MAE pretraining: forward, loss, backward, step, log."""
from typing import Optional

import torch

from util import lr_sched
from util.datasets import normalize_batch
from util.distributed import grad_sync
from util.progress import start_epoch_progress


def train_one_epoch(model: torch.nn.Module, data_loader, optimizer: torch.optim.Optimizer, runtime, epoch: int,
                    loss_scaler, log_writer=None, args=None, start_iter: int = 0,
                    checkpointer=None, iters_per_epoch: Optional[int] = None) -> dict:
    model.train(True)
    accum_iter = args.accum_iter
    iters_per_epoch = iters_per_epoch or len(data_loader)
    progress = start_epoch_progress(runtime, epoch, iters_per_epoch, args, start_iter, log_writer, checkpointer)

    optimizer.zero_grad()
    for it, (samples, _) in progress.iterate(data_loader):
        if it % accum_iter == 0:  # per-iteration (not per-epoch) LR schedule
            lr_sched.adjust_learning_rate(optimizer, it / iters_per_epoch + epoch, args)
        samples = normalize_batch(samples, runtime.device)
        is_update = (it + 1) % accum_iter == 0

        with grad_sync(model, is_update):  # accumulation micro-steps skip the gradient all-reduce
            with runtime.autocast():
                loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
            loss_scaler(loss / accum_iter, optimizer, parameters=model.parameters(), update_grad=is_update)
        if is_update:
            optimizer.zero_grad()

        progress.update(it, loss, optimizer.param_groups[0]['lr'], samples.shape[0], write_tb=is_update)
        if is_update and checkpointer is not None:
            checkpointer.after_step(epoch, it + 1, progress)
    return progress.finish()
