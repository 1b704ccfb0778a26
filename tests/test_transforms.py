"""Recipe transforms: pretrain / eval / linear-probe / fine-tune crops, the --fast_decode pipeline against the PIL
one, the device-side normalisation, and RandAugment surviving Pillow 13."""
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PHOTO
from PIL import Image
from timm.data.auto_augment import RandAugment
from torchvision import transforms

from tools.synthetic import CLASSES, make_image_folder
from util.crop import RandomResizedCrop
from util.datasets import build_image_folder, build_transform
from util.images import decode_image_tensor as decode_rgb_tensor
from util.transforms import (
    BICUBIC,
    TensorRandomResizedCrop,
    build_eval_transform,
    build_fast_pretrain_transform,
    build_linprobe_transform,
    build_pretrain_transform,
    posterize_any_bits,
    to_device_normalized,
)

FINETUNE_ARGS = SimpleNamespace(input_size=32, color_jitter=None, aa='rand-m9-mstd0.5-inc1', reprob=0.25,
                                remode='pixel', recount=1)


def noise_image(size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_pretrain_and_eval_transforms_give_normalised_tensors_of_input_size():
    img = noise_image((64, 48))
    for transform in (build_pretrain_transform(32), build_eval_transform(32),
                      build_linprobe_transform(32), build_transform(True, FINETUNE_ARGS)):
        out = transform(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_resize_is_input_size_over_0_875_up_to_224_and_none_above():
    assert build_eval_transform(224).transforms[0].size == 256
    assert build_eval_transform(384).transforms[0].size == 384
    assert build_eval_transform(32).transforms[1].size == (32, 32)


def test_pretrain_crop_scale_and_bicubic_follow_the_recipe():
    crop = build_pretrain_transform(224).transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == 'bicubic'


def test_tf_style_crop_stays_inside_the_image_with_one_draw():
    torch.manual_seed(0)
    for _ in range(200):
        i, j, h, w = RandomResizedCrop.get_params(noise_image((40, 30)), (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= i <= 30 - h and 0 <= j <= 40 - w and 1 <= h <= 30 and 1 <= w <= 40


def test_posterize_with_zero_bits_gives_the_black_image_older_pillow_gave():
    img = noise_image()
    out = posterize_any_bits(img, 0)
    assert out.mode == 'RGB' and out.size == img.size and not np.asarray(out).any()
    assert np.array_equal(np.asarray(posterize_any_bits(img, 4)), np.asarray(img) & 0xF0)
    assert posterize_any_bits(img, 8) is img


def test_the_finetune_randaugment_survives_a_posterize_draw_of_zero_bits():
    """mstd0.5 pushes the magnitude to 10 in ~2% of draws, which PosterizeIncreasing maps to 0 bits: Pillow 13
    raises on it; our transform must give the black image older Pillow gave."""
    randaug = next(t for t in build_transform(True, FINETUNE_ARGS).transforms if isinstance(t, RandAugment))
    op = next(op for op in randaug.ops if op.name == 'PosterizeIncreasing')
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that reaches 0 bits
    assert op.level_fn(op.magnitude, op.hparams)[0] == 0
    out = op(noise_image())
    assert out.size == (40, 30) and not np.asarray(out).any()


@pytest.mark.slow
def test_three_thousand_official_randaugment_draws_raise_nothing():
    random.seed(0)
    torch.manual_seed(0)
    transform = build_transform(True, FINETUNE_ARGS)
    img = noise_image((48, 48))
    for _ in range(3000):
        assert transform(img).shape == (3, 32, 32)


def test_sixteen_bit_images_keep_their_range_in_training_decoders(tmp_path):
    """PIL's convert('RGB') clips 16-bit greys at 255 (a ramp comes out almost white); ours scale them down."""
    from util.images import decode_image as decode_rgb
    from util.images import decode_image_tensor as decode_rgb_tensor
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    path = tmp_path / 'ramp16.png'
    Image.fromarray(ramp).save(path)
    with open(path, 'rb') as f:
        assert abs(np.asarray(decode_rgb(f)).mean() - 127.5) < 1
    with open(path, 'rb') as f:
        assert abs(decode_rgb_tensor(f).float().mean().item() - 127.5) < 1
    dark = tmp_path / 'dark16.png'  # a dark 16-bit image stays dark: the mode, not the content, sets the scale
    Image.fromarray(np.full((8, 8), 200, np.uint16)).save(dark)
    with open(dark, 'rb') as f:
        assert np.asarray(decode_rgb(f)).max() == 0


def test_eight_bit_images_without_transparency_or_rotation_decode_exactly_as_the_official_loader(tmp_path):
    from torchvision.datasets.folder import pil_loader

    from util.images import decode_image as decode_rgb
    for mode in ('RGB', 'L', 'CMYK', 'P', 'RGBA'):
        path = tmp_path / f'{mode}.{"jpg" if mode in ("RGB", "L", "CMYK") else "png"}'
        Image.new(mode, (9, 7), 120 if mode in ('L', 'P') else (10, 120, 230, 255)[:len(mode)]).save(path)
        with open(path, 'rb') as f:
            assert np.array_equal(np.asarray(decode_rgb(f)), np.asarray(pil_loader(str(path))))


def test_the_pil_and_the_fast_decode_pretraining_pipelines_give_the_same_crops():
    """--fast_decode trains the same recipe: with the same seed both pipelines cut the same box, flip alike and
    agree to a fraction of a grey level (a step added to one pipeline only, or another crop scale, fails here)."""
    from torchvision.transforms import PILToTensor

    from util.transforms import build_fast_pretrain_transform
    pil = Image.open(PHOTO).convert('RGB')
    tensor = PILToTensor()(pil)
    pil_pipeline, fast_pipeline = build_pretrain_transform(64, uint8_output=True), build_fast_pretrain_transform(64)
    for seed in range(30):
        torch.manual_seed(seed)
        expected = pil_pipeline(pil).float()
        torch.manual_seed(seed)
        ours = fast_pipeline(tensor).float()
        assert ours.shape == expected.shape and (ours - expected).abs().mean() < 1.0, seed


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (3, 2)])
def test_no_crop_of_a_tiny_image_is_empty(size):
    from types import SimpleNamespace

    from util.crop import RandomResizedCrop as TFCrop
    from util.transforms import (
        build_fast_pretrain_transform,
        build_finetune_transform,
        build_linprobe_transform,
        build_pretrain_transform,
    )
    red = Image.new('RGB', size, (200, 10, 10))
    torch.manual_seed(0)
    for _ in range(200):
        _, _, h, w = TFCrop.get_params(red, (0.08, 1.0), (3 / 4, 4 / 3))
        assert h >= 1 and w >= 1
    finetune = build_finetune_transform(SimpleNamespace(color_jitter=None, aa='none', reprob=0, remode='pixel',
                                                        recount=1), 8)
    for transform in (build_linprobe_transform(8), build_pretrain_transform(8), finetune):
        for _ in range(50):
            out = transform(red)
            assert out[0].min() > 0.5, transform  # red everywhere, never the black of an empty box
    tensor = torch.tensor([200, 10, 10], dtype=torch.uint8).view(3, 1, 1).expand(3, size[1], size[0]).contiguous()
    for _ in range(50):
        assert build_fast_pretrain_transform(8)(tensor)[0].min() > 150


def test_device_normalisation_of_uint8_batches_is_bit_identical_to_totensor_normalize():
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    official = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                               (0.229, 0.224, 0.225))])
    reference = torch.stack([official(p) for p in pictures])
    uint8 = torch.stack([transforms.PILToTensor()(p) for p in pictures])
    assert torch.equal(to_device_normalized(uint8, torch.device('cpu')), reference)
    assert to_device_normalized(reference, torch.device('cpu')) is reference  # float batches pass through


def test_uint8_pretrain_transform_gives_the_official_crops():
    img = Image.open(PHOTO).convert('RGB')
    torch.manual_seed(5)
    official = torch.stack([build_pretrain_transform(64)(img) for _ in range(10)])
    torch.manual_seed(5)
    ours = torch.stack([build_pretrain_transform(64, uint8_output=True)(img) for _ in range(10)])
    assert ours.dtype == torch.uint8
    assert torch.equal(to_device_normalized(ours, torch.device('cpu')), official)


def test_fast_crops_draw_the_same_boxes_as_the_reference_transform_and_match_its_pixels():
    """Crop statistics: with the same seed every crop box (and flip) is the reference transform's, and the
    resized pixels agree with PIL's bicubic to a fraction of a grey level on average."""
    pil = Image.open(PHOTO).convert('RGB')
    tensor = transforms.PILToTensor()(pil)
    reference = transforms.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=BICUBIC)
    ours = TensorRandomResizedCrop(64, scale=(0.2, 1.0))
    boxes_ref, boxes_ours, diffs = [], [], []
    for seed in range(100):
        torch.manual_seed(seed)
        boxes_ref.append(reference.get_params(pil, reference.scale, reference.ratio))
        torch.manual_seed(seed)
        expected = transforms.PILToTensor()(reference(pil)).float()
        torch.manual_seed(seed)
        boxes_ours.append(ours.get_params(tensor, ours.scale, ours.ratio))
        torch.manual_seed(seed)
        diffs.append((ours(tensor).float() - expected).abs().mean().item())
    assert boxes_ours == boxes_ref
    areas = np.array([h * w for _, _, h, w in boxes_ours]) / (256 * 170)
    assert 0.2 <= areas.min() and areas.max() <= 1.0 and 0.3 < areas.mean() < 0.7  # scale (0.2, 1) spread
    assert np.mean(diffs) < 0.25 and np.max(diffs) < 1.0


def test_fast_pretrain_transform_flips_like_the_reference():
    tensor = transforms.PILToTensor()(Image.open(PHOTO).convert('RGB'))
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = build_fast_pretrain_transform(64)(tensor)
        torch.manual_seed(seed)
        ours = TensorRandomResizedCrop(64, scale=(0.2, 1.0))(tensor)
        flips.append(not torch.equal(out, ours))
    assert 3 < sum(flips) < 17 and out.dtype == torch.uint8 and out.shape == (3, 64, 64)


def test_fast_decode_dataset_yields_uint8_crops(tmp_path):
    root = make_image_folder(str(tmp_path), {'train': 2}, size=48, classes=CLASSES[:2])
    dataset = build_image_folder(os.path.join(root, 'train'), build_fast_pretrain_transform(32),
                                 decode=decode_rgb_tensor)
    img, target = dataset[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and target == 1
