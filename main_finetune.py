"""Fine-tune an MAE-pretrained ViT on ImageNet, or evaluate a fine-tuned checkpoint. The official commands run
unchanged:

torchrun --nproc_per_node=8 main_finetune.py --accum_iter 4 --batch_size 32 --model vit_base_patch16 \
    --finetune mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
    --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --data_path $IMAGENET
python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --batch_size 16 \
    --data_path $IMAGENET          # -> * Acc@1 83.664 Acc@5 96.530 loss 0.731
"""
import argparse

import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_mae
import models_vit
from engine_finetune import evaluate_or_train
from util import args as cli
from util import launch
from util.amp import LossScaler
from util.datasets import build_classification_data, build_eval_transform, build_transform
from util.distributed import print0
from util.lr_decay import param_groups_lrd
from util.training import build_classifier, make_adamw


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE fine-tuning for image classification', add_help=True)
    cli.add_schedule_args(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, min_lr=1e-6,
                          warmup_epochs=5)
    cli.add_model_args(parser, model='vit_large_patch16')
    parser.add_argument('--drop_path', type=float, default=0.1, metavar='PCT', help='Drop path rate (default: 0.1)')
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM',
                        help='Clip gradient norm (default: None, no clipping)')
    parser.add_argument('--layer_decay', type=float, default=0.75, help='layer-wise lr decay from ELECTRA/BEiT')
    # augmentation
    parser.add_argument('--color_jitter', type=float, default=None, metavar='PCT',
                        help='Color jitter factor (enabled only when not using Auto/RandAug)')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                        help='Use AutoAugment policy. "v0" or "original". " + "(default: rand-m9-mstd0.5-inc1)')
    parser.add_argument('--smoothing', type=float, default=0.1, help='Label smoothing (default: 0.1)')
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT',
                        help='Random erase prob (default: 0.25)')
    parser.add_argument('--remode', type=str, default='pixel', help='Random erase mode (default: "pixel")')
    parser.add_argument('--recount', type=int, default=1, help='Random erase count (default: 1)')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='Do not random erase first (clean) augmentation split')
    parser.add_argument('--mixup', type=float, default=0, help='mixup alpha, mixup enabled if > 0.')
    parser.add_argument('--cutmix', type=float, default=0, help='cutmix alpha, cutmix enabled if > 0.')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None,
                        help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
    parser.add_argument('--mixup_prob', type=float, default=1.0,
                        help='Probability of performing mixup or cutmix when either/both is enabled')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5,
                        help='Probability of switching to cutmix when both mixup and cutmix enabled')
    parser.add_argument('--mixup_mode', type=str, default='batch',
                        help='How to apply mixup/cutmix params. Per "batch", "pair", or "elem"')
    cli.add_classifier_args(parser, global_pool=True)
    cli.add_data_args(parser)
    cli.add_output_args(parser)
    cli.add_runtime_args(parser)
    cli.add_adamw_args(parser)
    return parser


def validate(args):
    errors = []
    cli.check_classifier_args(args, models_vit.MODELS, models_mae.MODELS, errors)
    if mixup_active(args) and args.batch_size % 2:
        errors.append(f'--batch_size {args.batch_size}: mixup/cutmix needs an even batch size')
    try:
        build_transform(True, args)
    except (AssertionError, ValueError, KeyError) as e:
        errors.append(f'--aa {args.aa}: not an augmentation policy timm knows ({e}); e.g. rand-m9-mstd0.5-inc1, '
                      'original, v0, or none')
    if args.mixup_mode not in ('batch', 'pair', 'elem'):
        errors.append(f'--mixup_mode {args.mixup_mode}: choose from batch, pair, elem')
    cli.raise_if_errors(errors)


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def build_mixup(args):
    if not mixup_active(args):
        return None
    print0('Mixup is activated!')
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def build_criterion(args, mixup_fn) -> torch.nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is handled with mixup label transform
    if args.smoothing > 0.:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def main(args):
    validate(args)
    runtime = launch.start(args)
    dataset_train, dataset_val, loader_train, loader_val = build_classification_data(
        args, runtime, build_transform(True, args), build_eval_transform(args.input_size))
    print0(dataset_train if dataset_train is not None else dataset_val)
    mixup_fn = build_mixup(args)

    model = build_classifier(args, head_init_std=2e-5, drop_path_rate=args.drop_path)
    model, model_without_ddp = launch.place_model(model, runtime, args)
    print0('Model = %s' % str(model_without_ddp))
    print0('number of params (M): %.2f' % (sum(p.numel() for p in model.parameters() if p.requires_grad) / 1.e6))
    launch.effective_lr(args)

    # layer-wise lr decay: lr_scale = layer_decay ** (num_layers - layer_id)
    param_groups = param_groups_lrd(model_without_ddp, args.weight_decay,
                                    no_weight_decay_list=model_without_ddp.no_weight_decay(),
                                    layer_decay=args.layer_decay)
    optimizer = make_adamw(param_groups, args, runtime)
    loss_scaler = LossScaler(runtime.grad_scaler())
    criterion = build_criterion(args, mixup_fn)
    print0('criterion = %s' % str(criterion))
    evaluate_or_train(args, runtime, model, model_without_ddp, criterion, optimizer, loss_scaler, loader_train,
                      loader_val, mixup_fn)


if __name__ == '__main__':
    launch.run_main(main, cli.parse_with(get_args_parser()))
