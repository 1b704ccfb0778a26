"""MAE pretraining. Accepts the official command line unchanged, on CUDA, Ascend NPU, SDAA, MPS or CPU.
`python main_pretrain.py --demo` runs a few-minute demo on generated images (util/demo.py).

torchrun --nproc_per_node=8 main_pretrain.py --batch_size 64 --accum_iter 8 --model mae_vit_large_patch16 \
    --norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 \
    --data_path $IMAGENET
"""
import argparse
import os
import sys

import models_mae
import models_vit
from engine_pretrain import train_one_epoch
from util import args as cli
from util import demo, launch
from util.amp import LossScaler
from util.checkpoint import Checkpointer, resume_training
from util.datasets import build_image_folder, build_loader, build_pretrain_transform
from util.distributed import print0
from util.fast_decode import build_fast_pretrain_transform, decode_rgb_tensor
from util.logs import append_log, make_log_writer
from util.lr_decay import param_groups_weight_decay
from util.training import EpochLoop, make_adamw, prepare_output_dir


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE pre-training', add_help=True)
    cli.add_schedule_args(parser, batch_size=64, epochs=400, blr=1e-3, weight_decay=0.05, min_lr=0.,
                          warmup_epochs=40)
    cli.add_model_args(parser, model='mae_vit_large_patch16')
    parser.add_argument('--mask_ratio', default=0.75, type=float,
                        help='Masking ratio (percentage of removed patches).')
    parser.add_argument('--norm_pix_loss', action='store_true',
                        help='Use (per-patch) normalized pixels as targets for computing loss')
    parser.set_defaults(norm_pix_loss=False)
    cli.add_data_args(parser)
    cli.add_output_args(parser)
    cli.add_runtime_args(parser)
    parser.add_argument('--save_freq', default=20, type=int,
                        help='write a numbered checkpoint every N epochs (and after the last one)')
    cli.add_adamw_args(parser)
    parser.add_argument('--demo', action='store_true',
                        help='pretrain a tiny MAE on generated textures in a few minutes on a CPU, then show the '
                             'held-out reconstructions (any flag given explicitly still applies)')
    parser.add_argument('--demo_images', default=250, type=int, help='with --demo: training images per class')
    parser.add_argument('--fast_decode', action='store_true',
                        help='decode JPEGs with torchvision.io and crop/resize uint8 tensors: same crop '
                             'distribution, pixels within a few grey levels of PIL, ~2x the images/s per core')
    return parser


def validate(args):
    errors = []
    cli.check_ranges(args, errors)
    cli.check_model(args, models_mae.MODELS, ('MAE model', 'a classifier'), models_vit.MODELS,
                    'main_finetune.py or main_linprobe.py', errors)
    if args.model in models_mae.MODELS:
        cli.check_patch_grid(args, cli.default_patch_size(args.model), errors)
    if not args.demo:  # the demo generates its data after the checks
        cli.check_data_path(args, ['train'], errors)
    cli.check_checkpoint_path('--resume', args.resume, errors)
    cli.check_output(args, errors)
    cli.raise_if_errors(errors)


def build_model(args) -> models_mae.MaskedAutoencoderViT:
    overrides = dict(img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, attn_impl=args.attn)
    if args.patch_size:
        overrides['patch_size'] = args.patch_size
    return models_mae.build_mae(args.model, **overrides)


def build_pretraining_dataset(args):
    """The workers emit uint8 crops; the engine normalises them on the device (the official numbers)."""
    root = os.path.join(args.data_path, 'train')
    if args.fast_decode:
        return build_image_folder(root, build_fast_pretrain_transform(args.input_size), decode=decode_rgb_tensor)
    return build_image_folder(root, build_pretrain_transform(args.input_size, uint8_output=True))


def main(args):
    if args.demo:
        demo.check_folders(args)
    validate(args)
    runtime = launch.start(args)
    if args.demo:
        demo.prepare(args)  # the images: after the start, so that one rank writes them while the others wait
    dataset_train = build_pretraining_dataset(args)
    print0(dataset_train)
    data_loader_train = build_loader(dataset_train, args, runtime, train=True, rank=args.rank,
                                     world_size=args.world_size)
    model = build_model(args)
    model, model_without_ddp = launch.place_model(model, runtime, args)
    print0('Model = %s' % str(model_without_ddp))
    launch.effective_lr(args)

    # no weight decay on biases and norm weights; AdamW betas (0.9, 0.95)
    param_groups = param_groups_weight_decay(model_without_ddp, args.weight_decay)
    optimizer = make_adamw(param_groups, args, runtime, betas=(0.9, 0.95))
    print0(optimizer)
    loss_scaler = LossScaler(runtime.grad_scaler())
    resume_training(args, model_without_ddp, optimizer, loss_scaler, runtime)
    prepare_output_dir(args)
    log_writer = make_log_writer(args.log_dir)
    checkpointer = Checkpointer(args, model_without_ddp, optimizer, loss_scaler, runtime, len(data_loader_train))

    print0(f'Start training for {args.epochs} epochs')
    demo_run = demo.Demo(args, model_without_ddp, runtime) if args.demo else None
    loop = EpochLoop(args, data_loader_train, dataset_train.bad_images, checkpointer)
    for epoch, start_iter in loop.epochs():
        train_stats = loop.run(train_one_epoch, model, data_loader_train, optimizer, runtime, epoch, loss_scaler,
                               log_writer=log_writer, args=args, start_iter=start_iter, checkpointer=checkpointer)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch,
                     'bad_images': len(dataset_train.bad_images)}
        append_log(args.output_dir, log_stats, log_writer)  # before the checkpoint: see truncate_log
        checkpointer.save(epoch, numbered=epoch % args.save_freq == 0 or epoch + 1 == args.epochs)
        loop.stop_if_signalled(epoch)
    if log_writer is not None:
        log_writer.close()
    if demo_run is not None:
        demo_run.finish()


if __name__ == '__main__':
    parser = get_args_parser()
    parser.set_defaults(**demo.demo_defaults(sys.argv[1:]))  # explicit flags still win
    launch.run_main(main, cli.parse_with(parser))
