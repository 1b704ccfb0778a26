"""Fine-tune an MAE-pretrained ViT on ImageNet, or evaluate a fine-tuned checkpoint. The official commands run
unchanged:

torchrun --nproc_per_node=8 main_finetune.py --accum_iter 4 --batch_size 32 --model vit_base_patch16 \
    --finetune mae_pretrain_vit_base.pth --epochs 100 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 \
    --drop_path 0.1 --mixup 0.8 --cutmix 1.0 --reprob 0.25 --dist_eval --data_path $IMAGENET
python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --batch_size 16 \
    --data_path $IMAGENET          # -> * Acc@1 83.664 Acc@5 96.530 loss 0.731
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
from dataclasses import asdict
import torch
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from engine_finetune import evaluate, train_one_epoch
from util import flags as cli
from util import checks, classification, distributed, launch
from util.loss_scaler import LossScaler
from util.checkpointer import Checkpointer, load_resumable, resume_training
from util.output_dir import prepare_output_dir
from util.datasets import build_loaders, build_transform, describe
from util.logs import RunLog
from util.trackers import Trackers, note_evaluation_only
from util.lr_decay import param_groups_lrd
from util.lr_sched import LrSchedule
from util.optim import make_adamw
from util.preemption import stop_if_signalled
from util.rollback import Rollbacks
from util.transforms import auto_augment_policy, build_finetune_transform

CUTMIX_BOX: cli.Rule = ((lambda v: v is None or (len(v) == 2 and 0 < v[0] < v[1] <= 1)),
                        'must be two fractions, min < max, in (0, 1]')


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_finetune.py', 'MAE fine-tuning for image classification')
    cli.add_schedule_args(parser, batch_size=64, epochs=50, blr=1e-3, weight_decay=0.05, min_lr=1e-6,
                          warmup_epochs=5)
    cli.add_model_args(parser, model='vit_large_patch16', classifier=True)
    parser.add_argument('--drop_path', type=float, default=0.1, metavar='PCT', check=cli.within(0, 1, '[)'),
                        recipe=True, help='stochastic depth rate')
    parser.add_argument('--clip_grad', type=float, default=None, metavar='NORM', check=cli.above(0),
                        help='clip the gradient norm to this (default: no clipping)')
    parser.add_argument('--layer_decay', type=float, default=0.75, check=cli.within(0, 1, '(]'), recipe=True,
                        help='layer-wise lr decay (ELECTRA / BEiT): block i gets lr x layer_decay^(depth + 1 - i)')
    parser.add_argument('--color_jitter', type=float, default=None, metavar='PCT', check=cli.at_least(0), recipe=True,
                        help='colour jitter strength, used only when --aa is none (default: off)')
    parser.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME', recipe=True,
                        help='AutoAugment / RandAugment policy: e.g. rand-m9-mstd0.5-inc1, original, v0, or none')
    parser.add_argument('--smoothing', type=float, default=0.1, check=cli.within(0, 1, '[)'), recipe=True,
                        help='label smoothing')
    parser.add_argument('--reprob', type=float, default=0.25, metavar='PCT', check=cli.within(0, 1), recipe=True,
                        help='random erasing probability')
    parser.add_argument('--remode', type=str, default='pixel', check=cli.one_of('pixel', 'rand', 'const'), recipe=True,
                        help='random erasing fill: pixel, rand or const')
    parser.add_argument('--recount', type=int, default=1, check=cli.at_least(1), recipe=True,
                        help='random erasing regions per image')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='do not random-erase the first (clean) augmentation split')
    parser.add_argument('--mixup', type=float, default=0, check=cli.at_least(0), recipe=True,
                        help='mixup alpha; mixup is on if > 0')
    parser.add_argument('--cutmix', type=float, default=0, check=cli.at_least(0), recipe=True,
                        help='cutmix alpha; cutmix is on if > 0')
    parser.add_argument('--cutmix_minmax', type=float, nargs='+', default=None, check=CUTMIX_BOX, recipe=True,
                        help='cutmix min and max box ratio; overrides --cutmix and turns cutmix on')
    parser.add_argument('--mixup_prob', type=float, default=1.0, check=cli.within(0, 1), recipe=True,
                        help='probability of mixup or cutmix per batch when either is on')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5, check=cli.within(0, 1), recipe=True,
                        help='probability of cutmix instead of mixup when both are on')
    parser.add_argument('--mixup_mode', type=str, default='batch', check=cli.one_of('batch', 'pair', 'elem'),
                        recipe=True,
                        help='mixup / cutmix parameters drawn per batch, pair or elem')
    cli.add_classifier_args(parser, global_pool=True)
    cli.add_run_args(parser, folders='train/ and val/ (with --eval: val/)')
    cli.add_adamw_args(parser)
    cli.add_fsdp_args(parser)
    return parser


def main(args):
    check_args(args)
    world_size = distributed.world_size_of_launch(args)
    run = classification.read_up_front(args, world_size, global_pool_default=True,
                                       train_transform=lambda size, arrays: finetune_transform(args, size, arrays))
    if run is None:
        return  # the run in --output_dir already finished --epochs

    runtime = launch.start(args, training=not args.eval)
    loader_train, loader_val = build_loaders(run.dataset_train, run.dataset_val, args, runtime, world_size)
    model = classification.build_model(args, run, head_init_std=2e-5, drop_path_rate=args.drop_path)
    if args.eval:
        note_evaluation_only(args)
        load_resumable(run.resumable, model, args.model, fit_grid=True)
        distributed.print0(f'data: {describe(run.dataset_val, training=False)}')
        return evaluate(loader_val, model.to(runtime.device), runtime, args, output_dir='')

    model, model_to_save = launch.place_model(model, runtime, args, fsdp=args.fsdp)
    lr_schedule = LrSchedule.of(args, world_size)
    optimizer = build_optimizer(args, model_to_save, lr_schedule.lr, runtime.type)
    loss_scaler = LossScaler(runtime.grad_scaler())
    mixup_fn = build_mixup(args, run.sizes.nb_classes)
    criterion = build_criterion(args, mixup_fn)

    start = resume_training(run.resumable, model_to_save, optimizer, loss_scaler, runtime, args)
    trackers = Trackers.start(args, start, world_size)  # W&B and MLflow: refused before anything is written
    prepare_output_dir(args, start.epoch)
    checkpointer = Checkpointer(args, model_to_save, optimizer, loss_scaler, runtime, start, len(run.dataset_train),
                                run_values={'lr': lr_schedule.lr, **asdict(run.sizes)}, classes=run.classes,
                                trackers=trackers)
    run_log = RunLog(args, model_to_save, optimizer, lr_schedule, runtime, world_size, start, 'MAE fine-tuning',
                     classification.describe_data(run), describe_recipe(args, run.sizes, mixup_fn),
                     trackers, n_parameters=classification.trainable_parameters(model))
    rollbacks = Rollbacks(args, checkpointer, loader_train, start)  # --on_nonfinite
    for epoch in range(start.epoch, args.epochs):
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, lr_schedule, runtime, epoch,
                                      loss_scaler, args, run_log.trackers, checkpointer, start, rollbacks,
                                      mixup_fn, args.clip_grad)
        with checkpointer.saving_if_stopped(epoch, train_stats):  # a stop signal during it saves, then exits
            test_stats = evaluate(loader_val, model, runtime, args)
        run_log.write(epoch, train_stats, test_stats, max_accuracy=checkpointer.keep_best(epoch, test_stats))
        checkpointer.save(epoch)
        stop_if_signalled(epoch, args.epochs, checkpointer.last_path)
    run_log.finish()


def build_optimizer(args, model: torch.nn.Module, lr: float, device_type: str) -> torch.optim.Optimizer:
    """AdamW over layer-wise decayed groups: lr_scale = layer_decay ** (num_layers - layer_id); no weight decay
    on biases, norms and the position / class tokens."""
    param_groups = param_groups_lrd(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=args.layer_decay)
    return make_adamw(param_groups, lr, args.adamw_impl, device_type)


def describe_recipe(args, sizes: classification.Sizes, mixup_fn) -> str:
    mixing = f'mixup {args.mixup} / cutmix {args.cutmix}' if mixup_fn is not None else 'no mixup'
    return (f'layer decay {args.layer_decay}, drop path {args.drop_path}, label smoothing {args.smoothing}, '
            f'{mixing}, augmentation {args.aa}, random erasing {args.reprob}, '
            f'{"global pool" if sizes.global_pool else "class token"}')


def build_mixup(args, num_classes: int):
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def finetune_transform(args, input_size, arrays: bool):
    """build_transform's training transform; on arrays (util/arrays.py), RandAugment and colour jitter, which are
    defined on RGB photos, are refused in one line naming the flag to change."""
    if arrays:
        why = (f'--in_chans {args.in_chans}' if args.in_chans != 3 else '.npy/TIFF data') + ' (images read as arrays)'
        if auto_augment_policy(args.aa) is not None:
            raise checks.UsageError(f'--aa {args.aa}: RandAugment is defined on RGB photos, not on {why}; pass '
                                    '--aa none')
        if args.color_jitter:
            raise checks.UsageError(f'--color_jitter {args.color_jitter}: colour jitter is defined on RGB photos, '
                                    f'not on {why}; leave it out')
    return build_transform(True, args, input_size, arrays)


def check_args(args):
    errors = []
    checks.check_classifier_args(args, errors)
    if mixup_active(args) and args.batch_size % 2:
        errors.append(f'--batch_size {args.batch_size}: mixup/cutmix needs an even batch size')
    if not errors:
        try:
            build_finetune_transform(args, args.input_size or 224)
        except (AssertionError, ValueError, KeyError) as e:
            errors.append(f'--aa {args.aa}: not an augmentation policy timm knows ({e}); e.g. '
                          'rand-m9-mstd0.5-inc1, original, v0, or none')
    checks.raise_if_errors(errors)


def mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None


def build_criterion(args, mixup_fn) -> torch.nn.Module:
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # smoothing is handled with mixup label transform
    if args.smoothing > 0.:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


if __name__ == '__main__':
    launch.run_main(main, cli.parse_with(get_args_parser()))
