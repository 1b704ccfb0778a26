"""Command-line flags shared by the main_* scripts, and the checks run on them before any work starts.

Every flag of the official scripts keeps its name and default; the new ones (device, precision, fault tolerance,
speed) are grouped below. A failed check is one line naming the flag, exit code 2, nothing written.
"""
import argparse
import os
from typing import Callable, Dict, List, Optional

from util.checkpoint import LAST, holds_a_run, is_url, resumable_checkpoint_in
from util.device import AMP_CHOICES, DEVICE_CHOICES


class UsageError(ValueError):
    """A bad command line; the message is one line naming the flag."""


def add_schedule_args(parser, batch_size: int, epochs: int, blr: float, weight_decay: float, min_lr: float,
                      warmup_epochs: int):
    parser.add_argument('--batch_size', default=batch_size, type=int,
                        help='Batch size per GPU (effective batch size is batch_size * accum_iter * # gpus')
    parser.add_argument('--epochs', default=epochs, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='Accumulate gradient iterations (for increasing the effective batch size under '
                             'memory constraints)')
    parser.add_argument('--weight_decay', type=float, default=weight_decay, help='weight decay')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', help='learning rate (absolute lr)')
    parser.add_argument('--blr', type=float, default=blr, metavar='LR',
                        help='base learning rate: absolute_lr = base_lr * total_batch_size / 256')
    parser.add_argument('--min_lr', type=float, default=min_lr, metavar='LR',
                        help='lower lr bound for cyclic schedulers that hit 0')
    parser.add_argument('--warmup_epochs', type=int, default=warmup_epochs, metavar='N', help='epochs to warmup LR')


def add_model_args(parser, model: str, input_size: int = 224):
    parser.add_argument('--model', default=model, type=str, metavar='MODEL', help='Name of model to train')
    parser.add_argument('--input_size', default=input_size, type=int, help='images input size')
    parser.add_argument('--patch_size', default=None, type=int,
                        help="patch size in pixels (default: the model's own, 16 or 14)")
    parser.add_argument('--attn', default='sdpa', choices=('sdpa', 'eager'),
                        help='attention kernel: fused scaled_dot_product_attention, or the eager formula')


def add_data_args(parser):
    parser.add_argument('--data_path', default=None, type=str,
                        help='dataset path: a folder with train/ and val/, one sub-folder per class')
    parser.add_argument('--num_workers', default=10, type=int)
    parser.add_argument('--pin_mem', action='store_true',
                        help='Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.')
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)
    parser.add_argument('--persistent_workers', action='store_true',
                        help='keep DataLoader workers alive between epochs')
    parser.add_argument('--max_bad_images', default=0.001, type=float,
                        help='stop when more unreadable images than this were replaced: a fraction of the '
                             'dataset if < 1, else a count')


def add_output_args(parser):
    parser.add_argument('--output_dir', default='./output_dir', help='path where to save, empty for no saving')
    parser.add_argument('--log_dir', default=None, help='path where to tensorboard log (default: output_dir)')
    parser.add_argument('--resume', default='', help='resume from checkpoint (a path or an https URL)')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                        help='do not continue from output_dir/checkpoint-last.pth')
    parser.set_defaults(auto_resume=True)
    parser.add_argument('--overwrite', action='store_true',
                        help='with --no_auto_resume: start over in an output_dir that holds a run')
    parser.add_argument('--save_every_iters', default=0, type=int,
                        help='also update checkpoint-last.pth every N iterations inside an epoch (0: off)')
    parser.add_argument('--keep_last', default=0, type=int,
                        help='keep only the K newest numbered checkpoints (0: keep all)')
    parser.add_argument('--print_freq', default=20, type=int, help='log every N iterations')


def add_runtime_args(parser):
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES,
                        help='device to use for training / testing (auto: npu, sdaa, cuda, mps, cpu)')
    parser.add_argument('--amp', default=None, choices=AMP_CHOICES,
                        help='mixed precision (default: fp16 on cuda/npu/sdaa, off on cpu/mps)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--grad_checkpointing', action='store_true',
                        help='recompute block activations in backward to save memory')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--world_size', default=1, type=int, help='number of distributed processes')
    parser.add_argument('--local_rank', '--local-rank', default=-1, type=int)
    parser.add_argument('--dist_on_itp', action='store_true')
    parser.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    parser.add_argument('--dist_timeout', default=30, type=float,
                        help='minutes a collective may wait for a peer before the job fails')


ADAMW_IMPLS = ('auto', 'fused', 'foreach', 'loop')


def add_adamw_args(parser):
    parser.add_argument('--adamw_impl', default='auto', choices=ADAMW_IMPLS,
                        help="AdamW kernel (auto: torch's default, foreach on GPUs as in the official runs; fused: "
                             'one kernel, equal to rounding)')


def add_classifier_args(parser, global_pool: bool, nb_classes: int = 1000):
    parser.add_argument('--finetune', default='', help='finetune from checkpoint (MAE pretrained weights)')
    parser.add_argument('--global_pool', action='store_true')
    parser.set_defaults(global_pool=global_pool)
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='Use class token instead of global pool for classification')
    parser.add_argument('--nb_classes', default=nb_classes, type=int, help='number of the classification types')
    parser.add_argument('--eval', action='store_true', help='Perform evaluation only')
    parser.add_argument('--dist_eval', action='store_true', default=False,
                        help='Enabling distributed evaluation (recommended during training for faster monitor')


# --- validation ------------------------------------------------------------------------------------------------

def check(condition: bool, flag: str, value, requirement: str, errors: List[str]):
    if not condition:
        errors.append(f'{flag} {value}: {requirement}')


def check_ranges(args, errors: List[str]):
    """Numeric flags: the ones present on this script's parser are checked."""
    rules: Dict[str, Callable] = {
        'batch_size': (lambda v: v >= 1, 'must be a positive integer'),
        'epochs': (lambda v: v >= 1, 'must be a positive integer'),
        'accum_iter': (lambda v: v >= 1, 'must be >= 1'),
        'input_size': (lambda v: v >= 1, 'must be a positive integer'),
        'patch_size': (lambda v: v is None or v >= 1, 'must be a positive integer'),
        'mask_ratio': (lambda v: 0 <= v < 1, 'must be in [0, 1)'),
        'warmup_epochs': (lambda v: v >= 0, 'must be >= 0'),
        'blr': (lambda v: v > 0, 'must be > 0'),
        'lr': (lambda v: v is None or v > 0, 'must be > 0'),
        'min_lr': (lambda v: v >= 0, 'must be >= 0'),
        'weight_decay': (lambda v: v >= 0, 'must be >= 0'),
        'layer_decay': (lambda v: 0 < v <= 1, 'must be in (0, 1]'),
        'drop_path': (lambda v: 0 <= v < 1, 'must be in [0, 1)'),
        'clip_grad': (lambda v: v is None or v > 0, 'must be > 0'),
        'smoothing': (lambda v: 0 <= v < 1, 'must be in [0, 1)'),
        'reprob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
        'recount': (lambda v: v >= 1, 'must be >= 1'),
        'mixup': (lambda v: v >= 0, 'must be >= 0'),
        'cutmix': (lambda v: v >= 0, 'must be >= 0'),
        'mixup_prob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
        'mixup_switch_prob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
        'nb_classes': (lambda v: v >= 1, 'must be a positive integer'),
        'num_workers': (lambda v: v >= 0, 'must be >= 0'),
        'start_epoch': (lambda v: v >= 0, 'must be >= 0'),
        'save_every_iters': (lambda v: v >= 0, 'must be >= 0 (0: off)'),
        'keep_last': (lambda v: v >= 0, 'must be >= 0 (0: keep all)'),
        'max_bad_images': (lambda v: v >= 0, 'must be >= 0'),
        'print_freq': (lambda v: v >= 1, 'must be >= 1'),
        'dist_timeout': (lambda v: v > 0, 'must be > 0 minutes'),
        'topk': (lambda v: v >= 1, 'must be >= 1'),
    }
    for name, (ok, requirement) in rules.items():
        if hasattr(args, name):
            check(ok(getattr(args, name)), f'--{name}', getattr(args, name), requirement, errors)


def check_model(args, models: dict, kind: str, other_models: dict, other_script: str, errors: List[str]):
    if args.model in models:
        return
    if args.model in other_models:
        errors.append(f'--model {args.model}: that is {kind[1]}; use it with {other_script}, '
                      f'here choose from {", ".join(models)}')
    else:
        errors.append(f'--model {args.model}: unknown {kind[0]}; choose from {", ".join(models)}')


def default_patch_size(model_name: str) -> int:
    """The patch size a factory name carries: 14 for *_patch14 (ViT-H), else 16."""
    return 14 if model_name.endswith('patch14') else 16


def check_patch_grid(args, default_patch_size: Optional[int], errors: List[str]):
    patch = args.patch_size or default_patch_size
    if patch and args.input_size >= 1 and patch >= 1 and args.input_size % patch:
        errors.append(f'--input_size {args.input_size}: must be divisible by the patch size {patch} '
                      '(or pass --patch_size)')


def check_data_path(args, folders: List[str], errors: List[str]):
    if not args.data_path:
        errors.append('--data_path: required; point it at a folder holding ' + ' and '.join(f'{f}/' for f in folders)
                      + ' with one sub-folder of images per class (the ImageNet layout)')
        return
    if not os.path.isdir(args.data_path):
        errors.append(f'--data_path {args.data_path}: no such folder')
        return
    missing = [f'{folder}/' for folder in folders if not os.path.isdir(os.path.join(args.data_path, folder))]
    if missing:
        errors.append(f'--data_path {args.data_path}: has no {" or ".join(missing)} folder (expected '
                      f'{os.path.join(args.data_path, missing[0])}<class>/<image>)')


def check_checkpoint_path(flag: str, path: str, errors: List[str]):
    if path and not is_url(path):
        if not os.path.exists(path):
            errors.append(f'{flag} {path}: no such file')
        elif not os.path.isfile(path):
            errors.append(f'{flag} {path}: is a folder, not a checkpoint file')


def writable(path: str) -> bool:
    """True if `path` is (or could be created as) a writable folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def check_output(args, errors: List[str], training: bool = True):
    for flag in ('output_dir', 'log_dir'):
        path = getattr(args, flag, None)
        if flag == 'log_dir' and path == args.output_dir:
            continue
        if path and not writable(path):
            errors.append(f'--{flag} {path}: cannot create or write to this folder')
    if training and args.output_dir and not args.auto_resume and not args.overwrite and holds_a_run(args.output_dir):
        errors.append(f'--output_dir {args.output_dir}: already holds a run ({LAST}, log.txt); rerun without '
                      '--no_auto_resume to continue it, or add --overwrite to start over')
    if training and getattr(args, 'save_every_iters', 0) and args.save_every_iters % args.accum_iter:
        errors.append(f'--save_every_iters {args.save_every_iters}: must be a multiple of --accum_iter '
                      f'{args.accum_iter} (checkpoints are taken after an optimizer step)')


def check_classifier_args(args, classifiers: dict, maes: dict, errors: List[str]):
    """The checks fine-tuning and linear probing share."""
    check_ranges(args, errors)
    check_model(args, classifiers, ('classifier', 'an MAE (pretraining) model'), maes, 'main_pretrain.py', errors)
    if args.model in classifiers:
        check_patch_grid(args, default_patch_size(args.model), errors)
    check_data_path(args, ['val'] if args.eval else ['train', 'val'], errors)
    check_checkpoint_path('--finetune', args.finetune, errors)
    check_checkpoint_path('--resume', args.resume, errors)
    check_output(args, errors, training=not args.eval)
    if args.eval and not args.resume and not (args.auto_resume and args.output_dir
                                              and resumable_checkpoint_in(args.output_dir)):
        errors.append('--eval: no weights to evaluate; pass the fine-tuned or linear-probe checkpoint as --resume '
                      '(--finetune only sets the encoder training starts from)')


def raise_if_errors(errors: List[str]):
    if errors:
        raise UsageError('\n'.join(dict.fromkeys(errors)))


def parse_with(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, 'log_dir', None) is None and hasattr(args, 'output_dir'):
        args.log_dir = args.output_dir
    return args
