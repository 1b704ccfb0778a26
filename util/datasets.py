"""Datasets and transforms of the official recipes: ImageFolder `train/` and `val/` under --data_path.

pretrain: RandomResizedCrop(scale 0.2-1, bicubic) + flip.  fine-tune: timm's create_transform with RandAugment,
random erasing; eval: resize to input_size / 0.875, centre crop.  linear probe: TF-style RandomResizedCrop + flip.
"""
import os

from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from util.crop import RandomResizedCrop as TFRandomResizedCrop

BICUBIC = InterpolationMode.BICUBIC


def normalize() -> transforms.Normalize:
    return transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_pretrain_transform(input_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize(),
    ])


def build_eval_transform(input_size: int) -> transforms.Compose:
    """Resize the short side to input_size / 0.875 (224 -> 256; no margin above 224 px), centre crop."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        normalize(),
    ])


def build_finetune_train_transform(args) -> transforms.Compose:
    transform = create_transform(
        input_size=args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
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


def build_dataset(is_train: bool, args, transform=None) -> datasets.ImageFolder:
    """ImageFolder over data_path/train or data_path/val, with the fine-tuning transforms by default."""
    root = os.path.join(args.data_path, 'train' if is_train else 'val')
    if transform is None:
        transform = build_transform(is_train, args)
    return datasets.ImageFolder(root, transform=transform)


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
