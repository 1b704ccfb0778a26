"""Datasets, loaders and transforms of the official recipes: ImageFolder `train/` and `val/` under --data_path.

pretrain: RandomResizedCrop(scale 0.2-1, bicubic) + flip.  fine-tune: timm's create_transform with RandAugment,
random erasing; eval: resize to input_size / 0.875, centre crop.  linear probe: TF-style RandomResizedCrop + flip.
A file that cannot be decoded is reported once and replaced by the next one, instead of ending the run.
"""
import glob
import json
import os
import re
import socket
import struct
import tempfile
import weakref
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.crop import RandomResizedCrop as TFRandomResizedCrop

BICUBIC = InterpolationMode.BICUBIC


def normalize() -> transforms.Normalize:
    return transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_pretrain_transform(input_size: int, uint8_output: bool = False) -> transforms.Compose:
    """RandomResizedCrop(scale 0.2-1, bicubic) + flip. With uint8_output the workers stop before ToTensor and
    Normalize and `normalize_batch` finishes on the device: the same numbers, 4x fewer bytes to move."""
    to_tensor = [transforms.PILToTensor()] if uint8_output else [transforms.ToTensor(), normalize()]
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        *to_tensor,
    ])


def normalize_batch(samples: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to the device; a uint8 batch is then scaled and normalised there exactly as ToTensor and
    Normalize would have done it in the workers (divide by 255, subtract mean, divide by std, in float32)."""
    samples = samples.to(device, non_blocking=True)
    if samples.dtype != torch.uint8:
        return samples
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return samples.to(torch.float32).div(255).sub_(mean).div_(std)


def build_eval_transform(input_size: int) -> transforms.Compose:
    """Resize the short side to input_size / 0.875 (224 -> 256; no margin above 224 px), centre crop."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        normalize(),
    ])


def auto_augment_policy(aa: Optional[str]) -> Optional[str]:
    """--aa as timm takes it: 'none' or '' turn AutoAugment/RandAugment off."""
    return None if aa is None or aa.strip().lower() in ('', 'none') else aa


def build_finetune_train_transform(args) -> transforms.Compose:
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=auto_augment_policy(args.aa),
        interpolation='bicubic', re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return make_posterize_pillow13_safe(transform)


def build_linprobe_transform(is_train: bool, input_size: int) -> transforms.Compose:
    if not is_train:
        return build_eval_transform(input_size)
    return transforms.Compose([
        TFRandomResizedCrop(input_size, interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize(),
    ])


def build_transform(is_train: bool, args) -> transforms.Compose:
    """The fine-tuning transforms (official name and signature)."""
    return build_finetune_train_transform(args) if is_train else build_eval_transform(args.input_size)


class DataError(RuntimeError):
    """The dataset cannot be used; the message is one line for the user."""


# what PIL raises for truncated, corrupt or non-image files (ValueError: malformed PNG chunks and the like)
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)
MAX_CONSECUTIVE_BAD = 20
HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16B', 'I;16L', 'I', 'F')


def decode_rgb(f) -> Image.Image:
    """Decode an open image file to 3-channel RGB, as the official loader does (torchvision's pil_loader),
    except that 16-bit and float images are first scaled to 8 bits (see `to_8bit`)."""
    return to_8bit(Image.open(f)).convert('RGB')  # PIL decodes lazily: every decoding error surfaces here


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> 8-bit 'L', a 16-bit range scaled down; other modes are returned as they are.
    PIL's convert('RGB') clips such images at 255, which turns a 16-bit photo almost white."""
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return img
    array = np.asarray(img, dtype=np.float64)
    # I;16 is 16-bit by definition; 32-bit 'I' holds 8- or 16-bit content depending on the writer
    sixteen_bit = img.mode.startswith('I;16') or (img.mode == 'I' and array.max() > 255)
    scale = 255 / 65535 if sixteen_bit else 1.0
    return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), 'L')


class BadImageLog:
    """Unreadable files reported by any process (DataLoader workers included), collected in the main process.

    Reports are appended to a private temporary file, one JSON line each, not sent through a pipe: a pipe holds
    about 64 KiB, so a few hundred reports in one epoch would block the reporting process until the main
    process drains it after the epoch, which then never ends."""

    def __init__(self):
        remove_files_of_dead_processes()
        fd, self._path = tempfile.mkstemp(prefix=f'{report_file_prefix()}{os.getpid()}-', suffix='.jsonl')
        os.close(fd)
        self._bytes_read = 0
        self._reported_here = set()
        self.files: Dict[str, str] = {}  # path -> error, in the main process after collect()
        # forked workers share this object: only the creating process may delete the file
        weakref.finalize(self, _remove_if_owner, self._path, os.getpid())

    def __getstate__(self):  # what a spawned worker gets: where to write, nothing else
        return {'_path': self._path}

    def __setstate__(self, state):
        self._path, self._bytes_read, self._reported_here, self.files = state['_path'], 0, set(), {}

    def report(self, path: str, error: Exception):
        if path in self._reported_here:
            return
        self._reported_here.add(path)
        message = f'{type(error).__name__}: {error}'.splitlines()[0][:500]
        line = (json.dumps([path, message]) + '\n').encode()
        # one O_APPEND write per report, so lines from concurrent workers do not interleave
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def collect(self) -> List[str]:
        """Read new reports; print each new file once. Returns the newly seen paths."""
        with open(self._path, 'rb') as f:
            f.seek(self._bytes_read)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b'\n') + 1]  # a line still being written waits for the next call
        self._bytes_read += len(complete)
        new = []
        for line in complete.decode().splitlines():
            path, error = json.loads(line)
            if path not in self.files:
                self.files[path] = error
                new.append(path)
                print(f'Unreadable image replaced by another sample: {path} ({error})', flush=True)
        return new

    def __len__(self):
        return len(self.files)


def report_file_prefix() -> str:
    return f'mae-bad-images-{socket.gethostname()}-'


def remove_files_of_dead_processes():
    """Report files of processes on this host that were killed (SIGKILL runs no clean-up) are removed."""
    pattern = re.compile(re.escape(report_file_prefix()) + r'(\d+)-\w+\.jsonl$')
    for path in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), report_file_prefix() + '*.jsonl')):
        match = pattern.search(os.path.basename(path))
        if match and not process_alive(int(match.group(1))):
            remove_quietly(path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_if_owner(path: str, owner_pid: int):
    if os.getpid() == owner_pid:
        remove_quietly(path)


def remove_quietly(path: str):
    try:
        os.remove(path)
    except OSError:
        pass


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ImageFolder (same samples, classes and order), surviving bad files: a file that cannot be
    decoded is reported to `bad_images` and replaced by the next readable one, with that one's label."""

    def __init__(self, root: str, transform=None, decode: Callable = decode_rgb,
                 bad_images: Optional[BadImageLog] = None):
        super().__init__(root, transform=transform)
        self.decode = decode
        self.bad_images = bad_images if bad_images is not None else BadImageLog()

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


def build_image_folder(root: str, transform, decode: Callable = decode_rgb) -> ImageFolderDataset:
    """ImageFolder over `root` with a one-line DataError when the folder is missing, empty or has no images."""
    if not os.path.isdir(root):
        raise DataError(f'{root}: no such folder; --data_path must hold train/ and val/ with one sub-folder '
                        'per class (the ImageNet layout)')
    try:
        return ImageFolderDataset(root, transform=transform, decode=decode)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f'{root}: {str(e).splitlines()[0]} (expected {root}/<class>/<image>)') from None


def build_dataset(is_train: bool, args, transform=None) -> ImageFolderDataset:
    """ImageFolder over data_path/train or data_path/val, with the fine-tuning transforms by default."""
    root = os.path.join(args.data_path, 'train' if is_train else 'val')
    if transform is None:
        transform = build_transform(is_train, args)
    return build_image_folder(root, transform)


def build_classification_data(args, runtime, train_transform, eval_transform):
    """Train and val ImageFolders (no train set with --eval) and their loaders, with the class count checked."""
    dataset_val = build_image_folder(os.path.join(args.data_path, 'val'), eval_transform)
    dataset_train = None
    if not args.eval:
        dataset_train = build_image_folder(os.path.join(args.data_path, 'train'), train_transform)
    for dataset in (dataset_train, dataset_val):
        if dataset is not None and len(dataset.classes) > args.nb_classes:
            raise DataError(f'--nb_classes {args.nb_classes}: {dataset.root} has {len(dataset.classes)} classes; '
                            'pass --nb_classes of at least that')
    loader_train = None if dataset_train is None else build_loader(
        dataset_train, args, runtime, train=True, rank=args.rank, world_size=args.world_size)
    loader_val = build_loader(dataset_val, args, runtime, train=False, rank=args.rank,
                              world_size=args.world_size, dist_eval=args.dist_eval)
    return dataset_train, dataset_val, loader_train, loader_val


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


def build_loader(dataset, args, runtime, train: bool, rank: int = 0, world_size: int = 1,
                 dist_eval: bool = False) -> DataLoader:
    """Train loaders shuffle (resumably) and drop the last partial batch; eval loaders keep every sample."""
    if train:
        sampler = ResumableSampler(dataset, world_size, rank, shuffle=True, seed=args.seed)
    elif dist_eval and world_size > 1:
        if len(dataset) % world_size:
            print('Warning: enabling distributed evaluation with an eval dataset not divisible by process '
                  'number. This will slightly alter validation results as extra duplicate entries are added '
                  'to achieve equal num of samples per-process.', flush=True)
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True)  # shuffle: unbiased progress
    else:
        sampler = SequentialSampler(dataset)
    # a private generator: worker seeds never draw from (and shift) the global RNG that masking uses
    generator = torch.Generator()
    generator.manual_seed(loader_seed(args.seed, 0, rank))
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and runtime.pin_memory_supported, drop_last=train,
                      generator=generator, persistent_workers=getattr(args, 'persistent_workers', False)
                      and args.num_workers > 0)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 63)


def start_epoch_of(loader: DataLoader, epoch: int, rank: int, seed: int, skip_batches: int = 0):
    """Shuffle for `epoch`, reseed the workers for it, and skip batches already done when resuming."""
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)
    if skip_batches and hasattr(loader.sampler, 'skip'):
        loader.sampler.skip(skip_batches * loader.batch_size)
    loader.generator.manual_seed(loader_seed(seed, epoch, rank))


# --- RandAugment on Pillow >= 13 ---------------------------------------------------------------------------
# With magnitude noise (mstd0.5) the increasing Posterize reaches 0 bits in ~2 of 1,000 images. Pillow up to
# 12.x computed mask ~(2**8 - 1): every pixel became 0, a black image. Pillow 13 raises ValueError instead,
# which would kill a fine-tuning epoch. We keep the old outcome so the augmentation distribution is unchanged.

def posterize_any_bits(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))  # 0 bits kept: black, as Pillow < 13 made it


def make_posterize_pillow13_safe(transform):
    """Point every Posterize op of the RandAugment inside `transform` at posterize_any_bits (in place)."""
    for t in getattr(transform, 'transforms', [transform]):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith('Posterize'):
                    op.aug_fn = posterize_any_bits
    return transform
