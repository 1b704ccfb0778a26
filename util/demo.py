"""The built-in demo behind `python main_pretrain.py --demo`: a tiny MAE pretrained for a few minutes on a
laptop CPU, on procedurally generated textures (util/synthetic.py), through the real training code; then the
held-out reconstruction error before and after, a reconstruction figure, and the commands to run next."""
import json
import os
from typing import List

import torch

from util.args import raise_if_errors
from util.checkpoint import holds_a_run
from util.distributed import barrier, is_main_process, print0
from util.reconstruction import panels_to_image, reconstruct, reconstruction_transform
from util.synthetic import CLASSES, CYCLES, make_image_folder

# flags the demo sets unless given on the command line
DEMO_DEFAULTS = dict(model='mae_vit_tiny_patch16', input_size=64, patch_size=8, batch_size=32, epochs=8,
                     warmup_epochs=1, blr=8e-3, mask_ratio=0.75, norm_pix_loss=True, data_path='demo_output/data',
                     output_dir='demo_output', num_workers=1, print_freq=25, auto_resume=False, save_freq=1000)
DATA_MARKER = 'demo.json'  # in --data_path: images the demo generated
RUN_MARKER = 'demo_run.json'  # in --output_dir: a demo run, which the next demo may replace
DEMO_VAL_IMAGES = 4  # held-out images per class
FIGURE_SEED = 0
FIGURE_SCALE = 3  # 64-px panels are easier to see three times larger


def demo_defaults(argv: List[str]) -> dict:
    return DEMO_DEFAULTS if '--demo' in argv else {}


def check_folders(args):
    """Before anything is written (on every rank, before the process group): the folders must be the demo's
    own, since it replaces their runs and images. A real dataset or run is refused, and nothing changes."""
    errors = []
    if not args.output_dir:
        errors.append("--output_dir '': --demo needs a folder for its checkpoint and figures; leave the flag out "
                      '(demo_output) or name a folder')
    if holds_other_files(args.data_path, DATA_MARKER):
        errors.append(f'--data_path {args.data_path}: --demo generates its images there, and this folder holds '
                      'other files; leave --data_path out or name an empty folder')
    if args.output_dir and holds_a_run(args.output_dir) and not os.path.isfile(
            os.path.join(args.output_dir, RUN_MARKER)):
        errors.append(f'--output_dir {args.output_dir}: --demo starts over in its output folder, and this one '
                      'holds another run; leave --output_dir out or name an empty folder')
    raise_if_errors(errors)
    args.overwrite = True  # a previous demo run there is replaced


def prepare(args):
    """After the process group is up: rank 0 marks the output folder as a demo's and generates the images."""
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, RUN_MARKER), 'w') as f:
            json.dump({'demo': True}, f)
        prepare_data(args)
    barrier()


def holds_other_files(folder: str, marker: str) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder)) and not os.path.isfile(os.path.join(folder, marker))


def prepare_data(args):
    """Generate the image set once (train: --demo_images per class; val: held out), 64x64 JPEGs. Rank 0 only."""
    marker = os.path.join(args.data_path, DATA_MARKER)
    spec = {'train': args.demo_images, 'val': DEMO_VAL_IMAGES, 'size': args.input_size, 'classes': CLASSES,
            'cycles': list(CYCLES), 'class_colours': True}
    if os.path.isfile(marker) and json.load(open(marker)) == spec:
        print0(f'Demo images: reusing {args.data_path}')
        return
    print0(f'Demo images: generating {len(CLASSES)} texture classes x {args.demo_images} training and '
           f'{DEMO_VAL_IMAGES} held-out images of {args.input_size}x{args.input_size} in {args.data_path}')
    make_image_folder(args.data_path, {'train': args.demo_images, 'val': DEMO_VAL_IMAGES}, size=args.input_size,
                      class_colours=True)
    with open(marker, 'w') as f:
        json.dump(spec, f)


def held_out_images(args) -> torch.Tensor:
    """The first held-out image of every class, normalised: [classes, 3, H, W]."""
    from PIL import Image
    transform = reconstruction_transform(args.input_size)
    val = os.path.join(args.data_path, 'val')
    paths = [os.path.join(val, name, sorted(os.listdir(os.path.join(val, name)))[0]) for name in CLASSES]
    return torch.stack([transform(Image.open(p).convert('RGB')) for p in paths])


def held_out_error(model, images: torch.Tensor, args, runtime):
    """Mean masked-patch loss on the held-out images with fixed masks, and their 4-panel rows."""
    was_training = model.training
    model.eval()
    rows, losses = [], []
    for i, image in enumerate(images):
        panels, loss, _ = reconstruct(model, image[None], args.mask_ratio, FIGURE_SEED + i, args.norm_pix_loss,
                                      runtime)
        rows.append(panels)
        losses.append(loss)
    model.train(was_training)
    return sum(losses) / len(losses), rows


def save_figure(rows, path: str):
    image = panels_to_image(rows)
    image = image.resize((image.width * FIGURE_SCALE, image.height * FIGURE_SCALE), 0)  # nearest: crisp patches
    image.save(path)


class Demo:
    """Measures the held-out error before training, and after it reports, draws and says what to run next."""

    def __init__(self, args, model, runtime):
        self.args, self.model, self.runtime = args, model, runtime
        self.images = held_out_images(args)
        self.before, rows = held_out_error(model, self.images, args, runtime)
        if is_main_process():
            save_figure(rows, os.path.join(args.output_dir, 'reconstruction_before.png'))
        print0(f'Demo: held-out reconstruction error before training: {self.before:.4f}')

    def finish(self):
        after, rows = held_out_error(self.model, self.images, self.args, self.runtime)
        if not is_main_process():
            return
        out = self.args.output_dir
        figure = os.path.join(out, 'reconstruction_after.png')
        save_figure(rows, figure)
        with open(os.path.join(out, 'demo_result.json'), 'w') as f:
            json.dump({'held_out_error_before': self.before, 'held_out_error_after': after,
                       'figure': figure}, f, indent=2)
        print(next_steps(self.args, self.before, after), flush=True)


def next_steps(args, before: float, after: float) -> str:
    out, data = args.output_dir, args.data_path
    size = f'--input_size {args.input_size} --patch_size {args.patch_size}'
    targets = ('per-patch normalised pixels, as the released models; the figures show them with each hidden '
               "patch's own mean and std, as the paper's figures do" if args.norm_pix_loss else 'raw pixels')
    return f'''
Demo finished. Held-out reconstruction error (masked patches): {before:.4f} before training -> {after:.4f} after.
(targets: {targets})

Everything is in {out}/:
  checkpoint-last.pth            the pretrained tiny MAE (official checkpoint format: model, optimizer, epoch, ...)
  log.txt                        one JSON line per epoch (loss, lr, images/s, peak memory)
  events.out.tfevents.*          TensorBoard scalars
  reconstruction_after.png       held-out images: original | masked | reconstruction | visible patches pasted back
  reconstruction_before.png      the same with the untrained model
  data/                          the generated images: train/ and val/, {len(CLASSES)} texture classes

Next:
  tensorboard --logdir {out}
  python main_finetune.py --data_path {data} --model vit_tiny_patch16 {size} --nb_classes {len(CLASSES)} \\
      --finetune {out}/checkpoint-last.pth --epochs 5 --batch_size 32 --num_workers 1 --output_dir {out}/finetune
  python main_linprobe.py --data_path {data} --model vit_tiny_patch16 {size} --nb_classes {len(CLASSES)} \\
      --finetune {out}/checkpoint-last.pth --epochs 5 --batch_size 32 --blr 80 --num_workers 1 \\
      --output_dir {out}/linprobe   # LARS's blr 0.1 assumes an effective batch of 16384; this one is 32
  python main_infer.py --model mae_vit_tiny_patch16 --resume {out}/checkpoint-last.pth --img_path YOUR_PICTURE.jpg
Then the real thing: see "Pretraining" in README.md for ImageNet and the ViT-B/L/H recipes.'''
