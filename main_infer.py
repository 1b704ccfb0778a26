"""Run a checkpoint on your own pictures: top-k classes for a `vit_*` classifier, or the MAE reconstruction figure
(original | masked | reconstruction | reconstruction + visible patches) for an `mae_*` model.

python main_infer.py --model vit_base_patch16 --resume mae_finetuned_vit_base.pth --img_path cat.jpg --topk 5
python main_infer.py --model mae_vit_large_patch16 --resume mae_visualize_vit_large.pth --img_path cat.jpg \
    --mask_ratio 0.75 --output_dir out/
"""
import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from PIL import Image, ImageOps

import models_mae
import models_vit
from main_linprobe import add_batchnorm_head_and_freeze
from util.args import UsageError, check_checkpoint_path, default_patch_size, writable
from util.checkpoint import CheckpointError, load_checkpoint, load_state_strict, model_state_from
from util.datasets import DECODE_ERRORS, build_eval_transform, to_8bit
from util.device import AMP_CHOICES, DEVICE_CHOICES, DeviceError, setup_runtime
from util.reconstruction import panels_to_image, reconstruct, reconstruction_transform

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
IMAGENET_CLASSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'util', 'imagenet_classes.txt')


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE / ViT inference on your own images', add_help=True)
    parser.add_argument('--model', required=True,
                        help='vit_* (classification) or mae_vit_* (reconstruction), e.g. vit_base_patch16')
    parser.add_argument('--resume', required=True, help='checkpoint path or https URL')
    parser.add_argument('--img_path', nargs='+', required=True, help='image files and/or folders of images')
    parser.add_argument('--input_size', type=int, default=None,
                        help="image size fed to the model (default: the checkpoint's, usually 224)")
    parser.add_argument('--patch_size', type=int, default=None, help="patch size (default: the model's)")
    parser.add_argument('--topk', type=int, default=5, help='classes to print per image')
    parser.add_argument('--class_names', default=None,
                        help='text file, one class name per line (default: ImageNet-1k names for 1000 classes)')
    parser.add_argument('--mask_ratio', type=float, default=0.75, help='fraction of patches hidden (MAE)')
    parser.add_argument('--seed', type=int, default=0, help='mask seed: the same seed gives the same mask')
    parser.add_argument('--norm_pix_loss', action='store_true', default=None,
                        help="the MAE predicts per-patch normalised pixels (default: read from the checkpoint's "
                             'args; the released visualisation checkpoints predict raw pixels)')
    parser.add_argument('--output_dir', default='./infer_output', help='where reconstruction PNGs go')
    parser.add_argument('--json', default=None, metavar='FILE', help="write the results as JSON ('-': stdout)")
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    parser.add_argument('--amp', default='off', choices=AMP_CHOICES, help='precision of the forward pass')
    return parser


# --- inputs ---------------------------------------------------------------------------------------------------

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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB: EXIF rotation applied, 16-bit scaled down, transparency over white."""
    img = to_8bit(ImageOps.exif_transpose(img))
    if img.mode in ('RGBA', 'LA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert('RGB')


def open_image(path: str) -> Image.Image:
    """Decode fully now, so a truncated or non-image file fails here with a clear message."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except DECODE_ERRORS as e:
        raise ValueError(f'cannot read as an image ({type(e).__name__}: {str(e).splitlines()[0]})') from None


# --- model -----------------------------------------------------------------------------------------------------

def infer_grid(state: Dict[str, torch.Tensor]) -> Optional[int]:
    pos_embed = state.get('pos_embed')
    if pos_embed is None:
        return None
    return int(round((pos_embed.shape[1] - 1) ** 0.5))


def build_from_checkpoint(args, state: Dict[str, torch.Tensor], is_mae: bool) -> nn.Module:
    """The --model architecture, with what the checkpoint shows of it: image size, classes, pooling, head."""
    kernel = state.get('patch_embed.proj.weight')
    patch = args.patch_size or (kernel.shape[-1] if kernel is not None else None)
    patch = patch or default_patch_size(args.model)
    kwargs = {'patch_size': patch}
    grid = infer_grid(state)
    kwargs['img_size'] = args.input_size or (grid * patch if grid else 224)
    if is_mae:
        return models_mae.build_mae(args.model, **kwargs)
    head_weight = state.get('head.1.weight', state.get('head.weight'))
    kwargs['num_classes'] = head_weight.shape[0] if head_weight is not None else 1000
    kwargs['global_pool'] = 'fc_norm.weight' in state
    model = models_vit.build_classifier(args.model, **kwargs)
    if 'head.1.weight' in state:  # a linear-probing checkpoint: BatchNorm before the head
        model = add_batchnorm_head_and_freeze(model)
    return model


def check_has_decoder(state: Dict[str, torch.Tensor], path: str):
    if not any(k.startswith('decoder_') for k in state):
        raise CheckpointError(f'{path} holds an encoder only (like mae_pretrain_vit_*.pth): reconstruction needs '
                              'a checkpoint with the decoder, e.g. mae_visualize_vit_*.pth or one of your '
                              'pretraining checkpoints')


def load_model(args, runtime) -> Tuple[nn.Module, dict]:
    checkpoint = load_checkpoint(args.resume)
    state = model_state_from(checkpoint, args.resume)
    is_mae = args.model in models_mae.MODELS
    if is_mae:
        check_has_decoder(state, args.resume)
    model = build_from_checkpoint(args, state, is_mae)
    load_state_strict(model, state, args.resume, args.model)
    return model.to(runtime.device).eval(), checkpoint


def uses_norm_pix(args, checkpoint: dict) -> bool:
    if args.norm_pix_loss is not None:
        return args.norm_pix_loss
    return bool(getattr(checkpoint.get('args'), 'norm_pix_loss', False))


# --- classification ------------------------------------------------------------------------------------------

def read_class_names(path: Optional[str], num_classes: int) -> List[str]:
    if path is None:
        if num_classes != 1000:
            return [f'class {i}' for i in range(num_classes)]
        path = IMAGENET_CLASSES
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != num_classes:
        raise UsageError(f'--class_names {path}: has {len(names)} names but the model has {num_classes} classes')
    return names


@torch.no_grad()
def classify(model: nn.Module, img: Image.Image, input_size: int, runtime, topk: int, names: List[str]) -> list:
    x = build_eval_transform(input_size)(img).unsqueeze(0).to(runtime.device)
    with runtime.autocast():
        logits = model(x)
    probs = logits.float().softmax(dim=-1)[0]
    values, indices = probs.topk(min(topk, probs.numel()))
    return [{'index': int(i), 'label': names[int(i)], 'prob': float(p)} for p, i in zip(values, indices)]


# --- reconstruction outputs ----------------------------------------------------------------------------------

def output_png_path(output_dir: str, image_path: str, taken: set) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, n = f'{stem}_mae.png', 1
    while name in taken:
        n += 1
        name = f'{stem}_{n}_mae.png'
    taken.add(name)
    return os.path.join(output_dir, name)


# --- the command -------------------------------------------------------------------------------------------------

def validate(args):
    errors = []
    if args.model not in models_vit.MODELS and args.model not in models_mae.MODELS:
        errors.append(f'--model {args.model}: unknown model; choose from '
                      f'{", ".join(list(models_vit.MODELS) + list(models_mae.MODELS))}')
    if not 0 <= args.mask_ratio < 1:
        errors.append(f'--mask_ratio {args.mask_ratio}: must be in [0, 1)')
    if args.topk < 1:
        errors.append(f'--topk {args.topk}: must be >= 1')
    if args.class_names and not os.path.isfile(args.class_names):
        errors.append(f'--class_names {args.class_names}: no such file')
    check_checkpoint_path('--resume', args.resume, errors)
    if args.model in models_mae.MODELS and not writable(args.output_dir):
        errors.append(f'--output_dir {args.output_dir}: cannot create or write to this folder')
    if args.json and args.json != '-' and not can_write_file(args.json):
        errors.append(f'--json {args.json}: cannot write this file (is its folder there and writable?)')
    if errors:
        raise UsageError('\n'.join(errors))


def can_write_file(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    return not os.path.isdir(path) and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)


def reconstruction_handler(args, model, checkpoint, runtime, report: dict):
    """A function path, image -> result that writes the 4-panel PNG and prints the masked-patch loss."""
    norm_pix = uses_norm_pix(args, checkpoint)
    report.update(mask_ratio=args.mask_ratio, seed=args.seed, norm_pix_loss=norm_pix)
    if norm_pix:
        print('Note: this MAE predicts per-patch normalised pixels (norm_pix_loss); the reconstruction is '
              "shown with each hidden patch's own mean and std taken from the original image")
    os.makedirs(args.output_dir, exist_ok=True)
    transform = reconstruction_transform(model.patch_embed.img_size[0])
    taken = set()

    def handle(path: str, img: Image.Image) -> dict:
        panels, loss, mask = reconstruct(model, transform(img).unsqueeze(0), args.mask_ratio, args.seed, norm_pix,
                                         runtime)
        out = output_png_path(args.output_dir, path, taken)
        panels_to_image([panels]).save(out)
        loss_text = f'{loss:.4f}' if loss is not None else 'n/a (no patch masked)'
        print(f'{path}: reconstruction loss {loss_text} on {int(mask.sum())} of {mask.numel()} patches masked '
              f'-> {out}')
        return {'image': path, 'output': out, 'loss': loss, 'masked_patches': int(mask.sum()),
                'num_patches': mask.numel()}
    return handle


def classification_handler(args, model, runtime):
    """A function path, image -> result that prints the top-k classes with their probabilities."""
    names = read_class_names(args.class_names, model.num_classes)

    def handle(path: str, img: Image.Image) -> dict:
        top = classify(model, img, model.patch_embed.img_size[0], runtime, args.topk, names)
        print(path)
        for entry in top:
            print(f"  {entry['label']} {entry['prob']:.2f}")
        return {'image': path, 'topk': top}
    return handle


def run(args) -> dict:
    """Returns {'model', 'checkpoint', 'task', 'results': [...], 'errors': [...]}."""
    validate(args)
    runtime = setup_runtime(args.device, args.amp)
    model, checkpoint = load_model(args, runtime)
    files, errors = collect_images(args.img_path)
    for error in errors:
        print(f"error: {error['image']}: {error['error']}", file=sys.stderr, flush=True)
    is_mae = args.model in models_mae.MODELS
    report = {'model': args.model, 'checkpoint': args.resume, 'task': 'reconstruction' if is_mae else
              'classification', 'device': runtime.device_str, 'results': [], 'errors': errors}
    if is_mae:
        handle = reconstruction_handler(args, model, checkpoint, runtime, report)
    else:
        handle = classification_handler(args, model, runtime)
    for path in files:
        try:
            img = open_image(path)
        except ValueError as e:
            errors.append({'image': path, 'error': str(e)})
            print(f'error: {path}: {e}', file=sys.stderr, flush=True)
            continue
        report['results'].append(handle(path, img))
    return report


def write_json(report: dict, destination: str):
    text = json.dumps(report, indent=2)
    if destination == '-':
        print(text)
    else:
        with open(destination, 'w', encoding='utf-8') as f:
            f.write(text + '\n')


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    # with --json -, stdout carries the JSON alone: the per-image lines go to stderr
    human_output = contextlib.redirect_stdout(sys.stderr) if args.json == '-' else contextlib.nullcontext()
    try:
        with human_output:
            report = run(args)
        if args.json:
            write_json(report, args.json)
    except (UsageError, DeviceError, CheckpointError, OSError) as e:
        for line in str(e).splitlines():
            print(f'error: {line}', file=sys.stderr, flush=True)
        return 2
    if report['errors']:
        print(f"{len(report['errors'])} of {len(report['results']) + len(report['errors'])} inputs failed",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
