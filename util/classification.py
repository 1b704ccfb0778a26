"""What fine-tuning and linear probing share around their epoch loops: the checks of their flags, the run's class
list, the datasets and loaders, the classifier built from the flags (starting from its --finetune encoder), and
the best-accuracy bookkeeping."""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from timm.layers import trunc_normal_

import models_mae
import models_vit
from util import checks, plan
from util.checkpoint_io import load_checkpoint
from util.checkpoint_weights import model_state_from
from util.checkpointer import Resumable, find_resumable, holds_training_state, resumable_checkpoint_in
from util.classes import ClassListError, folder_classes, run_classes
from util.datasets import DataError, ImageFolderDataset, build_image_folder, build_loader, describe
from util.distributed import get_rank, print0
from util.state_dicts import CLASSIFIER_KINDS, architecture_of, check_heads_up_front, load_pretrained_encoder
from util.transforms import build_eval_transform


def check_classifier_args(args, errors: List[str]):
    """The checks fine-tuning and linear probing share."""
    checks.check_model_args(args, models_vit.MODELS, 'classifier', models_mae.MODELS, 'an MAE (pretraining) model',
                            'main_pretrain.py', errors)
    checks.check_data_path(args.data_path, ['val'] if args.eval else ['train', 'val'], errors)
    checks.check_checkpoint_path('--finetune', args.finetune, errors)
    checks.check_checkpoint_path('--resume', args.resume, errors)
    checks.check_output(args, errors, training=not args.eval)
    if args.eval and not args.resume and not (args.auto_resume and args.output_dir
                                              and resumable_checkpoint_in(args.output_dir)):
        errors.append('--eval: no weights to evaluate; pass the fine-tuned or linear-probe checkpoint as --resume '
                      '(--finetune only sets the encoder training starts from)')


@dataclass
class ClassifierRun:
    """What a fine-tuning or linear-probing run reads before any work."""
    resumable: Optional[Resumable]  # the checkpoint to continue from or evaluate
    classes: List[str]  # the run's class list, names in output order
    dataset_train: Optional[ImageFolderDataset]  # None with --eval
    dataset_val: ImageFolderDataset
    encoder: Optional[dict]  # the --finetune checkpoint (weights under 'model'), for a fresh start


def read_up_front(args, train_transform_for: Callable, world_size: int,
                  global_pool_default: bool) -> Optional[ClassifierRun]:
    """The checkpoint, the sizes (resolve_sizes), class list, datasets and --finetune weights, each refused in one
    line if unusable, and the training plan checked; None when the run being resumed already finished --epochs
    (said in one line). `train_transform_for(args)` builds the training transform once the sizes are known."""
    resumable = find_resumable(args)  # --resume, or this --output_dir's checkpoint
    resolve_sizes(args, resumable, global_pool_default)
    if not args.eval and plan.nothing_to_train(resumable, args, world_size):
        return None
    classes = classes_for_run(args, resumable)
    dataset_train, dataset_val = build_datasets(args, classes, None if args.eval else train_transform_for(args),
                                                build_eval_transform(args.input_size))
    if dataset_train is not None:
        plan.check_training_plan(len(dataset_train), dataset_train.root, args, world_size, resumable)
    return ClassifierRun(resumable, classes, dataset_train, dataset_val, read_encoder(args, resumable))


def resolve_sizes(args, resumable: Optional[Resumable], global_pool_default: bool):
    """Fill --input_size, --patch_size, --nb_classes and the pooling the user left out: with --eval from the
    checkpoint (so a checkpoint evaluates without its sizes typed again), else 224 px, the model's patch, 1000
    classes and the script's pooling (the official defaults). Then the patch grid is checked."""
    arch = architecture_of(model_state_from(resumable.checkpoint, resumable.path)) if args.eval else None
    from_checkpoint = arch is not None and arch.kind in CLASSIFIER_KINDS
    if args.patch_size is None and from_checkpoint:
        args.patch_size = arch.patch_size
    if args.input_size is None:
        args.input_size = arch.img_size if from_checkpoint and arch.grid else 224
    if args.nb_classes is None:
        args.nb_classes = arch.num_classes if from_checkpoint else 1000
    if args.global_pool is None:
        args.global_pool = arch.global_pool if from_checkpoint else global_pool_default
    patch = args.patch_size or models_vit.default_patch_size(models_vit.MODELS[args.model])
    errors = []
    checks.check_patch_grid(args.input_size, patch, errors)
    checks.raise_if_errors(errors)


def classes_for_run(args, resumable: Optional[Resumable]) -> List[str]:
    """The run's class list (util/classes.py). Training: train/'s folders, which must be those of the run being
    resumed. --eval: the checkpoint's stored list, else train/'s, else ImageNet order or val/'s own."""
    train_root, val_root = (os.path.join(args.data_path, split) for split in ('train', 'val'))
    stored = resumable.classes if resumable is not None else None
    if args.eval:
        return run_classes(stored, train_root, val_root, args.nb_classes)
    classes = folder_classes(train_root)
    if stored is not None and list(stored) != classes:
        raise ClassListError(f'{train_root}: its {len(classes)} class folders are not the {len(stored)} classes of '
                             f'the run in {resumable.path}; a resumed run must see the same classes (choose '
                             'another --output_dir to start a new run)')
    return classes


def build_datasets(args, classes: List[str], train_transform, eval_transform
                   ) -> Tuple[Optional[ImageFolderDataset], ImageFolderDataset]:
    """train/ (none with --eval) and val/, labelled by the run's class list; the head must have room for it."""
    if len(classes) > args.nb_classes:
        raise DataError(f'--nb_classes {args.nb_classes}: {args.data_path} has {len(classes)} classes; pass '
                        '--nb_classes of at least that')
    dataset_train = None
    if not args.eval:
        dataset_train = build_image_folder(os.path.join(args.data_path, 'train'), train_transform, classes=classes,
                                           max_pixels=args.max_image_pixels)
    dataset_val = build_image_folder(os.path.join(args.data_path, 'val'), eval_transform, classes=classes,
                                     max_pixels=args.max_image_pixels, substitute=False)
    return dataset_train, dataset_val


def build_loaders(run: ClassifierRun, args, runtime, world_size: int):
    loader_train = None if run.dataset_train is None else build_loader(run.dataset_train, args, runtime, True,
                                                                       get_rank(), world_size)
    loader_val = build_loader(run.dataset_val, args, runtime, False, get_rank(), world_size, dist_eval=args.dist_eval)
    return loader_train, loader_val


def read_encoder(args, resumable: Optional[Resumable]) -> Optional[dict]:
    """The --finetune checkpoint, read (and its weights found) before any work; none with --eval or when a training
    run is resumed (its checkpoint replaces them)."""
    if args.eval:
        return None
    if not args.finetune:
        if not holds_training_state(resumable):
            print0('Note: no --finetune: the encoder starts from random weights (pass --finetune with an MAE '
                   'checkpoint to start from pretrained features)')
        return None
    if holds_training_state(resumable):
        print0(f'--finetune {args.finetune}: not read, the run continues from {resumable.path}')
        return None
    checkpoint = load_checkpoint(args.finetune)
    model_state_from(checkpoint, args.finetune)  # a file without weights stops the run here
    check_heads_up_front(checkpoint, args.finetune, args.model)
    return checkpoint


def build_classifier(args, encoder: Optional[dict], head_init_std: float,
                     drop_path_rate: float = 0.0) -> models_vit.VisionTransformer:
    """The --model classifier; with an encoder (--finetune) it starts from it and a fresh head drawn from
    trunc_normal(std=head_init_std): 2e-5 for fine-tuning, 0.01 for linear probing (the official values)."""
    model = models_vit.build_classifier(args.model, patch_size=args.patch_size, num_classes=args.nb_classes,
                                        global_pool=args.global_pool, img_size=args.input_size,
                                        attn_impl=args.attn, drop_path_rate=drop_path_rate)
    if encoder is not None:
        load_pretrained_encoder(model, encoder, args.finetune, args.model)
        trunc_normal_(model.head.weight, std=head_init_std)
    return model


def describe_data(run: ClassifierRun) -> str:
    return f'train {describe(run.dataset_train)}; val {len(run.dataset_val):,} images'


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
