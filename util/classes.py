"""Class lists: which output index each class name is. One list per run, and labels are assigned by class *name*
through it, so a val/ folder that holds only some of the classes is scored against the right outputs.

Where a run's list comes from, first match wins:
1. the checkpoint being evaluated or resumed, which stores the list it was trained with (`'classes'`);
2. the `train/` folder of --data_path (sorted sub-folder names, the ImageFolder convention);
3. a 1000-output model whose val/ folders are ImageNet synsets: the standard ImageNet-1k order;
4. a val/ folder holding as many classes as the model has outputs: its sorted names.
Anything else (a val/ subset, no list anywhere) cannot be mapped, and is refused.
"""
from typing import List, Optional, Sequence

from util import shards
from util.folders import class_folders
from util.imagenet import imagenet_names, imagenet_synsets


class ClassListError(ValueError):
    """A class list cannot be formed or does not fit; the message is one line for the user."""


def folder_classes(root: str) -> List[str]:
    """The classes of a split (DATA_PATH/train or DATA_PATH/val): the class folders, sorted as torchvision sorts
    them, hidden and metadata folders left out (util/folders.py); of a split in WebDataset shards or Parquet files,
    the class names its samples carry, in the same order (util/shards.py); [] if there is no such split."""
    kind, files = shards.layout_of_split(root)
    if kind in ('wds', 'parquet'):
        return shards.class_names(shards.read_split(kind, files))
    return class_folders(root)[0]


def run_classes(stored: Optional[Sequence[str]], train_root: str, val_root: str, num_outputs: int) -> List[str]:
    """The run's class list (names in output order), following the order of precedence in the module docstring.
    `stored` is the list a checkpoint carries (None if it has none)."""
    if stored:
        return list(stored)
    train = folder_classes(train_root)
    if train:
        return train
    val = folder_classes(val_root)
    if num_outputs == 1000 and val and set(val) <= set(imagenet_synsets()):
        return imagenet_synsets()
    if len(val) == num_outputs:
        return val
    raise ClassListError(
        f'{val_root} holds {len(val)} classes and the model has {num_outputs} outputs, but neither the '
        f'checkpoint nor a train/ folder says which output each class is; put the train/ folder of the run '
        f'beside val/, or evaluate a checkpoint saved by this code (it stores its class list)')


def check_subset(folder: str, classes: Sequence[str], what: str = "the model's"):
    """Every class folder under `folder` must be one of `classes`; else one line naming the unknown ones."""
    known = set(classes)
    unknown = [name for name in folder_classes(folder) if name not in known]
    if unknown:
        shown = ', '.join(unknown[:5]) + (f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else '')
        raise ClassListError(f'{folder}: class folder{"s" if len(unknown) > 1 else ""} {shown} '
                             f'{"are" if len(unknown) > 1 else "is"} not among {what} {len(classes)} classes '
                             f'({", ".join(list(classes)[:5])}{" ..." if len(classes) > 5 else ""})')


def display_names(classes: Optional[Sequence[str]], num_outputs: int) -> List[str]:
    """Readable names for a model's outputs: ImageNet synsets become their names ('tabby cat'); a model without
    a stored list gets the ImageNet names for 1000 outputs, else 'class i'; outputs past the list (a head wider
    than the training set, --nb_classes above the class count) are 'unused output i'."""
    if not classes:
        if num_outputs == 1000:
            return imagenet_names()
        return [f'class {i}' for i in range(num_outputs)]
    synsets = imagenet_synsets()
    if set(classes) <= set(synsets):
        readable = dict(zip(synsets, imagenet_names()))
        classes = [readable[name] for name in classes]
    return list(classes)[:num_outputs] + [f'unused output {i}' for i in range(len(classes), num_outputs)]
