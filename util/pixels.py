"""What a run's images are: their size (one side, or height and width), their channel count and the statistics
they are normalised with. Read from --input_size H [W], --in_chans N, --mean and --std; the defaults (224 px
squares, 3 channels, the ImageNet statistics) are the official ones and keep every number bit-identical.

A size is kept as the official code keeps it, an int, whenever the image is square; only a rectangle is an
(height, width) tuple, so saved arguments and downstream code reading `args.input_size` see what they always saw.
"""
import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

Size = Union[int, Tuple[int, int]]


def height_width(size: Size) -> Tuple[int, int]:
    """An int side or an (H, W) pair -> (H, W)."""
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def as_size(height: int, width: int) -> Size:
    """(H, W) -> the int side when square (the official form), else the (H, W) tuple."""
    return height if height == width else (height, width)


def size_text(size: Size) -> str:
    """'224 px' for a square, '64x256 px' (height x width) for a rectangle."""
    height, width = height_width(size)
    return f'{height} px' if height == width else f'{height}x{width} px'


def grid_of(size: Size, patch_size: int) -> Tuple[int, int]:
    """The patch grid (rows, columns) of images of `size` cut into patch_size px patches (sides divisible)."""
    height, width = height_width(size)
    return height // patch_size, width // patch_size


def aspect(size: Size) -> float:
    """width / height."""
    height, width = height_width(size)
    return width / height


class SizeAction(argparse.Action):
    """--input_size H [W]: one number is a square side (an int, as the official flag), two are height and width
    (an int again when equal)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            parser.error(f'{option_string} {" ".join(map(str, values))}: give one side, or height and width')
        setattr(namespace, self.dest, as_size(values[0], values[-1]))


def positive_size(size: Optional[Size]) -> bool:
    return size is None or min(height_width(size)) >= 1


@dataclass(frozen=True)
class Normalization:
    """The channels images have and the per-channel statistics they are normalised with: (x - mean) / std, x in
    [0, 1] for integer images (divided by their type's maximum, as ToTensor does for 8-bit ones) and as stored for
    floating-point ones."""
    in_chans: int = 3
    mean: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
    std: Tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)

    @property
    def imagenet_rgb(self) -> bool:
        """The official images: 3 channels normalised with the ImageNet statistics."""
        return self == IMAGENET_RGB

    def describe(self) -> str:
        if self.imagenet_rgb:
            return '3 channels, ImageNet mean and std'
        shown = ', '.join(f'{m:.4g}/{s:.4g}' for m, s in zip(self.mean, self.std))
        return f'{self.in_chans} channel{"s" * (self.in_chans > 1)}, mean/std {shown}'


IMAGENET_RGB = Normalization()


def add_args(parser, training: bool = True):
    """--in_chans, --mean and --std (the size flag, --input_size, is util/flags.add_model_args')."""
    parser.add_argument('--in_chans', default=3, type=int, check=((lambda v: v >= 1), 'must be a positive integer'),
                        recipe=training,
                        help='image channels: 3 for RGB, 1 for greyscale, N for multi-band .npy or TIFF images')
    parser.add_argument('--mean', default=None, type=float, nargs='+', metavar='M', recipe=training,
                        help="per-channel mean the images are normalised with, one value per channel, in [0, 1] "
                             "units for integer images (default: ImageNet's for 3 channels; required otherwise: "
                             'python -m tools.data_stats DATA_PATH prints it)')
    parser.add_argument('--std', default=None, type=float, nargs='+', metavar='S', recipe=training,
                        help='per-channel standard deviation, as --mean')


def check_args(args, errors: List[str]):
    """--mean/--std: both or neither, one positive std per channel; required unless 3 channels."""
    n, mean, std = args.in_chans, args.mean, args.std
    if n < 1:
        return  # its range is reported by the parser
    if (mean is None) != (std is None):
        errors.append(f'{"--mean" if mean is not None else "--std"} without '
                      f'{"--std" if mean is not None else "--mean"}: give both (python -m tools.data_stats '
                      f'{getattr(args, "data_path", None) or "DATA_PATH"} prints them)')
    elif mean is None and n != 3:
        errors.append(f'--in_chans {n}: the ImageNet statistics are for 3 channels; pass --mean and --std with '
                      f'{n} values each (python -m tools.data_stats {getattr(args, "data_path", None) or "DATA_PATH"} '
                      'computes them)')
    wrong = [(flag, values) for flag, values in (('--mean', mean), ('--std', std))
             if values is not None and len(values) != n]
    if wrong:  # one line for both flags
        counts = ', '.join(f'{flag} has {len(values)} value{"s" * (len(values) != 1)}' for flag, values in wrong)
        errors.append(f'{counts}, --in_chans is {n}: give one per channel'
                      + (f' (or pass --in_chans {len(wrong[0][1])})' if n == 3 else ''))
    if std is not None and not all(s > 0 for s in std):
        errors.append(f'--std {" ".join(map(str, std))}: every value must be > 0')


def normalization_of(args) -> Normalization:
    """The run's Normalization from its (checked) flags; the official one where a script or an old checkpoint's
    saved args have none of them. ValueError when they name another channel count than 3 without statistics."""
    n = getattr(args, 'in_chans', 3) or 3
    mean, std = getattr(args, 'mean', None), getattr(args, 'std', None)
    if mean is None or std is None:
        if n != 3:
            raise ValueError(f'{n} channels without --mean and --std: the normalisation is unknown')
        return Normalization(n)
    return Normalization(n, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def saved_normalization_refusal(run: Normalization, saved_args, path: str) -> str:
    """'' when a checkpoint is evaluated with the statistics it was trained with, else the one-line refusal: its
    saved args name another channel count or another --mean/--std than the run's (which would score every image
    off by a constant shift, silently)."""
    try:
        saved = normalization_of(saved_args) if saved_args is not None else None
    except ValueError:
        return ''  # the saved args do not say; the weights' channel count is checked when they load
    if saved is None or saved == run or (getattr(saved_args, 'mean', None) is None and saved.in_chans == run.in_chans):
        return ''
    flags = f'--in_chans {saved.in_chans}'
    if not saved.imagenet_rgb:
        flags += f' --mean {" ".join(f"{m:g}" for m in saved.mean)} --std {" ".join(f"{v:g}" for v in saved.std)}'
    return (f'{path} was trained on {saved.describe()}, this run normalises {run.describe()}: pass {flags} to '
            'evaluate it as it was trained')


def channel_list(text: str, in_chans: int) -> List[int]:
    """--show_channels '3,2,1' (1-based) -> [2, 1, 0]; one or three channels, each in 1..in_chans (ValueError)."""
    try:
        chosen = [int(part) for part in text.split(',')]
    except ValueError:
        raise ValueError(f'--show_channels {text}: give channel numbers separated by commas, like 3,2,1') from None
    if len(chosen) not in (1, 3) or not all(1 <= c <= in_chans for c in chosen):
        raise ValueError(f'--show_channels {text}: give 1 or 3 channel numbers from 1 to {in_chans} (the images '
                         f'have {in_chans} channel{"s" * (in_chans > 1)})')
    return [c - 1 for c in chosen]


def default_shown_channels(in_chans: int) -> Sequence[int]:
    """The channels a figure shows: RGB's three, the first three of more, the one of greyscale (grey)."""
    return [0] if in_chans < 3 else [0, 1, 2]
