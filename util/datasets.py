"""ImageFolder datasets under --data_path (`train/`, `val/`, one sub-folder per class) and their loaders.

Labels come from the run's class list (util/classes.py), by class name; a file that cannot be decoded is
reported once and replaced by the next one instead of ending the run; evaluation shards the images over the
ranks without padding, so each one is counted exactly once.
"""
import math
import os
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets

from util.bad_images import BadImageLog
from util.images import DECODE_ERRORS, decode_image
from util.preemption import ignore_ctrl_c_in_workers
from util.rng import loader_seed

MAX_CONSECUTIVE_BAD = 20


class DataError(RuntimeError):
    """The dataset cannot be used; the message is one line for the user."""


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder (same samples and order), with two changes:
    - with `classes` (the run's class list) each folder's label is its name's index in that list, and a folder
      not in the list is refused; without it, the sorted folder names are the list (torchvision's rule);
    - a file that cannot be decoded is reported to `bad_images` and replaced by the next readable one."""

    def __init__(self, root: str, transform=None, decode: Callable = decode_image,
                 classes: Optional[Sequence[str]] = None):
        self.run_classes = list(classes) if classes is not None else None
        super().__init__(root, transform=transform)
        self.decode = decode
        self.bad_images = BadImageLog()

    def find_classes(self, directory: str):
        found, class_to_idx = super().find_classes(directory)
        if self.run_classes is None:
            return found, class_to_idx
        index = {name: i for i, name in enumerate(self.run_classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            shown = ', '.join(unknown[:5]) + (f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else '')
            raise DataError(f'{directory}: class folder{"s" if len(unknown) > 1 else ""} {shown} not among the '
                            f"run's {len(index)} classes ({', '.join(self.run_classes[:4])}"
                            f'{" ..." if len(index) > 4 else ""}); the model has no output for '
                            f'{"them" if len(unknown) > 1 else "it"}')
        return list(self.run_classes), {name: index[name] for name in found}

    def read(self, path: str):
        with open(path, 'rb') as f:
            return self.decode(f)

    def __getitem__(self, index: int):
        for _ in range(MAX_CONSECUTIVE_BAD):
            path, target = self.samples[index]
            try:
                img = self.read(path)
            except DECODE_ERRORS as e:
                self.bad_images.report(path, e)
                index = (index + 1) % len(self.samples)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise DataError(f'{MAX_CONSECUTIVE_BAD} unreadable images in a row up to {path}: is the dataset intact?')


def build_image_folder(root: str, transform, decode: Callable = decode_image,
                       classes: Optional[Sequence[str]] = None) -> ImageFolderDataset:
    """ImageFolder over `root` with a one-line DataError when the folder is missing, empty or has no images."""
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such folder; --data_path must hold train/ and val/ with one sub-folder '
                        'per class (the ImageNet layout)')
    try:
        return ImageFolderDataset(root, transform=transform, decode=decode, classes=classes)
    except (FileNotFoundError, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f'{root}: {str(e).splitlines()[0]} (expected {root}/<class>/<image>)') from None


def describe(dataset: ImageFolderDataset) -> str:
    """'2,000 images of 8 classes in demo_output/data/train', for a run's header."""
    return f'{len(dataset):,} images of {len(set(dataset.targets))} classes in {dataset.root}'


def cap_per_class(dataset: ImageFolderDataset, per_class: int) -> ImageFolderDataset:
    """Keep the first `per_class` images of each class, in the folder's sorted order (0: keep all), in place: a
    fixed subset, the same on every rank and every run, chosen without drawing a random number."""
    if per_class <= 0:
        return dataset
    kept, seen = [], {}
    for path, target in dataset.samples:
        if seen.get(target, 0) < per_class:
            kept.append((path, target))
            seen[target] = seen.get(target, 0) + 1
    dataset.samples = dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    return dataset


def iterations_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Training iterations per epoch on each rank: the sampler gives each rank ceil(N / world) indices (padding
    with repeats, as DistributedSampler does) and the loader drops the last partial batch."""
    return math.ceil(num_images / world_size) // batch_size


# --- sampling and loading ------------------------------------------------------------------------------------

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, sharded over ranks; also used for one process) that can
    start part-way through an epoch, so a resumed run sees exactly the samples the interrupted one had left."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        self.start_index = 0

    def skip(self, num_samples: int):
        """Leave out the first `num_samples` samples of this rank's share of the current epoch."""
        self.start_index = num_samples

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self):
        return self.num_samples - self.start_index


class ShardedEvalSampler(Sampler):
    """Rank r of w takes images r, r + w, r + 2w, ...: every image exactly once over the ranks, no padding (a
    rank may get none when there are fewer images than ranks). DistributedSampler pads with repeats, which
    counts some images twice in distributed evaluation."""

    def __init__(self, num_images: int, num_replicas: int, rank: int):
        self.indices: List[int] = list(range(rank, num_images, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loader(dataset, args, runtime, train: bool, rank: int, world_size: int,
                 dist_eval: bool = False) -> DataLoader:
    """Train loaders shuffle (resumably, sharded over ranks) and drop the last partial batch. Eval loaders keep
    every image: sharded over the ranks with --dist_eval, else each rank reads them all."""
    if train:
        sampler = ResumableSampler(dataset, world_size, rank, shuffle=True, seed=args.seed)
    elif dist_eval:
        sampler = ShardedEvalSampler(len(dataset), world_size, rank)
    else:
        sampler = ShardedEvalSampler(len(dataset), 1, 0)
    # a private generator: worker seeds never draw from (and shift) the global RNG that masking uses
    generator = torch.Generator()
    generator.manual_seed(loader_seed(args.seed, 0, rank))
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and runtime.pin_memory_supported, drop_last=train,
                      generator=generator, persistent_workers=args.persistent_workers and args.num_workers > 0,
                      worker_init_fn=ignore_ctrl_c_in_workers)


def start_epoch_of(loader: DataLoader, epoch: int, rank: int, seed: int, skip_batches: int = 0):
    """Shuffle for `epoch`, reseed the workers for it, and skip batches already done when resuming."""
    loader.sampler.set_epoch(epoch)
    if skip_batches:
        loader.sampler.skip(skip_batches * loader.batch_size)
    loader.generator.manual_seed(loader_seed(seed, epoch, rank))
