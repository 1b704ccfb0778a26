"""Checks run on a command line before any work: each problem is one line naming the flag, the value and what
to do instead; the run exits with code 2 and writes nothing. Ranges here are what the code supports, not only
what the types allow (e.g. an image side the patches do not divide, an output folder that holds another run).
The range of each single flag is declared with the flag (util/flags.py)."""
import os
from typing import List, Optional

import models_mae
import models_vit
from util import hf_layout, pixels, shards
from util.checkpoint_files import is_url
from util.output_dir import LAST, holds_a_run, resumable_checkpoint_in
from util.trackers import check_report_to
from util import distributed

DEMO_RUN_MARKER = 'demo_run.json'  # in an --output_dir the demo (tools/demo.py) made: it may replace that run


class UsageError(ValueError):
    """A bad command line; the message is one line per problem, naming the flag."""


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
    """--model, and --input_size against the patch size (each flag's own range is checked as it is parsed,
    util/flags.py). Returns the patch size in use (0 when --model is unknown)."""
    check_model(args.model, models, kind, other_models, other_kind, other_script, errors)
    if args.model not in models:
        return 0
    patch = args.patch_size or models_vit.default_patch_size(models[args.model])
    if args.input_size is not None:  # else resolved later (util/classification.resolve_sizes)
        check_patch_grid(args.input_size, patch, errors)
    if hasattr(args, 'in_chans'):
        pixels.check_args(args, errors)
    return patch


def check_patch_grid(input_size: pixels.Size, patch_size: int, errors: List[str], flag: str = '--input_size'):
    """Each side of the images (one int, or height and width) divisible by the patch side."""
    sides = pixels.height_width(input_size)
    if min(sides) >= 1 and patch_size >= 1 and any(side % patch_size for side in sides):
        shown = ' '.join(map(str, dict.fromkeys(sides)))
        errors.append(f'{flag} {shown}: must be divisible by the patch size {patch_size} (or pass '
                      '--patch_size)')


def check_data_path(data_path: Optional[str], folders: List[str], errors: List[str], flag: str = '--data_path'):
    if not data_path:
        errors.append(f'{flag}: required; point it at a folder holding ' + ' and '.join(f'{f}/' for f in folders)
                      + ' with one sub-folder of images per class (the ImageNet layout)')
        return
    if not os.path.isdir(data_path):
        errors.append(f'{flag} {data_path}: no such folder')
        return
    missing = [split for split in folders if not shards.layout_of_split(os.path.join(data_path, split))[0]]
    if missing:
        split = missing[0]
        names = '|'.join(shards.SPLIT_NAMES[split])
        errors.append(f'{flag} {data_path}: has no {" or ".join(f"{m}/" for m in missing)} folder (expected '
                      f'{os.path.join(data_path, split)}/<class>/<image>), nor {split} WebDataset shards '
                      f'(NAME-{names}-NNNN.tar) or Parquet files (data/{names}-*.parquet)')


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
    check_report_to(args.report_to, errors)
    if args.output_dir and os.path.isfile(os.path.join(args.output_dir, DEMO_RUN_MARKER)) and not getattr(
            args, 'demo', False):  # only main_pretrain.py has --demo
        errors.append(f'--output_dir {args.output_dir}: holds the built-in demo\'s run; choose another --output_dir '
                      '(or rerun the demo with --demo)')
    if (args.output_dir and not args.auto_resume and not args.overwrite and holds_a_run(args.output_dir)
            and not getattr(args, 'demo', False)):  # the demo decides itself whether it continues its own run
        errors.append(f'--output_dir {args.output_dir}: already holds a run ({LAST}, log.txt); rerun without '
                      '--no_auto_resume to continue it, or add --overwrite to start over')
    if getattr(args, 'fsdp', False) and distributed.detect_launch(dist_on_itp=args.dist_on_itp).launcher == 'single':
        errors.append('--fsdp: shards over the processes of a launch; start the run with torchrun (e.g. torchrun '
                      '--nproc_per_node=8 ...) or SLURM')  # only pretraining and fine-tuning have --fsdp
    if args.on_nonfinite != 'rollback':
        for flag in ('snapshot_every', 'max_rollbacks'):
            if getattr(args, flag) is not None:
                errors.append(f'--{flag} {getattr(args, flag)}: belongs to --on_nonfinite rollback; add it, or drop '
                              f'--{flag}')
    if args.save_every_iters and args.save_every_iters % args.accum_iter:
        errors.append(f'--save_every_iters {args.save_every_iters}: must be a multiple of --accum_iter '
                      f'{args.accum_iter} (checkpoints are taken after an optimizer step)')


def raise_if_errors(errors: List[str]):
    if errors:
        raise UsageError('\n'.join(dict.fromkeys(errors)))


def check_classifier_args(args, errors: List[str]):
    """The checks fine-tuning and linear probing share."""
    check_model_args(args, models_vit.MODELS, 'classifier', models_mae.MODELS, 'an MAE (pretraining) model',
                            'main_pretrain.py', errors)
    check_data_path(args.data_path, ['val'] if args.eval else ['train', 'val'], errors)
    check_checkpoint_path('--finetune', args.finetune, errors)
    check_checkpoint_path('--resume', args.resume, errors)
    check_output(args, errors, training=not args.eval)
    if args.eval and not args.resume and not (args.auto_resume and args.output_dir
                                              and resumable_checkpoint_in(args.output_dir)):
        errors.append('--eval: no weights to evaluate; pass the fine-tuned or linear-probe checkpoint as --resume '
                      '(--finetune only sets the encoder training starts from)')
