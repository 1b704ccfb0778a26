"""Decoding an image file: one function for every path (training, evaluation, inference, --fast_decode)."""
import numpy as np
import pytest
import torch
from conftest import PHOTO
from PIL import Image
from torchvision import transforms

import main_infer
from util.datasets import build_image_folder
from util.images import decode_image_tensor as decode_rgb_tensor


def awkward_images(folder) -> dict:
    """One file per mode PIL opens that needs more than convert('RGB'), each 40x24 with a distinct picture."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (24, 1))  # transparent on the left
    files = {'L': Image.fromarray(rgb[..., 0]), 'LA': Image.fromarray(np.dstack([rgb[..., 0], alpha]), 'LA'),
             'RGBA': Image.fromarray(np.dstack([rgb, alpha])), 'CMYK': Image.fromarray(rgb).convert('CMYK'),
             'I;16': Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)}
    palette = Image.fromarray(rgb).convert('P')
    palette.info['transparency'] = 0
    files['P'] = palette
    paths = {}
    for mode, img in files.items():
        suffix = 'jpg' if mode == 'CMYK' else 'png'
        paths[mode] = folder / f'{mode.replace(";", "")}.{suffix}'
        img.save(paths[mode], transparency=0) if mode == 'P' else img.save(paths[mode])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    paths['EXIF'] = folder / 'exif.jpg'
    Image.fromarray(rgb).save(paths['EXIF'], exif=exif)
    return paths


def test_one_file_gives_the_same_tensor_through_inference_and_the_eval_loader_in_every_mode(tmp_path):
    from util.transforms import build_eval_transform
    (tmp_path / 'val' / 'one_class').mkdir(parents=True)
    paths = awkward_images(tmp_path / 'val' / 'one_class')
    dataset = build_image_folder(str(tmp_path / 'val'), build_eval_transform(32))
    by_path = {p: i for i, (p, _) in enumerate(dataset.samples)}
    for mode, path in paths.items():
        loader_tensor = dataset[by_path[str(path)]][0]
        infer_tensor = main_infer.preprocess(main_infer.open_image(str(path)), 32)[0]
        assert torch.equal(loader_tensor, infer_tensor), mode


def test_the_decoding_applies_rotation_transparency_and_bit_depth(tmp_path):
    from util.images import decode_image, decode_image_tensor
    paths = awkward_images(tmp_path)
    assert decode_image(paths['EXIF']).size == (24, 40)  # upright: portrait
    rgba = np.asarray(decode_image(paths['RGBA']))
    assert (rgba[:, 0] == 255).all()  # fully transparent column: white, not the stored colour
    assert np.asarray(decode_image(paths['I;16'])).max() > 200  # scaled from 16 bits, not clipped to white
    for mode in ('EXIF', 'CMYK'):  # the --fast_decode JPEG path decodes exactly as PIL does
        with open(paths[mode], 'rb') as f:
            fast = decode_image_tensor(f)
        assert torch.equal(fast, torch.from_numpy(np.array(decode_image(paths[mode]))).permute(2, 0, 1)), mode
    with open(paths['RGBA'], 'rb') as f:
        assert torch.equal(decode_image_tensor(f), torch.from_numpy(rgba.copy()).permute(2, 0, 1))


def test_fast_decode_reads_the_same_pixels_as_pil_and_falls_back_for_png(tmp_path):
    with open(PHOTO, 'rb') as f:
        tensor = decode_rgb_tensor(f)
    assert torch.equal(tensor, transforms.PILToTensor()(Image.open(PHOTO).convert('RGB')))
    png = tmp_path / 'x.png'
    Image.open(PHOTO).convert('L').save(png)
    with open(png, 'rb') as f:
        gray = decode_rgb_tensor(f)
    assert gray.shape == (3, 170, 256) and torch.equal(gray[0], gray[1])


def test_fast_decode_reports_a_truncated_jpeg_as_a_bad_image(tmp_path):
    bad = tmp_path / 'truncated.jpg'
    bad.write_bytes(open(PHOTO, 'rb').read()[:2000])
    with pytest.raises(OSError, match='JPEG decoding failed'), open(bad, 'rb') as f:
        decode_rgb_tensor(f)
