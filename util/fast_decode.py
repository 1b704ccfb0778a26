"""A faster pretraining input pipeline (--fast_decode): JPEGs decoded by torchvision.io (libjpeg-turbo, the
same pixels as PIL), then cropped and resized as uint8 tensors with torchvision's antialiased bicubic kernel
(within a few grey levels of PIL's, ~3x faster). The crop geometry is drawn by torchvision's own
RandomResizedCrop.get_params, so the augmentation distribution is the official one; the workers emit uint8
and `normalize_batch` finishes on the device."""
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from util.datasets import to_8bit

try:  # torchvision 0.29 deprecates its decoders in favour of TorchCodec; without them PIL decodes (slower)
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

JPEG_MAGIC = b'\xff\xd8'


def decode_rgb_tensor(f) -> torch.Tensor:
    """An open image file -> uint8 [3, H, W]. JPEGs go through torchvision.io; other formats through PIL."""
    data = f.read()
    if data[:2] == JPEG_MAGIC and decode_jpeg is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:  # corrupt or truncated: reported like PIL's decoding errors
            raise OSError(f'JPEG decoding failed: {str(e).splitlines()[0]}') from None
    f.seek(0)
    return transforms.functional.pil_to_tensor(to_8bit(Image.open(f)).convert('RGB'))


class TensorRandomResizedCrop(transforms.RandomResizedCrop):
    """torchvision's RandomResizedCrop (same parameters, same draws) on uint8 tensors, bicubic + antialias."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return F2.resized_crop(img, i, j, h, w, list(self.size), interpolation=InterpolationMode.BICUBIC,
                               antialias=True)


def build_fast_pretrain_transform(input_size: int) -> transforms.Compose:
    """Takes the uint8 tensors of decode_rgb_tensor; returns uint8 crops (normalised later on the device)."""
    return transforms.Compose([
        TensorRandomResizedCrop(input_size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
    ])
