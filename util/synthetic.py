"""A small procedurally generated image set in the ImageNet folder layout, for the demo and the tests.

Each class is a texture family (stripes at an angle, checkerboards, rings, dots, ...) drawn with random colours,
frequency, phase and noise. Textures continue across the image, so an MAE can infer masked patches from the
visible ones, and the classes are easy to tell apart, so fine-tuning can reach high accuracy in a few epochs.
"""
import os
from typing import Dict, List

import numpy as np
from PIL import Image

CLASSES = ['horizontal_stripes', 'vertical_stripes', 'diagonal_stripes', 'checkerboard', 'rings', 'dots',
           'gradient', 'waves']


def texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [size, size] pattern in [0, 1] of the given family, with random frequency and phase."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    freq = rng.uniform(3, 7)
    phase = rng.uniform(0, 2 * np.pi)
    if name == 'horizontal_stripes':
        field = np.sin(2 * np.pi * freq * y + phase)
    elif name == 'vertical_stripes':
        field = np.sin(2 * np.pi * freq * x + phase)
    elif name == 'diagonal_stripes':
        sign = rng.choice([-1.0, 1.0])
        field = np.sin(2 * np.pi * freq * (x + sign * y) / np.sqrt(2) + phase)
    elif name == 'checkerboard':
        field = np.sign(np.sin(2 * np.pi * freq * x + phase)) * np.sign(np.sin(2 * np.pi * freq * y + phase))
    elif name == 'rings':
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        field = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) + phase)
    elif name == 'dots':
        field = np.cos(2 * np.pi * freq * x + phase) * np.cos(2 * np.pi * freq * y + phase)
        field = (field > 0.5).astype(np.float64) * 2 - 1
    elif name == 'gradient':
        angle = rng.uniform(0, 2 * np.pi)
        field = 2 * ((np.cos(angle) * x + np.sin(angle) * y) % 1.0) - 1
    elif name == 'waves':
        field = np.sin(2 * np.pi * freq * y + 0.9 * np.sin(2 * np.pi * 2 * x) + phase)
    else:
        raise ValueError(f'unknown texture {name!r}')
    return (field + 1) / 2


def render(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Two random colours blended by the texture, plus a little noise: an RGB image."""
    field = texture(name, size, rng)[..., None]
    fg, bg = rng.uniform(0, 255, size=(2, 3))
    pixels = field * fg + (1 - field) * bg + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: str, per_class: Dict[str, int], size: int = 64, classes: List[str] = None,
                      seed: int = 0, fmt: str = 'JPEG') -> str:
    """Write root/<split>/<class>/<i>.jpg for each split in per_class ({'train': 40, 'val': 10}). Returns root."""
    classes = classes or CLASSES
    for split_index, (split, count) in enumerate(per_class.items()):
        rng = np.random.default_rng([seed, split_index])
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                suffix = 'jpg' if fmt == 'JPEG' else fmt.lower()
                render(name, size, rng).save(os.path.join(folder, f'{i:05d}.{suffix}'), fmt, quality=90)
    return root
