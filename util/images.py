"""Decoding image files to 8-bit RGB: the one function every path uses (training, evaluation, inference, the
k-NN evaluation and the demo), so a file reaches the model the same way whichever script reads it.

What it does beyond the official loader (torchvision's pil_loader: `Image.open(f).convert('RGB')`), which it
equals exactly for every other file:
- an EXIF orientation tag is applied (phone photos stored sideways are shown upright);
- 16-bit and float images are scaled to 8 bits (PIL's convert clips them at 255: a 16-bit photo comes out white);
- transparency (RGBA, LA, PA, or a palette / RGB image with a transparent colour) is composited over white
  (dropping the alpha channel shows whatever colour the transparent pixels happen to store, often black).
"""
import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

try:  # torchvision 0.29 deprecates its decoders in favour of TorchCodec; without them PIL decodes (slower)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

# Pillow refuses images of more than 2 x Image.MAX_IMAGE_PIXELS pixels (its decompression-bomb guard against files
# made to exhaust memory) with an error that reads like damage. decode_image applies the same default limit itself,
# from the header, and names it (ImageTooLarge); --max_image_pixels changes it per run, in every worker, through
# the dataset. Pillow's own check (and its warning above half the limit) is therefore off in our processes.
DEFAULT_MAX_PIXELS = 178_956_970  # 2 x Pillow's default Image.MAX_IMAGE_PIXELS (89,478,485)
Image.MAX_IMAGE_PIXELS = None


class ImageTooLarge(ValueError):
    """A valid image with more pixels than the run allows (--max_image_pixels); the message says how to allow it."""

    def __init__(self, width: int, height: int, max_pixels: int):
        self.pixels = width * height
        super().__init__(f'{self.pixels:,} pixels ({width} x {height}), more than --max_image_pixels {max_pixels:,} '
                         "(by default Pillow's decompression-bomb limit, a guard against files made to exhaust "
                         'memory); the file is not damaged: if it is genuine, pass --max_image_pixels 0 (no limit) or '
                         'a larger number')


class MetadataTooLarge(ValueError):
    """A PNG whose text metadata exceeds one of Pillow's limits (PngImagePlugin.MAX_TEXT_CHUNK for one chunk,
    MAX_TEXT_MEMORY for all of them: decompression-bomb guards too); its pixels are not damaged."""

    def __init__(self, limit: str = 'MAX_TEXT_CHUNK'):
        super().__init__(f"PNG text metadata larger than Pillow's limit of {getattr(PngImagePlugin, limit):,} bytes "
                         f'(PngImagePlugin.{limit}, a guard against decompression bombs); the pixels are not '
                         'damaged: strip the metadata (e.g. mogrify -strip)')


# Pillow's safety limits: an image they stop is not damaged, and the messages say so
NOT_DAMAGED = (ImageTooLarge, MetadataTooLarge)

# what PIL raises for truncated, corrupt or non-image files (ValueError: malformed PNG chunks and the like), and
# the safety limits above (ValueErrors)
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)
HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16B', 'I;16L', 'I', 'F')
EXIF_ORIENTATION = 0x0112
JPEG_MAGIC = b'\xff\xd8'
BACKGROUND = (255, 255, 255, 255)  # what transparent pixels become


def decode_image(f, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An open image file (or path) -> 8-bit RGB PIL image, decoded now (errors: see DECODE_ERRORS). An image of
    more than `max_pixels` pixels (0: no limit) raises ImageTooLarge before its pixels are decoded; PNG metadata
    over Pillow's limits, MetadataTooLarge (wherever the chunk sits: Pillow reads those after the pixels late)."""
    try:
        return decode_rgb(f, max_pixels)
    except ValueError as e:
        limit = next((name for name in ('MAX_TEXT_CHUNK', 'MAX_TEXT_MEMORY') if name in str(e)), '')
        if limit:  # Pillow's message names the limit; say what it means
            raise MetadataTooLarge(limit) from None
        raise


def decode_rgb(f, max_pixels: int) -> Image.Image:
    img = Image.open(f)
    check_size(img, max_pixels)
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    img = to_8bit(img)
    if has_transparency(img):
        img = Image.alpha_composite(Image.new('RGBA', img.size, BACKGROUND), img.convert('RGBA'))
    return img.convert('RGB')  # PIL decodes lazily: every decoding error surfaces here at the latest


def check_size(img: Image.Image, max_pixels: int):
    """ImageTooLarge if the image (its header read, its pixels not yet) has more than max_pixels (0: no limit)."""
    check_size_of(*img.size, max_pixels)


def check_size_of(width: int, height: int, max_pixels: int):
    if max_pixels and width * height > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)


def describe_error(error: Exception) -> str:
    """One line naming why an image could not be used: 'ImageTooLarge: 182,000,000 pixels ...', 'OSError: ...'."""
    return f'{type(error).__name__}: {error}'.splitlines()[0]


def has_transparency(img: Image.Image) -> bool:
    return 'A' in img.getbands() or 'a' in img.getbands() or 'transparency' in img.info


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> 8-bit 'L', a 16-bit range scaled down; other modes are returned as they are.
    The mode, not the content, sets the scale, so a dataset's dark and bright images stay consistent."""
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return img
    array = np.asarray(img, dtype=np.float64)
    # I;16 is 16-bit by definition; 32-bit 'I' holds 8- or 16-bit content depending on the writer
    sixteen_bit = img.mode.startswith('I;16') or (img.mode == 'I' and array.max() > 255)
    scale = 255 / 65535 if sixteen_bit else 1.0
    return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), 'L')


def decode_image_tensor(f, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An open image file -> uint8 [3, H, W], for --fast_decode. JPEGs go through torchvision.io (libjpeg-turbo:
    the same pixels as PIL, EXIF orientation applied, CMYK and greyscale converted to RGB); every other file
    through decode_image. The same pixel limit as decode_image, read from the header first."""
    data = f.read()
    if data[:2] == JPEG_MAGIC and decode_jpeg is not None:
        check_size(Image.open(io.BytesIO(data)), max_pixels)  # the header only: microseconds
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError as e:  # corrupt or truncated: reported like PIL's decoding errors
            raise OSError(f'JPEG decoding failed: {str(e).splitlines()[0]}') from None
    f.seek(0)
    return torch.from_numpy(np.array(decode_image(f, max_pixels))).permute(2, 0, 1).contiguous()
