"""What fine-tuning and linear probing share around their epoch loops: what they read before any work (the
checkpoint, the sizes, the run's class list, the datasets, the --finetune weights), and the classifier built from
the flags (starting from its --finetune encoder)."""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from timm.layers import trunc_normal_

import models_vit
from util import checks, pixels, training_plan
from util.architecture import CLASSIFIER_KINDS, Architecture, architecture_of
from util.checkpoint_files import load_checkpoint
from util.output_dir import Resumable, find_resumable, holds_training_state
from util.classes import ClassListError, folder_classes, run_classes
from util.datasets import DataError, ImageFolderDataset, build_dataset, describe
from util.distributed import print0
from util.weights import check_heads_up_front, checkpoint_image_size, load_weights, model_state_from


@dataclass(frozen=True)
class Sizes:
    """The classifier's sizes for this run: the flags the user gave, the rest resolved (resolve_sizes)."""
    input_size: pixels.Size
    patch_size: Optional[int]  # None: the model's own
    nb_classes: int
    global_pool: bool

    def of_model(self) -> dict:
        """As models_vit.build_classifier takes them."""
        return dict(img_size=self.input_size, patch_size=self.patch_size, num_classes=self.nb_classes,
                    global_pool=self.global_pool)


@dataclass
class ClassifierRun:
    """What a fine-tuning or linear-probing run reads before any work."""
    resumable: Optional[Resumable]  # the checkpoint to continue from or evaluate
    sizes: Sizes
    classes: List[str]  # the run's class list, names in output order
    dataset_train: Optional[ImageFolderDataset]  # None with --eval
    dataset_val: ImageFolderDataset
    pretrained: Optional[dict]  # the --finetune checkpoint, for a fresh start


def read_up_front(args, world_size: int, global_pool_default: bool,
                  train_transform: Callable[[pixels.Size, bool], object]) -> Optional[ClassifierRun]:
    """The checkpoint, the sizes (resolve_sizes), class list, datasets and --finetune weights, each refused in one
    line if unusable, and the training plan checked; None when the run being resumed already finished --epochs
    (said in one line). `train_transform(input_size, arrays)` is the script's training transform (arrays: for the
    float tensors of util/arrays.py)."""
    resumable = find_resumable(args)  # --resume, or this --output_dir's checkpoint
    if args.eval:
        refusal = pixels.saved_normalization_refusal(pixels.normalization_of(args), resumable.checkpoint.get('args'),
                                                     resumable.path)
        if refusal:
            raise checks.UsageError(refusal)
    sizes = resolve_sizes(args, resumable, global_pool_default)
    if not args.eval and training_plan.check_rerun(resumable, args, world_size,
                                                   resolve=lambda run: sizes_of(run, None, global_pool_default)):
        return None
    classes = classes_for_run(args, resumable, sizes.nb_classes)
    if len(classes) > sizes.nb_classes:  # the head must have room for the run's classes
        raise DataError(f'--nb_classes {sizes.nb_classes}: {args.data_path} has {len(classes)} classes; pass '
                        '--nb_classes of at least that')
    dataset_train = None
    if not args.eval:
        dataset_train = build_dataset(True, args, sizes.input_size, classes,
                                      lambda arrays: train_transform(sizes.input_size, arrays))
        training_plan.check_training_plan(len(dataset_train), dataset_train.root, args, world_size, resumable)
    dataset_val = build_dataset(False, args, sizes.input_size, classes)
    return ClassifierRun(resumable, sizes, classes, dataset_train, dataset_val, read_pretrained(args, resumable))


def resolve_sizes(args, resumable: Optional[Resumable], global_pool_default: bool) -> Sizes:
    """--input_size, --patch_size, --nb_classes and the pooling, those the user left out filled in: with --eval
    from the checkpoint (so a checkpoint evaluates without its sizes typed again), else 224 px, the model's patch,
    1000 classes and the script's pooling (the official defaults). The patch grid is checked (UsageError)."""
    arch, image_size = None, None
    if args.eval:
        state = model_state_from(resumable.checkpoint, resumable.path)
        arch, image_size = architecture_of(state), checkpoint_image_size(resumable.checkpoint, state)
    sizes = sizes_of(args, arch, global_pool_default, image_size)
    patch = sizes.patch_size or models_vit.default_patch_size(models_vit.MODELS[args.model])
    errors = []
    checks.check_patch_grid(sizes.input_size, patch, errors)
    checks.raise_if_errors(errors)
    return sizes


def sizes_of(args, arch: Optional[Architecture], global_pool_default: bool,
             image_size: Optional[pixels.Size] = None) -> Sizes:
    """The sizes args give, those left unset taken from `arch` (a classifier's checkpoint; image_size: its images',
    util/weights.checkpoint_image_size), else the defaults. Also reads the saved args of a run being resumed, which
    may lack a flag (the official scripts have no --patch_size) or hold the values resolved (ours before, the
    official code)."""
    from_checkpoint = arch is not None and arch.kind in CLASSIFIER_KINDS

    def given_or(name, from_arch, default):
        value = getattr(args, name, None)
        return value if value is not None else (from_arch if from_checkpoint else default)
    return Sizes(input_size=given_or('input_size', image_size or (arch and arch.grid and arch.img_size) or 224, 224),
                 patch_size=given_or('patch_size', arch and arch.patch_size, None),
                 nb_classes=given_or('nb_classes', arch and arch.num_classes, 1000),
                 global_pool=given_or('global_pool', arch and arch.global_pool, global_pool_default))


def classes_for_run(args, resumable: Optional[Resumable], nb_classes: int) -> List[str]:
    """The run's class list (util/classes.py). Training: train/'s folders, which must be those of the run being
    resumed. --eval: the checkpoint's stored list, else train/'s, else ImageNet order or val/'s own."""
    train_root, val_root = (os.path.join(args.data_path, split) for split in ('train', 'val'))
    stored = resumable.classes if resumable is not None else None
    if args.eval:
        return run_classes(stored, train_root, val_root, nb_classes)
    classes = folder_classes(train_root)
    if stored is not None and list(stored) != classes:
        raise ClassListError(f'{train_root}: its {len(classes)} class folders are not the {len(stored)} classes of '
                             f'the run in {resumable.path}; a resumed run must see the same classes (choose '
                             'another --output_dir to start a new run)')
    return classes


def read_pretrained(args, resumable: Optional[Resumable]) -> Optional[dict]:
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


def build_model(args, run: ClassifierRun, head_init_std: float,
                drop_path_rate: float = 0.0) -> models_vit.VisionTransformer:
    """The --model classifier in the run's sizes; with --finetune it starts from that checkpoint's encoder and a
    fresh head drawn from trunc_normal(std=head_init_std): 2e-5 for fine-tuning, 0.01 for linear probing (the
    official values)."""
    model = models_vit.build_classifier(args.model, **run.sizes.of_model(), in_chans=args.in_chans, attn_impl=args.attn,
                                        drop_path_rate=drop_path_rate)
    if run.pretrained is not None:
        load_weights(model, run.pretrained, args.finetune, args.model, pretrained=True)
        trunc_normal_(model.head.weight, std=head_init_std)
    return model


def describe_data(run: ClassifierRun) -> str:
    return f'train {describe(run.dataset_train)}; val {len(run.dataset_val):,} images'


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
