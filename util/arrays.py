"""Images of any channel count, read as float tensors [C, H, W]: NumPy `.npy` arrays (H, W, C), multi-band TIFF
(read with tifffile, the library remote sensing and microscopy use for it), and PNG/JPEG/TIFF that Pillow reads,
with their own channels (a greyscale PNG is one channel, not three copies).

Values: unsigned integers are divided by their type's maximum (uint8 by 255 as ToTensor does, uint16 by 65535, so
16-bit data keep their full range), floating-point values are kept as stored. A float image holding NaN or
infinity is refused like a damaged file (no-data pixels would make the loss NaN). The file's format is told by
its first bytes, so shards and Parquet rows read the same way as files.

A run reads arrays when its images are not 3 channels or its data are .npy files (reads_arrays); RGB photos and
TIFFs with 3 channels keep the official PIL path (util/images.py) and its exact numbers.
"""
import io
import os
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from util.images import EXIF_ORIENTATION, check_size_of

NPY_MAGIC = b'\x93NUMPY'
TIFF_MAGICS = (b'II*\x00', b'MM\x00*', b'II+\x00', b'MM\x00+')  # classic and BigTIFF, both byte orders


class ChannelMismatch(RuntimeError):
    """An image with another channel count than the run's --in_chans; one line naming both and the file."""

    def __init__(self, where: str, detail: str = ''):
        """where: the file; detail: what is wrong. One argument (a DataLoader re-raising it from a worker): the
        whole message."""
        self.detail = detail or where
        super().__init__(f'{where}: {detail}' if detail else where)


def reads_arrays(in_chans: int, path: str) -> bool:
    """Whether a file is decoded to a float tensor (this module) rather than an 8-bit RGB PIL image: any channel
    count but 3, a .npy array, or a TIFF that Pillow would damage (3-channel photos and 8-bit TIFFs keep the
    official PIL decoding)."""
    lower = path.lower()
    return in_chans != 3 or lower.endswith('.npy') or (lower.endswith(('.tif', '.tiff')) and tiff_needs_arrays(path))


class ArrayDecoder:
    """decode(f, max_pixels) for ImageFolderDataset: an open file (or SampleBytes) -> float32 [in_chans, H, W].
    Raises ChannelMismatch for another channel count, and a DECODE_ERRORS error for a damaged file, a non-finite
    value or more than max_pixels pixels (ImageTooLarge)."""

    def __init__(self, in_chans: int, expected: str = ''):
        """expected: where the count comes from, for the refusal (default: the run's --in_chans)."""
        self.in_chans = in_chans
        self.expected = expected or f'--in_chans is {in_chans}; every image of a run has --in_chans channels'

    def __call__(self, f, max_pixels: int) -> torch.Tensor:
        array = read_array(f.read(), max_pixels)
        if array.shape[2] != self.in_chans:
            raise self.mismatch(where(f), tuple(array.shape))
        return to_tensor(array)

    def mismatch(self, path: str, shape: tuple) -> ChannelMismatch:
        return ChannelMismatch(path, f'{shape[2]} channel{"s" * (shape[2] != 1)} (shape {shape}, read as height, '
                                     f'width, channels), but {self.expected}')

    def check_shapes(self, shapes: Iterable[Tuple[str, Optional[tuple]]]):
        """Before a run: ChannelMismatch for the first (where, (H, W, C)) of another channel count; a shape of None
        (a header that could not be read) is left to the run, which reports it like any damaged image."""
        for where_from, shape in shapes:
            if shape is not None and shape[2] != self.in_chans:
                raise self.mismatch(where_from, shape)

    def check_headers(self, paths: List[str]):
        """check_shapes for image files, reading their headers only (header_shape)."""
        self.check_shapes((path, header_shape(path)) for path in paths)


def header_shape(path: str) -> Optional[tuple]:
    """(H, W, C) of an image file as read_array would give it, from its header; None when that cannot be told."""
    try:
        with open(path, 'rb') as f:
            return stream_header_shape(f)
    except OSError:
        return None


def stream_header_shape(f) -> Optional[tuple]:
    """header_shape of an open, seekable binary stream at its start (a file, a tar member's window, a Parquet row's
    bytes), told by its first bytes as read_array tells them: a .npy's header, a TIFF's tags, Pillow's lazy open.
    Reads the header only, not the pixels."""
    try:
        start = f.read(max(len(NPY_MAGIC), 4))
        f.seek(0)
        if start.startswith(NPY_MAGIC):
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
            if read_header is None:
                return None
            shape = read_header(f)[0]
        elif start[:4] in TIFF_MAGICS:
            import tifffile
            with tifffile.TiffFile(f) as tiff:
                series = tiff.series[0]
                shape, axes = tuple(series.shape), series.axes
            if len(shape) == 3 and axes[0] in 'QI':
                return None  # a page stack: refused when read, with how to write it
            if len(shape) == 3 and axes[0] in 'SC':
                shape = shape[1:] + shape[:1]
        else:
            with Image.open(f) as img:
                bands = {'P': 4 if 'transparency' in img.info else 3, '1': 1}.get(img.mode)
                if bands is None:
                    bands = 3 if img.mode in ('CMYK', 'YCbCr', 'LAB', 'HSV') else len(img.getbands())
                shape = (img.height, img.width, bands)
    except (OSError, ValueError, KeyError, IndexError, SyntaxError, EOFError):  # the run reads and reports it
        return None
    shape = tuple(int(n) for n in shape)
    return shape + (1,) if len(shape) == 2 else shape if len(shape) == 3 else None


def where(f) -> str:
    """The file (or SHARD:KEY) an open image came from, for messages."""
    return getattr(f, 'where', None) or getattr(f, 'name', None) or 'an image'


def read_array(data: bytes, max_pixels: int) -> np.ndarray:
    """An image file's bytes -> its pixels (H, W, C), in the file's own type."""
    if data.startswith(NPY_MAGIC):
        array = np.load(io.BytesIO(data), allow_pickle=False)  # never unpickles: loading executes no code
    elif data[:4] in TIFF_MAGICS:
        array = read_tiff(data)
    else:
        array = read_with_pillow(data, max_pixels)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f'an array of shape {tuple(array.shape)}; images are (height, width) or (height, width, '
                         'channels)')
    check_size_of(array.shape[1], array.shape[0], max_pixels)
    return array


def read_tiff(data: bytes) -> np.ndarray:
    """A TIFF's first image as (H, W, C): interleaved bands ('YXS') as stored, band-by-band planes ('SYX',
    'CYX', 'QYX', as GDAL and rasterio write them) moved last."""
    import tifffile  # only runs that read TIFF need it
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            array, axes = series.asarray(), series.axes
    except (tifffile.TiffFileError, KeyError, IndexError) as e:
        raise ValueError(f'TIFF: {e}') from None
    if array.ndim == 3 and axes[0] in 'QI' and axes[1:] == 'YX':
        raise ValueError(f'TIFF of {array.shape[0]} pages of {array.shape[1]}x{array.shape[2]} px: a page stack, '
                         'which cannot tell bands from rows; write the bands as one image: '
                         "tifffile.imwrite(f, hwc_array, photometric='minisblack', planarconfig='contig'), or an "
                         "(N, H, W) array with planarconfig='separate' (as GDAL and rasterio write them)")
    if array.ndim == 3 and axes[0] in 'SC' and axes[1:] == 'YX':
        array = np.moveaxis(array, 0, -1)
    return array


def tiff_needs_arrays(path: str) -> bool:
    """A TIFF that Pillow's 8-bit RGB decoding would damage: more than 8 bits per sample (it would keep the top 8),
    bands stored plane by plane, or other than 1, 3 or 4 samples per pixel."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            return (page.bitspersample > 8 or page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
                    or page.samplesperpixel not in (1, 3, 4))
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return False  # reported when the run reads it


def read_with_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    """PNG, JPEG and the rest, with their own channels: greyscale 1, RGB 3, RGBA 4; 16-bit greyscale kept 16-bit;
    a palette image as the colours it shows."""
    img = Image.open(io.BytesIO(data))
    check_size_of(img.width, img.height, max_pixels)
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    elif img.mode in ('1', 'CMYK', 'YCbCr', 'LAB', 'HSV'):
        img = img.convert('L' if img.mode == '1' else 'RGB')
    array = np.asarray(img)
    if img.mode.startswith('I;16'):
        array = array.astype(np.uint16)
    return array


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, C) of any type -> float32 [C, H, W]: unsigned integers over their maximum, the rest as stored."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.unsignedinteger):
        scaled = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    else:
        scaled = array.astype(np.float32)
        if not np.isfinite(scaled).all():
            raise ValueError(f'{int((~np.isfinite(scaled)).sum()):,} NaN or infinite values (no-data pixels?): '
                             'fill them before training, they would make the loss NaN')
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


def first_class_files(root: str) -> List[str]:
    """The image files (.npy included) of the first class folder under root that holds any; [] when none does."""
    from util.folders import ARRAY_IMG_EXTENSIONS, class_folders, image_files
    if not os.path.isdir(root):
        return []
    for name in class_folders(root)[0]:
        files = image_files(os.path.join(root, name), ARRAY_IMG_EXTENSIONS)[0]
        if files:
            return files
    return []


def holds_only_arrays(root: str) -> bool:
    """Whether a 3-channel split under root is read as arrays: its first class folder holds .npy files and no image
    Pillow would read, or its first image is a TIFF that Pillow would damage (tiff_needs_arrays)."""
    files = first_class_files(root)
    if not files:
        return False
    return all(f.lower().endswith('.npy') for f in files) or (
        files[0].lower().endswith(('.tif', '.tiff')) and tiff_needs_arrays(files[0]))


def first_image_file(root: str) -> str:
    """The first image file of a folder of class folders in listing order ('' when there is none)."""
    files = first_class_files(root)
    return files[0] if files else ''
