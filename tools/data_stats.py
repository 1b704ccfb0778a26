"""The per-channel mean and standard deviation of a dataset's training images, printed as the --mean / --std
flags to paste into the training commands (for images that are not ImageNet-like RGB photos):

python -m tools.data_stats /data/sentinel2    # reads /data/sentinel2/train; prints --in_chans 13 --mean ... --std ...

Every pixel of every image counts once, read the way training reads it (util/arrays.py for .npy, TIFF and images
of other than 3 channels: unsigned integers over their type's maximum, floats as stored; RGB photos as ToTensor
gives them), in one pass, combined per image in float64 (Chan's parallel formula: exact for data of any offset).
"""
import math
import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from util import flags as cli
from util import shards
from util.arrays import ArrayDecoder, ChannelMismatch, first_image_file, read_array
from util.checks import UsageError, check_data_path, raise_if_errors
from util.datasets import LEFT_OUT, DataError, build_image_folder, cap_per_class, reads_arrays
from util.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, decode_image, describe_error
from util.launch import raised_in_worker

Moments = Tuple[float, np.ndarray, np.ndarray]  # (pixels, per-channel mean, per-channel sum of squared deviations)


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.data_stats', "a dataset's per-channel mean and std, as --mean/--std")
    parser.add_argument('data_path', help='a folder holding train/ (or its shards), as --data_path takes it')
    parser.add_argument('--in_chans', default=None, type=int, check=cli.POSITIVE_INT,
                        help="the images' channel count (default: the first image's)")
    parser.add_argument('--max_images', default=0, type=int, check=cli.at_least(0),
                        help='read at most this many images per class (0: all)')
    parser.add_argument('--num_workers', default=min(8, os.cpu_count() or 1), type=int, check=cli.at_least(0),
                        help='DataLoader worker processes')
    return parser


def first_sample(root: str) -> Optional[Tuple[str, bytes]]:
    """(where, the bytes) of the split's first image: a folder's first file in listing order, or the first sample
    of its shards or Parquet files ('SOURCE:KEY'); None when there is none (the dataset reports why)."""
    kind, files = shards.layout_of_split(root)
    if kind in ('wds', 'parquet'):
        try:
            records = shards.read_split(kind, files)
        except shards.LayoutError:
            return None
        if not records:
            return None
        reader = shards.sample_reader(kind)
        return f'{records[0].source}:{records[0].key}', reader.read(records[0])
    path = first_image_file(root)
    if not path:
        return None
    with open(path, 'rb') as f:
        return path, f.read()


def first_sample_channels(where: str, data: bytes) -> int:
    """The channel count of an image as util/arrays.py reads it (greyscale 1, RGB 3, a .npy its last axis);
    DataError naming it when it cannot be read."""
    try:
        if not isinstance(data, bytes):
            raise ValueError('the sample holds no image bytes (a path only)')
        return read_array(data, 0).shape[2]
    except DECODE_ERRORS as e:
        raise DataError(f'{where}: cannot read the first image to count its channels ({describe_error(e)}); pass '
                        '--in_chans') from None


def image_moments(image: torch.Tensor) -> Moments:
    """[C, H, W] -> (H*W, mean [C], sum of squared deviations [C]), in float64."""
    values = image.reshape(image.shape[0], -1).double()
    mean = values.mean(dim=1)
    return values.shape[1], mean.numpy(), ((values - mean[:, None]) ** 2).sum(dim=1).numpy()


def combine(a: Moments, b: Moments) -> Moments:
    """The moments of two sets of pixels together (Chan, Golub and LeVeque's pairwise update)."""
    n = a[0] + b[0]
    delta = b[1] - a[1]
    return n, a[1] + delta * b[0] / n, a[2] + b[2] + delta ** 2 * a[0] * b[0] / n


def only_sample(batch: list):
    return batch[0]


def dataset_moments(dataset, num_workers: int) -> Optional[Moments]:
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers, collate_fn=only_sample)
    total, start, shown = None, time.time(), -1
    for i, (image, target) in enumerate(loader):
        if target != LEFT_OUT:  # an unreadable image (reported by the dataset) counts nowhere
            moments = image_moments(image)
            total = moments if total is None else combine(total, moments)
        percent = 100 * (i + 1) // len(dataset)
        if percent != shown:  # a progress bar on stderr, redrawn once per percent
            shown = percent
            done = '#' * (percent // 4)
            print(f'\r[{done:<25}] {percent:3d}%  {i + 1:,}/{len(dataset):,} images  '
                  f'{time.time() - start:.0f} s', end='', file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return total


def flags_line(in_chans: int, mean: List[float], std: List[float]) -> str:
    return (f'--in_chans {in_chans} --mean {" ".join(f"{m:.4g}" for m in mean)} '
            f'--std {" ".join(f"{s:.4g}" for s in std)}')


def main(argv=None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    errors = []
    check_data_path(args.data_path, ['train'], errors)
    raise_if_errors(errors)
    root = os.path.join(args.data_path, 'train')
    in_chans, decoder, first = args.in_chans, None, None
    if in_chans is None:
        first = first_sample(root)
        in_chans = first_sample_channels(*first) if first else 3
    as_arrays = reads_arrays(root, in_chans)
    if as_arrays and first:  # a mismatch names the image the count came from, not a flag
        decoder = ArrayDecoder(in_chans, f'the first image ({first[0]}) has {in_chans}; all images of a dataset '
                                         'have the same channel count')
    dataset = build_image_folder(root, None if as_arrays else transforms.ToTensor(), decoder or decode_image,
                                 max_pixels=DEFAULT_MAX_PIXELS, substitute=False,
                                 in_chans=in_chans if as_arrays else None)
    dataset = cap_per_class(dataset, args.max_images)
    print(f'{root}: {len(dataset):,} images, {in_chans} channel{"s" * (in_chans > 1)}'
          f'{" (read as arrays)" if as_arrays else " (RGB, as ToTensor gives them)"}', file=sys.stderr)
    moments = dataset_moments(dataset, args.num_workers)
    if moments is None:
        raise DataError(f'{root}: no image could be read')
    n, mean, m2 = moments
    std = [math.sqrt(v / n) for v in m2]
    print(f'pixels: {n:,} per channel; mean and std in the units the model reads (integers over their type\'s '
          'maximum)', file=sys.stderr)
    print(flags_line(in_chans, list(mean), std))
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (UsageError, DataError, ChannelMismatch, *DECODE_ERRORS) as e:
        print(f'error: {raised_in_worker(str(e)).splitlines()[0]}', file=sys.stderr)
        sys.exit(2)
