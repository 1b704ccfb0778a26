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


CYCLES = (1.5, 4.0)  # periods of 2-5 patches of an 8x8 grid: continuable from the visible patches


def texture(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [size, size] pattern in [0, 1] of the given family, with random frequency and phase."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    freq = rng.uniform(*CYCLES)
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


def class_colour(index: int) -> np.ndarray:
    """A distinct, saturated RGB colour per class index (hues spread around the colour wheel)."""
    hue = (index * 0.618033988749895) % 1.0
    rgb = np.clip(np.abs(((hue * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    return 40 + 200 * rgb


def render(name: str, size: int, rng: np.random.Generator, colour=None) -> Image.Image:
    """Two colours blended by the texture, plus a little noise: an RGB image. The foreground colour is random,
    or `colour` jittered."""
    field = texture(name, size, rng)[..., None]
    fg, bg = rng.uniform(0, 255, size=(2, 3))
    if colour is not None:
        fg, bg = np.clip(colour + rng.normal(0, 20, size=3), 0, 255), rng.uniform(0, 60, size=3)
    pixels = field * fg + (1 - field) * bg + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_image_folder(root: str, per_class: Dict[str, int], size: int = 64, classes: List[str] = None,
                      seed: int = 0, fmt: str = 'JPEG', class_colours: bool = False) -> str:
    """Write root/<split>/<class>/<i>.jpg for each split in per_class ({'train': 40, 'val': 10}). Returns root.
    With class_colours each class also has its own colour family: a cue a classifier learns in a few steps."""
    classes = classes or CLASSES
    for split_index, (split, count) in enumerate(per_class.items()):
        rng = np.random.default_rng([seed, split_index])
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            colour = class_colour(classes.index(name)) if class_colours else None
            for i in range(count):
                suffix = 'jpg' if fmt == 'JPEG' else fmt.lower()
                render(name, size, rng, colour).save(os.path.join(folder, f'{i:05d}.{suffix}'), fmt, quality=90)
    return root
