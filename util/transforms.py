"""The transforms of the official recipes, and the batch normalisation that finishes them on the device.

pretrain: RandomResizedCrop(scale 0.2-1, bicubic) + flip.  fine-tune: timm's create_transform with RandAugment
and random erasing.  eval: resize to input_size / 0.875, centre crop.  linear probe: TF-style RandomResizedCrop
+ flip (util/crop.py).  --fast_decode: the pretraining crop on uint8 tensors.
"""
from typing import Optional, Tuple

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from timm.data.random_erasing import RandomErasing
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

from util.crop import RandomResizedCrop as TFRandomResizedCrop
from util.pixels import IMAGENET_RGB, Normalization, Size, aspect, height_width

BICUBIC = InterpolationMode.BICUBIC


def normalize(normalization: Normalization = IMAGENET_RGB) -> transforms.Normalize:
    return transforms.Normalize(mean=normalization.mean, std=normalization.std)


def crop_ratios(input_size: Size) -> Tuple[float, float]:
    """The aspect ratios (width / height) RandomResizedCrop draws from: 3/4 to 4/3 of the output's own (the
    official 3/4 to 4/3 for squares), so a crop of a panorama is resized to it without being stretched on
    average."""
    output = aspect(input_size)
    return 3 / 4 * output, 4 / 3 * output


def pretrain_augmentation(input_size: Size, crop=transforms.RandomResizedCrop) -> list:
    """The pretraining augmentation, written once for every decoder: RandomResizedCrop(scale 0.2-1, bicubic) +
    flip. `crop` is torchvision's for PIL images, or TensorRandomResizedCrop for the uint8 tensors of
    --fast_decode and the float tensors of util/arrays.py (the same parameters and random draws); every other step
    must take either input."""
    return [crop(input_size, scale=(0.2, 1.0), ratio=crop_ratios(input_size), interpolation=BICUBIC),
            transforms.RandomHorizontalFlip()]


def build_pretrain_transform(input_size: Size, uint8_output: bool = False,
                             normalization: Normalization = IMAGENET_RGB) -> transforms.Compose:
    """pretrain_augmentation on PIL images. With uint8_output the workers stop before ToTensor and Normalize and
    `to_device_normalized` finishes on the device: the same numbers, 4x fewer bytes to move."""
    to_tensor = [transforms.PILToTensor()] if uint8_output else [transforms.ToTensor(), normalize(normalization)]
    return transforms.Compose([*pretrain_augmentation(input_size), *to_tensor])


def to_device_normalized(samples: torch.Tensor, device: torch.device,
                         normalization: Normalization = IMAGENET_RGB) -> torch.Tensor:
    """Move a batch to the device; a uint8 batch is then scaled and normalised there exactly as ToTensor and
    Normalize would have done it in the workers (divide by 255, subtract mean, divide by std, in float32). Float
    batches arrive normalised."""
    samples = samples.to(device, non_blocking=True)
    if samples.dtype != torch.uint8:
        return samples
    mean = torch.tensor(normalization.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(normalization.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return samples.to(torch.float32).div(255).sub_(mean).div_(std)


def build_eval_transform(input_size: Size, normalization: Normalization = IMAGENET_RGB,
                         arrays: bool = False) -> transforms.Compose:
    """Resize the short side to input_size / 0.875 (224 -> 256; no margin above 224 px), centre crop. A
    rectangle: resized, keeping the image's aspect, to cover (H, W) / 0.875, then centre-cropped to (H, W).
    arrays: on the float tensors of util/arrays.py (already scaled; only normalised here)."""
    height, width = height_width(input_size)
    crop_pct = 224 / 256 if max(height, width) <= 224 else 1.0
    if height == width:
        resize = transforms.Resize(int(height / crop_pct), interpolation=BICUBIC)
    else:
        resize = ResizeToCover((int(height / crop_pct), int(width / crop_pct)))
    to_tensor = [] if arrays else [transforms.ToTensor()]
    return transforms.Compose([resize, transforms.CenterCrop(input_size), *to_tensor, normalize(normalization)])


class ResizeToCover(torch.nn.Module):
    """Resize (bicubic, keeping the aspect ratio) to the smallest size that covers (height, width): PIL images or
    tensors [..., H, W]."""

    def __init__(self, size: Tuple[int, int]):
        super().__init__()
        self.size = size

    def forward(self, img):
        width, height = F.get_image_size(img)
        scale = max(self.size[0] / height, self.size[1] / width)
        target = [max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))]
        return F.resize(img, target, interpolation=BICUBIC, antialias=True)


def auto_augment_policy(aa: Optional[str]) -> Optional[str]:
    """--aa as timm takes it: 'none' or '' turn AutoAugment/RandAugment off."""
    return None if aa is None or aa.strip().lower() in ('', 'none') else aa


def build_finetune_transform(args, input_size: Size, normalization: Normalization = IMAGENET_RGB,
                             arrays: bool = False) -> transforms.Compose:
    """The fine-tuning training transform: RandAugment (--aa), random erasing (--reprob), bicubic crops of
    input_size px (args.input_size may be left to the checkpoint, util/classification.resolve_sizes). arrays: the
    float tensors of util/arrays.py, on which only the crop, flip and random erasing are defined (RandAugment and
    colour jitter are for RGB, and util/checks refuses them)."""
    if arrays:
        return transforms.Compose([
            TensorRandomResizedCrop(input_size, ratio=crop_ratios(input_size)), transforms.RandomHorizontalFlip(),
            normalize(normalization),
            RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, device='cpu')])
    transform = create_transform(
        input_size=input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=auto_augment_policy(args.aa), ratio=crop_ratios(input_size),
        interpolation='bicubic', re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        mean=normalization.mean, std=normalization.std)
    return clamp_crop_boxes(make_posterize_pillow13_safe(transform))


def build_linprobe_transform(input_size: Size, normalization: Normalization = IMAGENET_RGB,
                             arrays: bool = False) -> transforms.Compose:
    """The linear-probing training transform: TF-style RandomResizedCrop + flip."""
    return transforms.Compose([
        TFRandomResizedCrop(input_size, ratio=crop_ratios(input_size), interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        *([] if arrays else [transforms.ToTensor()]),
        normalize(normalization),
    ])


def build_array_pretrain_transform(input_size: Size, normalization: Normalization) -> transforms.Compose:
    """pretrain_augmentation on the float tensors of util/arrays.py, then Normalize."""
    return transforms.Compose([*pretrain_augmentation(input_size, crop=TensorRandomResizedCrop),
                               normalize(normalization)])


# --- --fast_decode: the pretraining crop on uint8 tensors ----------------------------------------------------

class TensorRandomResizedCrop(transforms.RandomResizedCrop):
    """torchvision's RandomResizedCrop (same parameters, same draws) on uint8 or float tensors [C, H, W] of any
    channel count, with antialias (bicubic: within a few grey levels of PIL's resize, ~3x faster)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=BICUBIC):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        return F2.resized_crop(img, i, j, h, w, list(self.size), interpolation=self.interpolation, antialias=True)


def build_fast_pretrain_transform(input_size: Size) -> transforms.Compose:
    """pretrain_augmentation on the uint8 tensors of images.decode_image_tensor; returns uint8 crops (normalised
    on the device)."""
    return transforms.Compose(pretrain_augmentation(input_size, crop=TensorRandomResizedCrop))


# --- crops of tiny images -------------------------------------------------------------------------------------
# timm's RandomResizedCropAndInterpolation accepts a box that rounds to 0 px on images of a few pixels, and PIL
# fills it black. Boxes are clamped to one pixel a side; every other box, and every random draw, is unchanged.

def at_least_one_pixel(get_params):
    def clamped(img, scale, ratio):
        i, j, h, w = get_params(img, scale, ratio)
        width, height = img.size
        h, w = max(h, 1), max(w, 1)
        return min(i, height - h), min(j, width - w), h, w
    return clamped


def clamp_crop_boxes(transform):
    """Clamp the boxes of every timm RandomResizedCropAndInterpolation inside `transform` (in place)."""
    for t in getattr(transform, 'transforms', [transform]):
        if isinstance(t, RandomResizedCropAndInterpolation):
            t.get_params = at_least_one_pixel(t.get_params)
    return transform


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
