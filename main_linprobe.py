"""Linear probing of an MAE-pretrained ViT: frozen backbone, BatchNorm (no affine) + linear head, LARS.

torchrun --nproc_per_node=8 main_linprobe.py --batch_size 512 --accum_iter 4 --model vit_base_patch16 \
    --cls_token --finetune mae_pretrain_vit_base.pth --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval \
    --data_path $IMAGENET
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
from dataclasses import asdict
import torch

import models_vit
from engine_finetune import evaluate, train_one_epoch
from util import flags as cli
from util import checks, classification, distributed, launch, pixels
from util.loss_scaler import LossScaler
from util.checkpointer import Checkpointer, load_resumable, resume_training
from util.datasets import build_loaders
from util.output_dir import prepare_output_dir
from util.lars import LARS
from util.logs import RunLog
from util.trackers import Trackers, note_evaluation_only
from util.lr_sched import LrSchedule
from util.preemption import stop_if_signalled
from util.rollback import Rollbacks
from util.transforms import build_linprobe_transform


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_linprobe.py', 'MAE linear probing for image classification')
    cli.add_schedule_args(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0., min_lr=0., warmup_epochs=10)
    cli.add_model_args(parser, model='vit_large_patch16', classifier=True)
    cli.add_classifier_args(parser, global_pool=False)
    cli.add_run_args(parser, folders='train/ and val/ (with --eval: val/)')
    # each checkpoint holds the frozen encoder again (1.2 GB for ViT-L) for a head of a few thousand parameters:
    # the newest numbered one is kept (with checkpoint-last and -best), not the official script's 90
    parser.set_defaults(keep_last=1)
    return parser


def main(args):
    check_args(args)
    world_size = distributed.world_size_of_launch(args)
    run = classification.read_up_front(args, world_size, global_pool_default=False,
                                       train_transform=lambda size, arrays: build_linprobe_transform(
                                           size, pixels.normalization_of(args), arrays))
    if run is None:
        return  # the run in --output_dir already finished --epochs

    runtime = launch.start(args, training=not args.eval)
    loader_train, loader_val = build_loaders(run.dataset_train, run.dataset_val, args, runtime, world_size)
    model = linear_probe(classification.build_model(args, run, head_init_std=0.01))
    if args.eval:
        note_evaluation_only(args)
        load_resumable(run.resumable, model, args.model, fit_grid=True)
        return evaluate(loader_val, model.to(runtime.device), runtime, args, output_dir='')

    model, model_to_save = launch.place_model(model, runtime, args, fsdp=False)
    lr_schedule = LrSchedule.of(args, world_size)
    optimizer = LARS(model_to_save.head.parameters(), lr=lr_schedule.lr, weight_decay=args.weight_decay)
    loss_scaler = LossScaler(runtime.grad_scaler())
    criterion = torch.nn.CrossEntropyLoss()

    start = resume_training(run.resumable, model_to_save, optimizer, loss_scaler, runtime, args)
    trackers = Trackers.start(args, start, world_size)  # W&B and MLflow: refused before anything is written
    prepare_output_dir(args, start.epoch)
    checkpointer = Checkpointer(args, model_to_save, optimizer, loss_scaler, runtime, start, len(run.dataset_train),
                                run_values={'lr': lr_schedule.lr, **asdict(run.sizes)}, classes=run.classes,
                                trackers=trackers)
    run_log = RunLog(args, model_to_save, optimizer, lr_schedule, runtime, world_size, start, 'MAE linear probing',
                     classification.describe_data(run), f'weight decay {args.weight_decay}, frozen encoder, '
                     f'{"global pool" if run.sizes.global_pool else "class token"}',
                     trackers, n_parameters=classification.trainable_parameters(model))
    rollbacks = Rollbacks(args, checkpointer, loader_train, start)  # --on_nonfinite
    for epoch in range(start.epoch, args.epochs):
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, lr_schedule, runtime, epoch,
                                      loss_scaler, args, run_log.trackers, checkpointer, start,
                                      rollbacks)  # no mixup, no clipping
        with checkpointer.saving_if_stopped(epoch, train_stats):  # a stop signal during it saves, then exits
            test_stats = evaluate(loader_val, model, runtime, args)
        run_log.write(epoch, train_stats, test_stats, max_accuracy=checkpointer.keep_best(epoch, test_stats))
        checkpointer.save(epoch)
        stop_if_signalled(epoch, args.epochs, checkpointer.last_path)
    run_log.finish()


def linear_probe(model: models_vit.VisionTransformer) -> models_vit.VisionTransformer:
    """BatchNorm1d(affine=False) + the linear head; everything else frozen (only the head trains)."""
    model = models_vit.add_batchnorm_head(model)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def check_args(args):
    errors = []
    checks.check_classifier_args(args, errors)
    if not args.eval and args.batch_size == 1:
        errors.append('--batch_size 1: the BatchNorm before the linear head normalises over the batch, which needs '
                      'at least 2 images per process')
    checks.raise_if_errors(errors)


if __name__ == '__main__':
    launch.run_main(main, cli.parse_with(get_args_parser()))
