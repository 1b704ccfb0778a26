"""Checks run on a command line before any work: each problem is one line naming the flag, the value and what
to do instead; the run exits with code 2 and writes nothing. Ranges here are what the code supports, not only
what the types allow (e.g. a mask ratio that hides no patch, an epoch with no optimizer step)."""
import os
from typing import Callable, Dict, List, Optional, Tuple

import models_vit
from util import hf_layout
from util.checkpoint_io import is_url
from util.checkpointer import LAST, holds_a_run
from util import distributed

Rule = Tuple[Callable[[object], bool], str]
# k-NN: (similarity - nearest) / T, in util/knn.ranked_classes, stays a finite float64 from here on (|sim| <= 1)
MIN_TEMPERATURE = 1e-300
DEMO_RUN_MARKER = 'demo_run.json'  # in an --output_dir the demo (tools/demo.py) made: it may replace that run


class UsageError(ValueError):
    """A bad command line; the message is one line per problem, naming the flag."""


# flag -> (accepted, requirement); a script checks the flags its parser has
RANGE_RULES: Dict[str, Rule] = {
    'batch_size': (lambda v: v >= 1, 'must be a positive integer'),
    'epochs': (lambda v: v >= 1, 'must be a positive integer'),
    'accum_iter': (lambda v: v >= 1, 'must be >= 1'),
    'input_size': (lambda v: v is None or v >= 1, 'must be a positive integer'),
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
    'color_jitter': (lambda v: v is None or v >= 0, 'must be >= 0'),
    'smoothing': (lambda v: 0 <= v < 1, 'must be in [0, 1)'),
    'reprob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
    'remode': (lambda v: v in ('pixel', 'rand', 'const'), 'choose from pixel, rand, const'),
    'recount': (lambda v: v >= 1, 'must be >= 1'),
    'mixup': (lambda v: v >= 0, 'must be >= 0'),
    'cutmix': (lambda v: v >= 0, 'must be >= 0'),
    'cutmix_minmax': (lambda v: v is None or (len(v) == 2 and 0 < v[0] < v[1] <= 1),
                      'must be two fractions, min < max, in (0, 1]'),
    'mixup_prob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
    'mixup_switch_prob': (lambda v: 0 <= v <= 1, 'must be in [0, 1]'),
    'mixup_mode': (lambda v: v in ('batch', 'pair', 'elem'), 'choose from batch, pair, elem'),
    'nb_classes': (lambda v: v is None or v >= 1, 'must be a positive integer'),
    'num_workers': (lambda v: v >= 0, 'must be >= 0'),
    'start_epoch': (lambda v: v >= 0, 'must be >= 0'),
    'save_freq': (lambda v: v >= 1, 'must be >= 1 (epochs between numbered checkpoints)'),
    'save_every_iters': (lambda v: v >= 0, 'must be >= 0 (0: off)'),
    'keep_last': (lambda v: v >= 0, 'must be >= 0 (0: keep all)'),
    'max_bad_images': (lambda v: v >= 0, 'must be >= 0'),
    'max_image_pixels': (lambda v: v >= 0, 'must be >= 0 (0: no limit)'),
    'print_freq': (lambda v: v >= 1, 'must be >= 1'),
    'dist_timeout': (lambda v: v > 0, 'must be > 0 minutes'),
    'knn_every': (lambda v: v >= 1, 'must be >= 1 (epochs between k-NN evaluations)'),
    'knn_k': (lambda v: v >= 1, 'must be >= 1'),
    'nb_knn': (lambda v: min(v) >= 1, 'every k must be >= 1'),
    'knn_temperature': (lambda v: v >= MIN_TEMPERATURE, f'must be >= {MIN_TEMPERATURE:g} (a positive float64)'),
    'temperature': (lambda v: v >= MIN_TEMPERATURE, f'must be >= {MIN_TEMPERATURE:g} (a positive float64)'),
    'knn_train_per_class': (lambda v: v >= 0, 'must be >= 0 (0: every image)'),
    'knn_val_per_class': (lambda v: v >= 0, 'must be >= 0 (0: every image)'),
    'train_per_class': (lambda v: v >= 0, 'must be >= 0 (0: every image)'),
    'val_per_class': (lambda v: v >= 0, 'must be >= 0 (0: every image)'),
    'query_chunk': (lambda v: v >= 1, 'must be >= 1'),
    'seed': (lambda v: 0 <= v < 2 ** 31, 'must be in [0, 2^31) (numpy seeds are 32-bit and each process adds '
                                          'its rank)'),
}


def check(condition: bool, flag: str, value, requirement: str, errors: List[str]):
    if not condition:
        errors.append(f'{flag} {value}: {requirement}')


def check_ranges(args, errors: List[str], rules: Optional[Dict[str, Rule]] = None):
    """Each flag of `rules` (default RANGE_RULES) that this script's parser has must be in range."""
    for name, (ok, requirement) in (rules or RANGE_RULES).items():
        if hasattr(args, name):
            check(ok(getattr(args, name)), f'--{name}', getattr(args, name), requirement, errors)


def check_model(model: str, models: dict, kind: str, other_models: dict, other_kind: str, other_script: str,
                errors: List[str]):
    if model in models:
        return
    if model in other_models:
        errors.append(f'--model {model}: that is {other_kind}; use it with {other_script}, here choose from '
                      f'{", ".join(models)}')
    else:
        errors.append(f'--model {model}: unknown {kind}; choose from {", ".join(models)}')


def check_model_args(args, models: dict, kind: str, other_models: dict, other_kind: str, other_script: str,
                     errors: List[str]) -> int:
    """The ranges of every flag, --model, and --input_size against the patch size. Returns the patch size in use
    (0 when --model is unknown)."""
    check_ranges(args, errors)
    check_model(args.model, models, kind, other_models, other_kind, other_script, errors)
    if args.model not in models:
        return 0
    patch = args.patch_size or models_vit.default_patch_size(models[args.model])
    if args.input_size is not None:  # else resolved later (util/classification.resolve_sizes)
        check_patch_grid(args.input_size, patch, errors)
    return patch


def check_patch_grid(input_size: int, patch_size: int, errors: List[str], flag: str = '--input_size'):
    if input_size >= 1 and patch_size >= 1 and input_size % patch_size:
        errors.append(f'{flag} {input_size}: must be divisible by the patch size {patch_size} (or pass '
                      '--patch_size)')


def check_mask_ratio(mask_ratio: float, input_size: int, patch_size: int, errors: List[str]):
    """Pretraining: the ratio must hide at least one patch (the loss is the mean over hidden patches, 0/0
    otherwise) and leave at least one visible (the encoder's input)."""
    if not (0 <= mask_ratio < 1) or input_size % patch_size or input_size < 1 or patch_size < 1:
        return  # reported by the range and grid checks
    num_patches = (input_size // patch_size) ** 2
    kept = int(num_patches * (1 - mask_ratio))  # as models_mae.random_masking counts them
    where = f'of the {num_patches} patches ({input_size} px images, {patch_size} px patches)'
    if kept == num_patches:
        errors.append(f'--mask_ratio {mask_ratio}: hides none {where}, and the loss is computed on hidden patches '
                      f'only; use at least {smallest_ratio_hiding_one(num_patches):.4g}')
    elif kept == 0:
        errors.append(f'--mask_ratio {mask_ratio}: leaves none {where} visible to the encoder; use at most '
                      f'{(num_patches - 1) / num_patches:.4g}')


def smallest_ratio_hiding_one(num_patches: int) -> float:
    ratio = 1 / num_patches
    while int(num_patches * (1 - ratio)) == num_patches:  # float rounding of L * (1 - 1/L)
        ratio *= 1.0001
    return ratio


def check_data_path(data_path: Optional[str], folders: List[str], errors: List[str], flag: str = '--data_path'):
    if not data_path:
        errors.append(f'{flag}: required; point it at a folder holding ' + ' and '.join(f'{f}/' for f in folders)
                      + ' with one sub-folder of images per class (the ImageNet layout)')
        return
    if not os.path.isdir(data_path):
        errors.append(f'{flag} {data_path}: no such folder')
        return
    missing = [f'{folder}/' for folder in folders if not os.path.isdir(os.path.join(data_path, folder))]
    if missing:
        errors.append(f'{flag} {data_path}: has no {" or ".join(missing)} folder (expected '
                      f'{os.path.join(data_path, missing[0])}<class>/<image>)')


def check_checkpoint_path(flag: str, path: str, errors: List[str]):
    if path and not is_url(path):
        if not os.path.exists(path):
            errors.append(f'{flag} {path}: no such file')
        elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, hf_layout.CONFIG_NAME)):
            errors.append(f'{flag} {path}: is a folder, not a checkpoint file (nor a Hugging Face model folder: it '
                          f'has no {hf_layout.CONFIG_NAME})')


def writable_folder(path: str) -> bool:
    """True if `path` is (or could be created as) a writable folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def writable_file(path: str) -> bool:
    """True if a file can be written at `path` (its folder exists and is writable, and it is not a folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    return not os.path.isdir(path) and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def check_output(args, errors: List[str], training: bool = True):
    folders = {'--output_dir': args.output_dir, '--log_dir': args.log_dir if args.log_dir != args.output_dir else ''}
    for flag, path in folders.items():
        if path and not writable_folder(path):
            errors.append(f'{flag} {path}: cannot create or write to this folder')
    if not training:
        return
    if args.output_dir and os.path.isfile(os.path.join(args.output_dir, DEMO_RUN_MARKER)) and not getattr(
            args, 'demo', False):  # only main_pretrain.py has --demo
        errors.append(f'--output_dir {args.output_dir}: holds the built-in demo\'s run; choose another --output_dir '
                      '(or rerun the demo with --demo)')
    if args.output_dir and not args.auto_resume and not args.overwrite and holds_a_run(args.output_dir):
        errors.append(f'--output_dir {args.output_dir}: already holds a run ({LAST}, log.txt); rerun without '
                      '--no_auto_resume to continue it, or add --overwrite to start over')
    if getattr(args, 'fsdp', False) and distributed.detect_launch(dist_on_itp=args.dist_on_itp).launcher == 'single':
        errors.append('--fsdp: shards over the processes of a launch; start the run with torchrun (e.g. torchrun '
                      '--nproc_per_node=8 ...) or SLURM')  # only pretraining and fine-tuning have --fsdp
    if args.save_every_iters and args.save_every_iters % args.accum_iter:
        errors.append(f'--save_every_iters {args.save_every_iters}: must be a multiple of --accum_iter '
                      f'{args.accum_iter} (checkpoints are taken after an optimizer step)')


def raise_if_errors(errors: List[str]):
    if errors:
        raise UsageError('\n'.join(dict.fromkeys(errors)))
