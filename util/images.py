"""Decoding image files to 8-bit RGB: the one function every path uses (training, evaluation, inference, the
k-NN evaluation and the demo), so a file reaches the model the same way whichever script reads it.

What it does beyond the official loader (torchvision's pil_loader: `Image.open(f).convert('RGB')`), which it
equals exactly for every other file:
- an EXIF orientation tag is applied (phone photos stored sideways are shown upright);
- 16-bit and float images are scaled to 8 bits (PIL's convert clips them at 255: a 16-bit photo comes out white);
- transparency (RGBA, LA, PA, or a palette / RGB image with a transparent colour) is composited over white
  (dropping the alpha channel shows whatever colour the transparent pixels happen to store, often black).
"""
import os
import struct
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # torchvision 0.29 deprecates its decoders in favour of TorchCodec; without them PIL decodes (slower)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

# what PIL raises for truncated, corrupt or non-image files (ValueError: malformed PNG chunks and the like)
DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
HIGH_BIT_DEPTH_MODES = ('I;16', 'I;16B', 'I;16L', 'I', 'F')
EXIF_ORIENTATION = 0x0112
JPEG_MAGIC = b'\xff\xd8'
BACKGROUND = (255, 255, 255, 255)  # what transparent pixels become


def decode_image(f) -> Image.Image:
    """An open image file (or path) -> 8-bit RGB PIL image, decoded now (errors: see DECODE_ERRORS)."""
    img = Image.open(f)
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    img = to_8bit(img)
    if has_transparency(img):
        img = Image.alpha_composite(Image.new('RGBA', img.size, BACKGROUND), img.convert('RGBA'))
    return img.convert('RGB')  # PIL decodes lazily: every decoding error surfaces here at the latest


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


def decode_image_tensor(f) -> torch.Tensor:
    """An open image file -> uint8 [3, H, W], for --fast_decode. JPEGs go through torchvision.io (libjpeg-turbo:
    the same pixels as PIL, EXIF orientation applied, CMYK and greyscale converted to RGB); every other file
    through decode_image."""
    data = f.read()
    if data[:2] == JPEG_MAGIC and decode_jpeg is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)
        except RuntimeError as e:  # corrupt or truncated: reported like PIL's decoding errors
            raise OSError(f'JPEG decoding failed: {str(e).splitlines()[0]}') from None
    f.seek(0)
    return torch.from_numpy(np.array(decode_image(f))).permute(2, 0, 1).contiguous()


def collect_images(paths: List[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """Expand folders (sorted, recursively) into image files; missing paths become errors."""
    files, errors = [], []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                errors.append({'image': path, 'error': 'folder holds no image files'})
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            errors.append({'image': path, 'error': 'no such file or folder'})
    return files, errors
