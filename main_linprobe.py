"""Linear probing of an MAE-pretrained ViT: frozen backbone, BatchNorm (no affine) + linear head, LARS.

torchrun --nproc_per_node=8 main_linprobe.py --batch_size 512 --accum_iter 4 --model vit_base_patch16 \
    --cls_token --finetune mae_pretrain_vit_base.pth --epochs 90 --blr 0.1 --weight_decay 0.0 --dist_eval \
    --data_path $IMAGENET
"""
import argparse

import torch

import models_mae
import models_vit
from engine_finetune import evaluate_or_train
from util import args as cli
from util import launch
from util.amp import LossScaler
from util.datasets import build_classification_data, build_linprobe_transform
from util.distributed import print0
from util.lars import LARS
from util.training import build_classifier


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE linear probing for image classification', add_help=True)
    cli.add_schedule_args(parser, batch_size=512, epochs=90, blr=0.1, weight_decay=0., min_lr=0., warmup_epochs=10)
    cli.add_model_args(parser, model='vit_large_patch16')
    cli.add_classifier_args(parser, global_pool=False)
    cli.add_data_args(parser)
    cli.add_output_args(parser)
    cli.add_runtime_args(parser)
    parser.set_defaults(clip_grad=None)  # no clipping in linear probing
    return parser


def validate(args):
    errors = []
    cli.check_classifier_args(args, models_vit.MODELS, models_mae.MODELS, errors)
    cli.raise_if_errors(errors)


def add_batchnorm_head_and_freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Linear probing: BatchNorm1d(affine=False) before the head (keys head.0.*, head.1.*); only it trains."""
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    for p in model.parameters():
        p.requires_grad = False
    for p in model.head.parameters():
        p.requires_grad = True
    return model


def main(args):
    validate(args)
    runtime = launch.start(args)
    dataset_train, dataset_val, loader_train, loader_val = build_classification_data(
        args, runtime, build_linprobe_transform(True, args.input_size),
        build_linprobe_transform(False, args.input_size))
    print0(dataset_train if dataset_train is not None else dataset_val)

    model = add_batchnorm_head_and_freeze(build_classifier(args, head_init_std=0.01))
    model, model_without_ddp = launch.place_model(model, runtime, args)
    print0('Model = %s' % str(model_without_ddp))
    print0('number of params (M): %.2f' % (sum(p.numel() for p in model.parameters() if p.requires_grad) / 1.e6))
    launch.effective_lr(args)

    optimizer = LARS(model_without_ddp.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print0(optimizer)
    loss_scaler = LossScaler(runtime.grad_scaler())
    criterion = torch.nn.CrossEntropyLoss()
    print0('criterion = %s' % str(criterion))
    evaluate_or_train(args, runtime, model, model_without_ddp, criterion, optimizer, loss_scaler, loader_train,
                      loader_val)


if __name__ == '__main__':
    launch.run_main(main, cli.parse_with(get_args_parser()))
