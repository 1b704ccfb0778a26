"""ImageFolder datasets under --data_path (`train/`, `val/`, one sub-folder per class) and their loaders.

Labels come from the run's class list (util/classes.py), by class name; folders are walked by util/folders.py's
rule (hidden and metadata entries are not data). A file that cannot be decoded is reported once: in training it is
replaced by the next one instead of ending the run, in evaluation it is left out of every count. Evaluation shards
the images over the ranks without padding, so each one is counted exactly once.
"""
import collections
import io
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision import datasets

from util import arrays, pixels, shards
from util.bad_images import BadImageLog
from util.distributed import get_rank, print0
from util.folders import ARRAY_IMG_EXTENSIONS, IMG_EXTENSIONS, class_folders, describe_skipped, image_files
from util.imagenet import imagenet_aliases
from util.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_image, describe_error
from util.preemption import ignore_stop_signals_in_workers, stop_workers_at_exit
from util.rng import loader_seed
from util.transforms import build_eval_transform, build_finetune_transform

MAX_CONSECUTIVE_BAD = 20
NOTED_HEADER_PASS = 10_000  # images whose headers take long enough to read that the console says why it waits


class DataError(RuntimeError):
    """The dataset cannot be used; the message is one line for the user."""


LEFT_OUT = -1  # the target of an evaluation sample that could not be read: counted nowhere


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder (the same samples in the same order; hidden and metadata entries aside, GIFs
    added), with these changes:
    - folders are walked by util/folders.py's rule: hidden entries and other systems' metadata are not data;
    - with `classes` (the run's class list) each folder's label is its name's index in that list, and a folder
      not in the list is refused; without it, the sorted folder names are the list (torchvision's rule);
    - a file that cannot be decoded (or has more than `max_pixels` pixels) is reported to `bad_images`; with
      `substitute` (training) it is replaced by the next readable one, so an epoch keeps its batches; without it
      (evaluation) the sample is a blank image with target LEFT_OUT, which the evaluation leaves out of every
      count: it never scores another image in its place."""

    def __init__(self, root: str, transform=None, decode: Callable = decode_image,
                 classes: Optional[Sequence[str]] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 substitute: bool = True):
        self.run_classes = list(classes) if classes is not None else None
        self.skipped: List[str] = []  # hidden and metadata entries, filled by the scan
        self.decode = decode  # before the scan: a run that reads arrays lists .npy files too
        super().__init__(root, transform=transform)
        self.max_pixels = max_pixels
        self.substitute = substitute
        self.bad_images = BadImageLog('replaced by another sample' if substitute else 'left out of the evaluation')
        note = describe_skipped(root, self.skipped)
        if note:
            print0(note)

    def find_classes(self, directory: str):
        found, skipped = class_folders(directory)
        self.skipped += [os.path.join(directory, name) for name in skipped]
        if not found:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return run_class_index(directory, found, self.run_classes, ('class folder', 'class folders'))

    def make_dataset(self, directory: str, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """torchvision's samples and order (its make_dataset), by util/folders.py's walk."""
        samples, empty = [], []
        extensions = ARRAY_IMG_EXTENSIONS if isinstance(self.decode, arrays.ArrayDecoder) else IMG_EXTENSIONS
        for name in sorted(class_to_idx):
            files, skipped = image_files(os.path.join(directory, name), extensions)
            self.skipped += skipped
            samples += [(path, class_to_idx[name]) for path in files]
            if not files:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(empty)}. Supported extensions '
                                    f'are: {", ".join(IMG_EXTENSIONS)}')
        return samples

    def read(self, path: str):
        with open(path, 'rb') as f:
            return self.decode(f, self.max_pixels)

    def __getitem__(self, index: int):
        for _ in range(MAX_CONSECUTIVE_BAD):
            path, target = self.samples[index]
            try:
                img = self.read(path)
            except DECODE_ERRORS as e:
                self.bad_images.report(path, e)
                if not self.substitute:
                    return self.blank(), LEFT_OUT
                index = (index + 1) % len(self.samples)
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise DataError(f'{MAX_CONSECUTIVE_BAD} unreadable images in a row up to {path}: is the dataset intact?')

    def blank(self):
        """What stands in for an unreadable evaluation image in its batch: a black image through the transform
        (the evaluation transforms give every image the same size)."""
        if isinstance(self.decode, arrays.ArrayDecoder):
            img = torch.zeros(self.decode.in_chans, 64, 64)
        else:
            img = Image.new('RGB', (64, 64))
        return self.transform(img) if self.transform is not None else img


class IndexedImageDataset(ImageFolderDataset):
    """A split stored as WebDataset tar shards or Parquet files (util/shards.py), with everything of
    ImageFolderDataset: labels by class name against the run's list, unreadable samples reported (by shard and key)
    and replaced or left out, --max_image_pixels, --fast_decode's decoder. `samples` holds ('SOURCE:KEY', target);
    `groups` the index ranges a reader takes front to back (a shard, a row group), for shard_aware_order."""

    def __init__(self, root: str, kind: str, files: List[str], transform=None, decode: Callable = decode_image,
                 classes: Optional[Sequence[str]] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 substitute: bool = True):
        try:
            records = shards.read_split(kind, files)
        except shards.LayoutError as e:
            raise DataError(str(e)) from None
        if not records:
            raise DataError(f'{root}: its {shards.describe_layout(kind, files)} hold no sample')
        self.run_classes = list(classes) if classes is not None else None
        self.classes, self.class_to_idx = run_class_index(root, shards.class_names(records), self.run_classes,
                                                          ('class', 'classes'),
                                                          found_are_indices=all(r.label == str(r.index)
                                                                                for r in records))
        self.root, self.kind, self.files = root, kind, files
        self.locations = {f'{r.source}:{r.key}': r for r in records}
        self.samples = self.imgs = [(f'{r.source}:{r.key}', self.class_to_idx[r.label]) for r in records]
        self.targets = [target for _, target in self.samples]
        self.transform, self.target_transform, self.loader = transform, None, None
        self.decode, self.max_pixels, self.substitute = decode, max_pixels, substitute
        self.skipped: List[str] = []
        self.bad_images = BadImageLog('replaced by another sample' if substitute else 'left out of the evaluation')
        self.mixed = shards.mixed_row_groups(files) if kind == 'parquet' else shards.SHARDS_MIXED
        self.regroup()
        self.reader, self.reader_pid = None, None  # opened in the process that reads (each loader worker its own)

    def sorted_by_class(self) -> bool:
        """Whether the shards hold their samples grouped by class (written by walking the class folders) rather
        than shuffled: neighbours within a shard share their class far more often than shuffled ones would
        (more than half the time, and twice the chance of two random samples)."""
        same = pairs = 0
        for start, end in self.groups:
            targets = self.targets[start:end]
            pairs += len(targets) - 1
            same += sum(a == b for a, b in zip(targets, targets[1:]))
        chance = sum((count / len(self.targets)) ** 2 for count in collections.Counter(self.targets).values())
        return pairs > 0 and same / pairs > max(0.5, 2 * chance)

    def regroup(self):
        """`groups` from the samples as they are now (after cap_per_class keeps some)."""
        records = [self.locations[path] for path, _ in self.samples]
        self.groups = group_ranges([(r.source, r.offset if self.kind == 'parquet' else 0) for r in records])

    def read(self, path: str):
        if self.reader_pid != os.getpid():  # a forked worker inherits the parent's open files and their position:
            # reading through them would race with its siblings (check_channels reads in the main process first)
            self.reader = shards.sample_reader(self.kind)
            self.reader_pid = os.getpid()
        return self.decode(SampleBytes(self.reader.read(self.locations[path]), path), self.max_pixels)

    def __getstate__(self):
        return {**self.__dict__, 'reader': None, 'reader_pid': None}  # a worker opens its own files


class SampleBytes(io.BytesIO):
    """A sample's bytes, shown as its SHARD:KEY where a decoder's error message shows the file it read."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __repr__(self) -> str:
        return repr(self.where)


def run_class_index(where: str, found: List[str], run_classes: Optional[List[str]], nouns: Tuple[str, str],
                    found_are_indices: bool = False):
    """(the class list, {found name: its output index}) of a split: without the run's list, the found names' own
    (sorted) list; with it, each found name's index in it (ImageNet's classes under any of their names:
    util/imagenet.py), and a name not in it refused in one line (DataError, calling them `nouns`: singular and
    plural). found_are_indices: the names are class indices (shards with only .cls), not names."""
    if run_classes is None:
        return found, {name: i for i, name in enumerate(found)}
    index = {name: i for i, name in enumerate(run_classes)}
    aliases = imagenet_aliases(found, run_classes, found_are_indices)
    index.update({name: index[alias] for name, alias in aliases.items()})
    unknown = [name for name in found if name not in index]
    if unknown:
        shown = ', '.join(unknown[:5]) + (f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else '')
        raise DataError(f'{where}: {nouns[len(unknown) > 1]} {shown} not among the '
                        f"run's {len(index)} classes ({', '.join(run_classes[:4])}"
                        f'{" ..." if len(index) > 4 else ""}); the model has no output for '
                        f'{"them" if len(unknown) > 1 else "it"}')
    return list(run_classes), {name: index[name] for name in found}


def group_ranges(keys: list) -> List[tuple]:
    """[(start, end)] of the runs of equal consecutive keys."""
    ranges, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            ranges.append((start, i))
            start = i
    return ranges


def build_image_folder(root: str, transform, decode: Callable = decode_image,
                       classes: Optional[Sequence[str]] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                       substitute: bool = True, in_chans: Optional[int] = None) -> ImageFolderDataset:
    """The split at `root` (DATA_PATH/train or DATA_PATH/val): a folder of class folders (ImageFolderDataset), or
    the same split stored in DATA_PATH as WebDataset shards or Parquet files (IndexedImageDataset). A one-line
    DataError when there is none, or it is empty or unreadable. substitute: True for training sets, False for
    evaluation sets (see ImageFolderDataset). in_chans: read the images as float tensors of that many channels
    (util/arrays.py; `transform` must take them; `decode` if it is an ArrayDecoder of that count), their channel
    counts checked now (check_channels), so that another count is refused before any work."""
    if in_chans is not None:
        decoder = decode if isinstance(decode, arrays.ArrayDecoder) else arrays.ArrayDecoder(in_chans)
        dataset = build_image_folder(root, transform, decoder, classes, max_pixels, substitute)
        check_channels(dataset)
        return dataset
    kind, files = shards.layout_of_split(root)
    if kind in ('wds', 'parquet'):
        return IndexedImageDataset(root, kind, files, transform=transform, decode=decode, classes=classes,
                                   max_pixels=max_pixels, substitute=substitute)
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such folder; --data_path must hold train/ and val/ with one sub-folder '
                        'per class (the ImageNet layout)')
    try:
        return ImageFolderDataset(root, transform=transform, decode=decode, classes=classes, max_pixels=max_pixels,
                                  substitute=substitute)
    except (FileNotFoundError, RuntimeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f'{root}: {str(e).splitlines()[0]} (expected {root}/<class>/<image>)') from None


def check_channels(dataset: ImageFolderDataset):
    """Before a run, an arrays dataset's channel counts from every image's header (ChannelMismatch for the first of
    another count than the run's: one line naming the file, nothing written): a folder's files; a shard's members
    where they lie, a Parquet file's image column (read once per version of the file: util/shards.py,
    image_shapes). Then the first images are read whole, so that a dataset none of whose images decode is refused
    now."""
    if isinstance(dataset, IndexedImageDataset):
        dataset.decode.check_shapes(indexed_image_shapes(dataset))
    else:
        dataset.decode.check_headers([path for path, _ in dataset.samples])
    first_error = None
    for path, _ in dataset.samples[:MAX_CONSECUTIVE_BAD]:
        try:
            dataset.read(path)
            return
        except DECODE_ERRORS as e:
            first_error = first_error or f'{path}: {describe_error(e)}'  # one bad file is reported when read
    if first_error:
        raise DataError(f'none of the first {min(len(dataset.samples), MAX_CONSECUTIVE_BAD)} images of '
                        f'{dataset.root} could be read; the first: {first_error}')


def indexed_image_shapes(dataset: 'IndexedImageDataset'):
    """('SOURCE:KEY', (H, W, C) or None) of every sample of a dataset in shards or Parquet, file by file."""
    by_source = collections.defaultdict(list)
    for path, _ in dataset.samples:
        by_source[dataset.locations[path].source].append(path)
    unread = sum(len(paths) for source, paths in by_source.items() if not shards.image_shapes_cached(source))
    if unread >= NOTED_HEADER_PASS:
        print0(f'checking the channel count of {unread:,} images in {dataset.root} (their headers; once per version '
              'of the files)', flush=True)
    for source, paths in by_source.items():
        shapes = shards.image_shapes(dataset.kind, source, [dataset.locations[p] for p in paths],
                                     arrays.stream_header_shape)
        yield from zip(paths, shapes)


def reads_arrays(root: str, in_chans: int) -> bool:
    """Whether the split at root is read as float tensors (util/arrays.py): any channel count but 3, or 3 channels
    stored as .npy arrays (a folder whose first class holds .npy files and no photo; shards whose first sample is
    one). 3-channel photos and TIFFs keep the official PIL path."""
    if in_chans != 3:
        return True
    kind, files = shards.layout_of_split(root)
    if kind == 'wds':
        try:
            records = shards.read_split(kind, files)
        except shards.LayoutError:
            return False  # reported in one line when the dataset is built
        return bool(records) and records[0].suffix == 'npy'
    return arrays.holds_only_arrays(root)


def build_transform(is_train: bool, args, input_size: Optional[pixels.Size] = None, arrays: bool = False):
    """The official entry point: the fine-tuning training transform (RandAugment --aa, random erasing --reprob,
    bicubic crops) or the evaluation transform (resize to input_size / 0.875, centre crop), of input_size px
    (default: args.input_size, as the official code reads it), normalised with the run's --mean/--std. arrays: for
    the float tensors of util/arrays.py."""
    size = input_size if input_size is not None else args.input_size
    normalization = pixels.normalization_of(args)
    if is_train:
        return build_finetune_transform(args, size, normalization, arrays)
    return build_eval_transform(size, normalization, arrays)


def build_dataset(is_train: bool, args, input_size: Optional[pixels.Size] = None,
                  classes: Optional[Sequence[str]] = None, make_transform=None) -> ImageFolderDataset:
    """The official entry point: args.data_path's train/ or val/ with build_transform(is_train, args), or
    `make_transform(arrays)` (linear probing's crops; arrays: whether it takes the float tensors of util/arrays.py).
    Labels: the run's `classes` by name, else the sorted folder names (ImageFolder's rule). Training sets replace
    an unreadable image by the next one, evaluation sets leave it out (ImageFolderDataset); --max_image_pixels
    applies where the script has it. Images of --in_chans other than 3, or .npy/TIFF files, are read as arrays."""
    root = os.path.join(args.data_path, 'train' if is_train else 'val')
    in_chans = getattr(args, 'in_chans', 3)
    as_arrays = reads_arrays(root, in_chans)
    if make_transform is not None:
        transform = make_transform(as_arrays)
    else:
        transform = build_transform(is_train, args, input_size, as_arrays)
    return build_image_folder(root, transform, classes=classes,
                              max_pixels=getattr(args, 'max_image_pixels', DEFAULT_MAX_PIXELS), substitute=is_train,
                              in_chans=in_chans if as_arrays else None)


def describe(dataset: ImageFolderDataset, training: bool = True) -> str:
    """'2,000 images of 8 classes in demo_output/data/train' (a folder), or '... in 4 shards of data/ (WebDataset)',
    for a run's header."""
    where = dataset.root
    if isinstance(dataset, IndexedImageDataset):
        where = f'{shards.describe_layout(dataset.kind, dataset.files)} in {os.path.dirname(dataset.root)}'
        where += ' (WebDataset)' if dataset.kind == 'wds' else ''
        if training and dataset.sorted_by_class():
            where += (f'; warning: its samples are sorted by class, and a batch draws on '
                      f'{min(dataset.mixed, len(dataset.groups))} shards at a time, so it sees few classes: write '
                      'them shuffled (tools/make_shards.py does)')
        if training and dataset.mixed < shards.SHARDS_MIXED:
            where += (f'; warning: its row groups are large, so a batch draws on {dataset.mixed} at a time (16 '
                      f'would not fit {shards.ROW_GROUP_BUDGET // 2 ** 20} MB per loader worker): write row groups '
                      'of 100 rows (tools/make_shards.py --parquet, or row_group_size= in pyarrow)')
    return f'{len(dataset):,} images of {len(set(dataset.targets))} classes in {where}'


def cap_per_class(dataset: ImageFolderDataset, per_class: int) -> ImageFolderDataset:
    """Keep the first `per_class` images of each class (0: keep all), in place: a fixed subset, the same on every
    rank and every run, chosen without drawing a random number. First in the split's stored order: sorted paths in
    folders, the files' own order in shards and Parquet (written shuffled: a random-like subset, but not the
    folders' one)."""
    if per_class <= 0:
        return dataset
    kept, seen = [], {}
    for path, target in dataset.samples:
        if seen.get(target, 0) < per_class:
            kept.append((path, target))
            seen[target] = seen.get(target, 0) + 1
    dataset.samples = dataset.imgs = kept
    dataset.targets = [target for _, target in kept]
    if isinstance(dataset, IndexedImageDataset):
        dataset.regroup()
    return dataset


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, sharded over ranks; also used for one process) that can
    start part-way through an epoch, so a resumed run sees exactly the samples the interrupted one had left.
    Image folders: rank r takes every world_size-th sample (DistributedSampler's), so iteration i of every rank
    takes from the same stretch of the epoch's order whatever the division. Shards and Parquet: the shard-aware
    order, each rank a consecutive share of it (its own shards), so a part-done epoch continues only in the
    division it began with (util/checkpointer.py: resumed_iteration)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        self.start_index = 0

    def skip(self, num_samples: int):
        """Leave out the first `num_samples` samples of this rank's share of the current epoch (all of it, at most)."""
        self.start_index = min(num_samples, self.num_samples)

    def __iter__(self):
        return iter(self.epoch_share()[self.start_index:])

    def epoch_share(self) -> List[int]:
        """This rank's sample indices of the current epoch, in order, from the epoch's start (skip() aside)."""
        groups = getattr(self.dataset, 'groups', None)
        if not self.shuffle or groups is None:  # image folders: DistributedSampler's own order
            return list(super().__iter__())
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = shard_aware_order(groups, generator, self.dataset.mixed)
        padding = self.total_size - len(order)  # as DistributedSampler pads
        order += (order * math.ceil(padding / len(order)))[:padding] if padding > len(order) else order[:padding]
        # consecutive stretches: a shard is read by one rank, but where a share ends mid-stretch
        return order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]

    def __len__(self):
        return self.num_samples - self.start_index


def shard_aware_order(groups: List[tuple], generator: torch.Generator, mixed: int = shards.SHARDS_MIXED) -> List[int]:
    """An epoch's order over a split read from shards or Parquet row groups (`groups`: their index ranges): the
    groups in a random order, taken `mixed` at a time (16; fewer for large Parquet row groups: util/shards.py:
    mixed_row_groups), their samples interleaved at random, each group's own
    samples in their stored order. A reader thus goes through every shard front to back (no seeking back), while a
    batch mixes samples of up to 16 shards, which are themselves shuffled when written (tools/make_shards.py, and
    the public ImageNet shards). A function of the generator's seed (seed + epoch) only: a resumed run, and every
    rank, computes the same order; ResumableSampler gives each rank a consecutive share of it, so that a shard is
    read by one rank (two where a share ends in its stretch), and each DataLoader worker of the rank opens it once
    (util/shards.py: OpenedLast)."""
    shuffled = torch.randperm(len(groups), generator=generator).tolist()
    order = []
    for first in range(0, len(shuffled), mixed):
        chosen = [groups[i] for i in shuffled[first:first + mixed]]
        draws = torch.cat([torch.full((end - start,), j) for j, (start, end) in enumerate(chosen)])
        cursors = [start for start, _ in chosen]
        for j in draws[torch.randperm(len(draws), generator=generator)].tolist():
            order.append(cursors[j])
            cursors[j] += 1
    return order


class ShardedEvalSampler(Sampler):
    """Rank r of w takes images r, r + w, r + 2w, ...: every image exactly once over the ranks, no padding (a
    rank may get none when there are fewer images than ranks). DistributedSampler pads with repeats, which
    counts some images twice in distributed evaluation."""

    def __init__(self, num_images: int, num_replicas: int, rank: int):
        self.indices: List[int] = list(range(rank, num_images, num_replicas))
        self.smallest_share = num_images // num_replicas  # the last rank's (a share is this or one more)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def batches_on_every_rank(loader: DataLoader) -> int:
    """How many batches of an evaluation loader every rank has (the ranks' shares differ by one image at most;
    a loader that is not sharded has the same batches on every rank)."""
    if not isinstance(loader.sampler, ShardedEvalSampler):
        return len(loader)
    return -(-loader.sampler.smallest_share // loader.batch_size)


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
    stop_workers_at_exit()  # its workers ignore SIGTERM: ended at exit by us, not by multiprocessing
    workers = usable_workers(args.num_workers)
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=workers,
                      pin_memory=args.pin_mem and runtime.pin_memory_supported, drop_last=train,
                      generator=generator, persistent_workers=args.persistent_workers and workers > 0,
                      worker_init_fn=ignore_stop_signals_in_workers)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity, as torch's DataLoader counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


CAPPED_WORKERS = set()  # the --num_workers values already said to be capped in this process


def usable_workers(num_workers: int) -> int:
    """--num_workers, but no more loader workers than the cores this process may use: more only compete for them
    (torch warns that it may freeze). The official default, 10, stays; the first time it is capped, one note says
    so. Note: each worker draws its own random crops, so a run's augmentations depend on the number used."""
    cpus = usable_cpus()
    if num_workers <= cpus:
        return num_workers
    if num_workers not in CAPPED_WORKERS:
        CAPPED_WORKERS.add(num_workers)
        print0(f'Note: --num_workers {num_workers} is more than the {cpus} CPU cores this process may use: '
               f'{cpus} loader worker{"s" * (cpus > 1)} instead')
    return cpus


def build_loaders(dataset_train, dataset_val, args, runtime, world_size: int) -> tuple:
    """(the training loader, None without a training set; the evaluation loader, sharded with --dist_eval) on this
    process's rank."""
    rank = get_rank()
    loader_train = None if dataset_train is None else build_loader(dataset_train, args, runtime, True, rank, world_size)
    loader_val = build_loader(dataset_val, args, runtime, False, rank, world_size, dist_eval=args.dist_eval)
    return loader_train, loader_val


def start_epoch_of(loader: DataLoader, epoch: int, rank: int, seed: int, skip_batches: int = 0):
    """Shuffle for `epoch`, reseed the workers for it, and skip batches already done when resuming."""
    loader.sampler.set_epoch(epoch)
    if skip_batches:
        loader.sampler.skip(skip_batches * loader.batch_size)
    loader.generator.manual_seed(loader_seed(seed, epoch, rank))
