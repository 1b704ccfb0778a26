"""MAE pretraining. Accepts the official command line unchanged, on CUDA, Ascend NPU, SDAA, MPS or CPU.
`python main_pretrain.py --demo` runs a few-minute demo on generated images (tools/demo.py).

torchrun --nproc_per_node=8 main_pretrain.py --batch_size 64 --accum_iter 8 --model mae_vit_large_patch16 \
    --norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 \
    --data_path $IMAGENET
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
import os
import sys
from typing import List, Optional

import torch

import models_mae
import models_vit
from engine_pretrain import train_one_epoch
from util import flags as cli
from util import checks, distributed, knn_monitor, launch, pixels, training_plan
from util.loss_scaler import LossScaler
from util.checkpointer import Checkpointer, resume_training
from util.output_dir import find_resumable, prepare_output_dir
from util.datasets import ImageFolderDataset, build_image_folder, build_loader, describe, reads_arrays
from util.distributed import get_rank
from util.images import decode_image_tensor
from util.logs import RunLog
from util.trackers import Trackers
from util.lr_decay import param_groups_weight_decay
from util.lr_sched import LrSchedule
from util.optim import make_adamw
from util.preemption import stop_if_signalled
from util.rollback import Rollbacks
from util.transforms import build_array_pretrain_transform, build_fast_pretrain_transform, build_pretrain_transform


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_pretrain.py', 'MAE pre-training')
    cli.add_schedule_args(parser, batch_size=64, epochs=400, blr=1e-3, weight_decay=0.05, min_lr=0.,
                          warmup_epochs=40)
    cli.add_model_args(parser, model='mae_vit_large_patch16')
    parser.add_argument('--mask_ratio', default=0.75, type=float, check=cli.within(0, 1, '[)'), recipe=True,
                        help='fraction of the patches hidden from the encoder, 0 <= ratio < 1')
    parser.add_argument('--norm_pix_loss', action='store_true', recipe=True,
                        help='targets are each patch\'s pixels normalised by its own mean and std (the released '
                             'models)')
    cli.add_run_args(parser, folders='train/ (val/ is not read)')
    parser.add_argument('--save_freq', default=20, type=int,
                        check=cli.at_least(1, ' (epochs between numbered checkpoints)'),
                        help='write a numbered checkpoint every N epochs (and after the last one)')
    cli.add_adamw_args(parser)
    cli.add_fsdp_args(parser)
    parser.add_argument('--fast_decode', action='store_true',
                        help='decode JPEGs with torchvision.io and crop/resize uint8 tensors: same crop '
                             'distribution, pixels within a few grey levels of PIL, ~2x the images/s per core')
    parser.add_argument('--demo', action='store_true',
                        help='run the built-in demo instead (tools/demo.py): a tiny MAE on generated textures in a '
                             'few CPU minutes; any flag given explicitly overrides its defaults')
    parser.add_argument('--demo_images', default=250, type=int, help='with --demo: training images per class')
    knn_monitor.add_args(parser)
    return parser


def check_args(args):
    errors = []
    patch = checks.check_model_args(args, models_mae.MODELS, 'MAE model', models_vit.MODELS, 'a classifier',
                                    'main_finetune.py or main_linprobe.py', errors)
    if patch:
        check_mask_ratio(args.mask_ratio, args.input_size, patch, errors)
    checks.check_data_path(args.data_path, ['train'], errors)
    checks.check_checkpoint_path('--resume', args.resume, errors)
    checks.check_output(args, errors)
    knn_monitor.check_args(args, errors)
    checks.raise_if_errors(errors)


def check_mask_ratio(mask_ratio: float, input_size: pixels.Size, patch_size: int, errors: List[str],
                     flag: str = '--mask_ratio'):
    """Pretraining: the ratio must hide at least one patch (the loss is the mean over hidden patches, 0/0
    otherwise) and leave at least one visible (the encoder's input)."""
    sides = pixels.height_width(input_size)
    if not (0 <= mask_ratio < 1) or min(sides) < 1 or patch_size < 1 or any(s % patch_size for s in sides):
        return  # reported by the range and grid checks
    rows, columns = pixels.grid_of(input_size, patch_size)
    num_patches = rows * columns
    kept = int(num_patches * (1 - mask_ratio))  # as models_mae.random_masking counts them
    where = f'of the {num_patches} patches ({pixels.size_text(input_size)} images, {patch_size} px patches)'
    if kept == num_patches:
        errors.append(f'{flag} {mask_ratio}: hides none {where}, and the loss is computed on hidden patches '
                      f'only; use at least {smallest_ratio_hiding_one(num_patches):.4g}')
    elif kept == 0:
        errors.append(f'{flag} {mask_ratio}: leaves none {where} visible to the encoder; use at most '
                      f'{(num_patches - 1) / num_patches:.4g}')


def smallest_ratio_hiding_one(num_patches: int) -> float:
    ratio = 1 / num_patches
    while int(num_patches * (1 - ratio)) == num_patches:  # float rounding of L * (1 - 1/L)
        ratio *= 1.0001
    return ratio


def describe_recipe(args) -> str:
    targets = 'per-patch normalised pixel targets' if args.norm_pix_loss else 'raw pixel targets'
    return f'mask ratio {args.mask_ratio}, {targets}, weight decay {args.weight_decay}'


def build_model(args) -> models_mae.MaskedAutoencoderViT:
    return models_mae.build_mae(args.model, patch_size=args.patch_size, img_size=args.input_size,
                                in_chans=args.in_chans, norm_pix_loss=args.norm_pix_loss, attn_impl=args.attn)


def build_pretraining_dataset(args) -> ImageFolderDataset:
    """The workers emit uint8 crops; the engine normalises them on the device (the official numbers). Images of
    --in_chans other than 3, or .npy/TIFF files, are read as float tensors and normalised in the workers."""
    root = os.path.join(args.data_path, 'train')
    if reads_arrays(root, args.in_chans):
        transform = build_array_pretrain_transform(args.input_size, pixels.normalization_of(args))
        return build_image_folder(root, transform, max_pixels=args.max_image_pixels, in_chans=args.in_chans)
    if args.fast_decode:
        return build_image_folder(root, build_fast_pretrain_transform(args.input_size), decode=decode_image_tensor,
                                  max_pixels=args.max_image_pixels)
    return build_image_folder(root, build_pretrain_transform(args.input_size, uint8_output=True),
                              max_pixels=args.max_image_pixels)


def main(args, start_over: Optional[bool] = None):
    """start_over: the demo's decision (tools/demo.py): True replaces its previous run, False continues it; None
    (a plain run): --no_auto_resume and --overwrite decide."""
    check_args(args)
    world_size = distributed.world_size_of_launch(args)
    # --resume, or this --output_dir's checkpoint (not when starting over): read before any work
    resumable = find_resumable(args, auto_resume=None if start_over is None else not start_over)
    if training_plan.check_rerun(resumable, args, world_size):
        return  # the run in --output_dir already finished --epochs
    dataset_train = build_pretraining_dataset(args)
    training_plan.check_training_plan(len(dataset_train), dataset_train.root, args, world_size, resumable)
    knn_data = knn_monitor.read_data(args)  # None without --knn_data_path

    runtime = launch.start(args, training=True)
    data_loader_train = build_loader(dataset_train, args, runtime, True, get_rank(), world_size)
    model = build_model(args)
    model, model_to_save = launch.place_model(model, runtime, args, fsdp=args.fsdp)
    lr_schedule = LrSchedule.of(args, world_size)
    optimizer = build_optimizer(args, model_to_save, lr_schedule.lr, runtime.type)
    loss_scaler = LossScaler(runtime.grad_scaler())

    start = resume_training(resumable, model_to_save, optimizer, loss_scaler, runtime, args)
    trackers = Trackers.start(args, start, world_size)  # W&B and MLflow: refused before anything is written
    prepare_output_dir(args, start.epoch, start_over)
    checkpointer = Checkpointer(args, model_to_save, optimizer, loss_scaler, runtime, start, len(dataset_train),
                                run_values={'lr': lr_schedule.lr}, trackers=trackers)
    run_log = RunLog(args, model_to_save, optimizer, lr_schedule, runtime, world_size, start, 'MAE pretraining',
                     describe(dataset_train), describe_recipe(args), trackers)
    rollbacks = Rollbacks(args, checkpointer, data_loader_train, start)  # --on_nonfinite
    for epoch in range(start.epoch, args.epochs):
        train_stats = train_one_epoch(model, data_loader_train, optimizer, lr_schedule, runtime, epoch, loss_scaler,
                                      args, run_log.trackers, checkpointer, start, rollbacks)
        with checkpointer.saving_if_stopped(epoch, train_stats):  # a stop signal during it saves, then exits
            knn_stats = knn_monitor.run(knn_data, model_to_save, epoch, runtime, args)
        run_log.write(epoch, train_stats, **knn_stats)
        checkpointer.save(epoch, numbered=epoch % args.save_freq == 0 or epoch + 1 == args.epochs)
        stop_if_signalled(epoch, args.epochs, checkpointer.last_path)
    run_log.finish()


def build_optimizer(args, model: torch.nn.Module, lr: float, device_type: str) -> torch.optim.Optimizer:
    """AdamW, betas (0.9, 0.95); no weight decay on biases and norm weights."""
    param_groups = param_groups_weight_decay(model, args.weight_decay)
    return make_adamw(param_groups, lr, args.adamw_impl, device_type, betas=(0.9, 0.95))


if __name__ == '__main__':
    parsed = cli.parse_with(get_args_parser())
    if parsed.demo:  # the demo re-reads the command line with its own defaults and runs main() above
        from tools import demo
        sys.exit(demo.main(sys.argv[1:]))
    launch.run_main(main, parsed)
