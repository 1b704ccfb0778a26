"""One epoch of fine-tuning or linear probing, and evaluation (top-1 / top-5 accuracy and loss)."""
from typing import Optional

import torch

from util import distributed, lr_sched
from util.datasets import normalize_batch
from util.distributed import grad_sync, print0
from util.checkpoint import Checkpointer, resume_training
from util.logs import append_log, make_log_writer
from util.metrics import accuracy
from util.progress import start_epoch_progress
from util.training import EpochLoop, prepare_output_dir, report_bad_images


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader,
                    optimizer: torch.optim.Optimizer, runtime, epoch: int, loss_scaler,
                    max_norm: Optional[float] = None, mixup_fn=None, log_writer=None, args=None,
                    start_iter: int = 0, checkpointer=None, iters_per_epoch: Optional[int] = None) -> dict:
    model.train(True)
    accum_iter = args.accum_iter
    iters_per_epoch = iters_per_epoch or len(data_loader)
    progress = start_epoch_progress(runtime, epoch, iters_per_epoch, args, start_iter, log_writer, checkpointer,
                                    tb_loss_name='loss')

    optimizer.zero_grad()
    for it, (samples, targets) in progress.iterate(data_loader):
        if it % accum_iter == 0:  # per-iteration (not per-epoch) LR schedule
            lr_sched.adjust_learning_rate(optimizer, it / iters_per_epoch + epoch, args)
        samples = normalize_batch(samples, runtime.device)
        targets = targets.to(runtime.device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        is_update = (it + 1) % accum_iter == 0

        with grad_sync(model, is_update):  # accumulation micro-steps skip the gradient all-reduce
            with runtime.autocast():
                outputs = model(samples)
                loss = criterion(outputs, targets)
            loss_scaler(loss / accum_iter, optimizer, clip_grad=max_norm, parameters=model.parameters(),
                        create_graph=False, update_grad=is_update)
        if is_update:
            optimizer.zero_grad()

        max_lr = max(group['lr'] for group in optimizer.param_groups)
        progress.update(it, loss, max_lr, samples.shape[0], write_tb=is_update)
        if is_update and checkpointer is not None:
            checkpointer.after_step(epoch, it + 1, progress)
    return progress.finish()


@torch.no_grad()
def evaluate(data_loader, model: torch.nn.Module, runtime, print_freq: int = 50) -> dict:
    """Top-1 / top-5 accuracy (weighted by images) and the mean of per-batch losses, as the official code
    reports them. Sums stay on the device; the host syncs only to print progress."""
    criterion = torch.nn.CrossEntropyLoss()
    model.eval()
    # [sum of batch losses, number of batches, top-1 hits, top-5 hits, images]
    totals = torch.zeros(5, dtype=torch.float64, device=runtime.device)
    num_batches = len(data_loader)
    for i, (images, target) in enumerate(data_loader):
        images = normalize_batch(images, runtime.device)
        target = target.to(runtime.device, non_blocking=True)
        with runtime.autocast():
            output = model(images)
            loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        n = images.shape[0]
        totals += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=totals.device),
                               acc1.double() * n / 100, acc5.double() * n / 100,
                               torch.tensor(float(n), dtype=torch.float64, device=totals.device)])
        if (i + 1) % print_freq == 0:
            print0(f'Test:  [{i + 1}/{num_batches}]  acc1 {100 * totals[2].item() / totals[4].item():.3f} (so far)')
    totals = distributed.all_reduce_sum(totals).tolist()
    stats = {'loss': totals[0] / max(totals[1], 1), 'acc1': 100 * totals[2] / max(totals[4], 1),
             'acc5': 100 * totals[3] / max(totals[4], 1), 'num_images': int(totals[4])}
    print0('* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(**stats))
    return stats


def train_and_evaluate(args, runtime, model, model_without_ddp, criterion, optimizer, loss_scaler, checkpointer,
                       loader_train, loader_val, mixup_fn=None, log_writer=None) -> float:
    """The epochs of fine-tuning / linear probing: train, evaluate, keep the best, checkpoint, log. Returns the
    best top-1 accuracy."""
    max_accuracy = checkpointer.extra_state.get('max_accuracy', 0.0)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    loop = EpochLoop(args, loader_train, loader_train.dataset.bad_images, checkpointer)
    print0(f'Start training for {args.epochs} epochs')
    for epoch, start_iter in loop.epochs():
        train_stats = loop.run(train_one_epoch, model, criterion, loader_train, optimizer, runtime, epoch,
                               loss_scaler, args.clip_grad, mixup_fn, log_writer=log_writer, args=args,
                               start_iter=start_iter, checkpointer=checkpointer)
        test_stats = evaluate(loader_val, model, runtime)
        report_bad_images(loader_val.dataset.bad_images)
        print0(f"Accuracy of the network on the {len(loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
        if test_stats['acc1'] > max_accuracy:
            max_accuracy = test_stats['acc1']
            checkpointer.save_best(epoch, {'acc1': test_stats['acc1'], 'acc5': test_stats['acc5']})
        print0(f'Max accuracy: {max_accuracy:.2f}%')
        if log_writer is not None:
            for name in ('acc1', 'acc5', 'loss'):
                log_writer.add_scalar(f'perf/test_{name}', test_stats[name], epoch)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters, 'max_accuracy': max_accuracy,
                     'bad_images': len(loader_train.dataset.bad_images)}
        append_log(args.output_dir, log_stats, log_writer)  # before the checkpoint: see truncate_log
        checkpointer.extra_state['max_accuracy'] = max_accuracy
        checkpointer.save(epoch)
        loop.stop_if_signalled(epoch)
    return max_accuracy


def evaluate_or_train(args, runtime, model, model_without_ddp, criterion, optimizer, loss_scaler, loader_train,
                      loader_val, mixup_fn=None):
    """After --resume (or auto-resume): with --eval report the accuracy, else train and evaluate each epoch."""
    checkpoint = resume_training(args, model_without_ddp, optimizer, loss_scaler, runtime)
    if args.eval:
        test_stats = evaluate(loader_val, model, runtime)
        print0(f"Accuracy of the network on the {len(loader_val.dataset)} test images: {test_stats['acc1']:.1f}%")
        return
    prepare_output_dir(args)
    log_writer = make_log_writer(args.log_dir)
    checkpointer = Checkpointer(args, model_without_ddp, optimizer, loss_scaler, runtime, len(loader_train))
    checkpointer.extra_state['max_accuracy'] = checkpoint.get('max_accuracy', 0.0)
    train_and_evaluate(args, runtime, model, model_without_ddp, criterion, optimizer, loss_scaler, checkpointer,
                       loader_train, loader_val, mixup_fn, log_writer)
