"""The built-in demo behind `python main_pretrain.py --demo`: a tiny MAE pretrained for a few minutes on a
laptop CPU, on procedurally generated textures (tools/synthetic.py), by main_pretrain.main itself; before and
after it, the held-out reconstruction error, a reconstruction figure, and the commands to run next.

A rerun continues an interrupted demo (Ctrl-C, SIGTERM) of the same settings, and otherwise starts over, clearing
the previous demo's outputs; it refuses folders that are not its own, so it never touches a real run or dataset.
"""
import fcntl
import json
import os
import shutil
from typing import List

import torch

import main_pretrain
from util import flags as cli
from util import launch
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.output_dir import LAST, holds_a_run, resumable_checkpoint_in
from util.checks import DEMO_RUN_MARKER, raise_if_errors
from util.training_plan import recipe_changes
from util.device import Runtime
from util.distributed import is_main_process, print0
from util.folders import image_files
from util.images import decode_image
from util.weights import load_weights
from util.distributed import world_size_of_launch
from util.reconstruction import reconstruct, reconstruction_transform, save_figure
from util.rng import seed_everything
from tools.synthetic import CLASSES, CYCLES, make_image_folder

# flags the demo sets unless given on the command line
DEMO_DEFAULTS = dict(model='mae_vit_tiny_patch16', input_size=64, patch_size=8, batch_size=32, epochs=8,
                     warmup_epochs=1, blr=8e-3, mask_ratio=0.75, norm_pix_loss=True, data_path='demo_output/data',
                     output_dir='demo_output', num_workers=1, print_freq=25, save_freq=1000)
DATA_MARKER = 'demo.json'  # in --data_path: images the demo generated
GENERATING_LOCK = '.generating.lock'  # in --data_path from the moment a demo starts generating there
DEMO_VAL_IMAGES = 4  # held-out images per class
FIGURE_SEED = 0


def main(argv: List[str]) -> int:
    parser = main_pretrain.get_args_parser()
    parser.set_defaults(**DEMO_DEFAULTS)  # flags given explicitly still win
    launch.run_main(run, cli.parse_with(parser, argv))
    return 0


def run(args):
    check_folders(args)
    continuing = decide_continue_or_start_over(args)
    prepare_data(args)
    before, _ = held_out_error(initial_model(args), args)
    print0(f'Demo: held-out reconstruction error before training: {before:.4f}')
    main_pretrain.main(args, start_over=not continuing)
    if is_main_process():
        finish(args, before, continuing)


def check_folders(args):
    """Before anything is written: the folders must be the demo's own, since it replaces their runs and images.
    A real dataset or run is refused, and nothing changes."""
    errors = []
    for flag, given in (('--in_chans', args.in_chans != 3), ('--input_size H W', not isinstance(args.input_size, int)),
                        ('--mean/--std', args.mean is not None or args.std is not None)):
        if given:
            errors.append(f'{flag}: --demo generates square RGB photos; this flag is for your own images (README, '
                          '"Your own kind of images"): leave it out here')
    if not args.output_dir:
        errors.append("--output_dir '': --demo needs a folder for its checkpoint and figures; leave the flag out "
                      '(demo_output) or name a folder')
    # under torchrun another rank may already be generating the images: its lock marks the folder as the demo's
    if holds_other_files(args.data_path, (DATA_MARKER, GENERATING_LOCK)):
        errors.append(f'--data_path {args.data_path}: --demo generates its images there, and this folder holds '
                      'other files; leave --data_path out or name an empty folder')
    if args.output_dir and holds_a_run(args.output_dir) and not os.path.isfile(
            os.path.join(args.output_dir, DEMO_RUN_MARKER)):
        errors.append(f'--output_dir {args.output_dir}: --demo starts over in its output folder, and this one '
                      'holds another run; leave --output_dir out or name an empty folder')
    raise_if_errors(errors)


def holds_other_files(folder: str, markers: tuple) -> bool:
    return os.path.isdir(folder) and bool(os.listdir(folder)) and not any(
        os.path.isfile(os.path.join(folder, marker)) for marker in markers)


def decide_continue_or_start_over(args) -> bool:
    """True: continue an interrupted demo with the same settings; False: start over (main_pretrain.main(start_over=
    True) clears the previous demo's checkpoints, log and TensorBoard files). Says which."""
    last = os.path.join(args.output_dir, LAST)
    reason = 'no earlier demo run'
    if not args.auto_resume:
        reason = '--no_auto_resume'
    elif os.path.isfile(last):
        checkpoint = load_checkpoint(last)
        saved = checkpoint.get('args')
        changed = recipe_changes(saved, args, checkpoint.get('world_size', 1), world_size_of_launch(args))
        changed += [f'--{name}' for name in ('model', 'epochs', 'demo_images', 'seed') if getattr(saved, name, None) !=
                    getattr(args, name)]
        finished = 'epoch_in_progress' not in checkpoint and checkpoint.get('epoch', -1) + 1 >= args.epochs
        if not changed and not finished:
            print0(f'Demo: continuing the interrupted demo in {args.output_dir} (pass --epochs or another flag to '
                   'start over instead)')
            return True
        reason = 'the previous demo finished' if finished else f'settings changed ({", ".join(changed)})'
    stale = stale_runs(args.output_dir)
    replaces = 'replaces the checkpoints, log.txt and TensorBoard files there' if holds_a_run(args.output_dir) else ''
    deletes = ('deletes ' + ' and '.join(f'the {kind} run in {path}/' for kind, path in stale) + ' (trained from '
               f"the previous demo's model; the commands printed at the end make {'them' if len(stale) > 1 else 'it'} "
               'again)') if stale else ''
    if replaces or deletes:
        print0(f'Demo: starting over in {args.output_dir} ({reason}): it ' + ', and '.join(filter(None, (replaces,
                                                                                                        deletes))))
    return False


STALE_RUNS = (('fine-tuning', 'finetune'), ('linear-probe', 'linprobe'))  # the runs the demo's next steps make


def stale_runs(out: str) -> list:
    """(kind, folder) of each run the demo's next steps made from an earlier demo's model (its checkpoint's
    --finetune is out/checkpoint-last.pth): a demo that starts over deletes them (finish), and says so first. Any
    other run in those folders is left alone."""
    model = os.path.realpath(os.path.join(out, LAST))
    return [(kind, os.path.join(out, name)) for kind, name in STALE_RUNS
            if fine_tuned_from(os.path.join(out, name)) == model]


def fine_tuned_from(folder: str) -> str:
    """The real path of the pretrained checkpoint the run in `folder` started from (its --finetune); '' for no run,
    a run without a readable checkpoint, or one not fine-tuned from a file."""
    path = resumable_checkpoint_in(folder) if holds_a_run(folder) else ''
    try:
        start = getattr(load_checkpoint(path).get('args'), 'finetune', '') if path else ''
    except CheckpointError:
        return ''
    return os.path.realpath(start) if isinstance(start, str) and start else ''


def prepare_data(args):
    """Generate the image set once (train: --demo_images per class; val: held out), JPEGs of --input_size px.
    Every process calls it; a file lock lets the first generate while the others wait, then reuse."""
    os.makedirs(args.data_path, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, DEMO_RUN_MARKER), 'w') as f:
        json.dump({'demo': True}, f)
    marker = os.path.join(args.data_path, DATA_MARKER)
    spec = {'train': args.demo_images, 'val': DEMO_VAL_IMAGES, 'size': args.input_size, 'classes': CLASSES,
            'cycles': list(CYCLES), 'class_colours': True}
    with open(os.path.join(args.data_path, GENERATING_LOCK), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(marker) and json.load(open(marker)) == spec:
            print0(f'Demo images: reusing {args.data_path}')
            return
        print0(f'Demo images: generating {len(CLASSES)} texture classes x {args.demo_images} training and '
               f'{DEMO_VAL_IMAGES} held-out images of {args.input_size}x{args.input_size} in {args.data_path}',
               force=True)  # whichever process took the lock first
        for split in ('train', 'val'):
            shutil.rmtree(os.path.join(args.data_path, split), ignore_errors=True)
        make_image_folder(args.data_path, {'train': args.demo_images, 'val': DEMO_VAL_IMAGES}, size=args.input_size,
                          class_colours=True)
        with open(marker, 'w') as f:
            json.dump(spec, f)


def initial_model(args):
    """The model main_pretrain starts from on rank 0: seeded with --seed, then built."""
    seed_everything(args.seed)
    return main_pretrain.build_model(args)


def held_out_images(args) -> torch.Tensor:
    """The first held-out image of every class, normalised: [classes, 3, H, W]."""
    transform = reconstruction_transform(args.input_size)
    val = os.path.join(args.data_path, 'val')
    paths = [image_files(os.path.join(val, name))[0][0] for name in CLASSES]  # not a .DS_Store a file manager left
    return torch.stack([transform(decode_image(p)) for p in paths])


def held_out_error(model, args):
    """Mean masked-patch loss on the held-out images with fixed masks (on the CPU), and their 4-panel rows."""
    model.eval()
    rows, losses = [], []
    for i, image in enumerate(held_out_images(args)):
        panels, loss, _ = reconstruct(model, image[None], args.mask_ratio, FIGURE_SEED + i, args.norm_pix_loss,
                                      Runtime('cpu'))
        rows.append(panels)
        losses.append(loss)
    return sum(losses) / len(losses), rows


def finish(args, before: float, continued: bool):
    """Rank 0, after training: the held-out error of the trained model, the figures, what to run next."""
    model = main_pretrain.build_model(args)
    last = os.path.join(args.output_dir, LAST)
    load_weights(model, load_checkpoint(last), last, args.model)
    after, rows = held_out_error(model, args)
    out = args.output_dir
    _, rows_before = held_out_error(initial_model(args), args)
    save_figure(rows_before, os.path.join(out, 'reconstruction_before.png'), row_labels=list(CLASSES))
    figure = os.path.join(out, 'reconstruction_after.png')
    save_figure(rows, figure, row_labels=list(CLASSES))
    for _, stale in stale_runs(out) if not continued else []:  # announced at the start
        shutil.rmtree(stale)
    with open(os.path.join(out, 'demo_result.json'), 'w') as f:
        json.dump({'held_out_error_before': before, 'held_out_error_after': after, 'figure': figure}, f, indent=2)
    print(next_steps(args, before, after), flush=True)


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
      --finetune {out}/checkpoint-last.pth --epochs 5 --warmup_epochs 1 --batch_size 32 --num_workers 1 \\
      --output_dir {out}/finetune
  python main_linprobe.py --data_path {data} --model vit_tiny_patch16 {size} --nb_classes {len(CLASSES)} \\
      --finetune {out}/checkpoint-last.pth --epochs 5 --warmup_epochs 1 --batch_size 32 --blr 80 \\
      --num_workers 1 --output_dir {out}/linprobe   # LARS's blr 0.1 assumes an effective batch of 16384; here 32
  python main_infer.py --model mae_vit_tiny_patch16 --resume {out}/checkpoint-last.pth --img_path YOUR_PICTURE.jpg
Then the real thing: see "Pretraining" in README.md for ImageNet and the ViT-B/L/H recipes.'''
