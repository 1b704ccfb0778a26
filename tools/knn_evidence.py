"""Does k-NN accuracy track what pretraining learns? A reproducible check on real images that a package ships:
scikit-learn's handwritten digits (8x8 greyscale scans, 1,797 images, 10 classes, from the UCI repository; no
download), written as an ImageFolder of 32-px images. A tiny MAE is pretrained for 100 epochs (1,500 steps) with
main_pretrain.py; k-NN accuracy (main_knn.py, class token and patch mean) of the same architecture at
initialisation and after pretraining is set against a linear probe (main_linprobe.py) of both checkpoints, and
against k-NN on the raw pixels.

python -m tools.knn_evidence --output_dir knn_evidence   # 54 min measured on 2 CPU cores (with other work beside it)
Prints a Markdown table and writes knn_evidence/evidence.json. A rerun reuses the runs that finished in
--output_dir (delete it to start over). scikit-learn is needed here only (requirements-dev.txt).
"""
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import main_pretrain
from tools.demo import initial_model
from util import flags as cli
from util import knn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32  # the 8x8 scans, upscaled 4x: 8x8 patches of 4 px
TRAIN_PER_CLASS = 100  # the first 100 of each class (in the file's order) train, the other 74-83 are held out
COMMON = ['--model', 'mae_vit_tiny_patch16', '--input_size', str(SIZE), '--patch_size', '4', '--seed', '0']
PROBE = ['--model', 'vit_tiny_patch16', '--input_size', str(SIZE), '--patch_size', '4', '--nb_classes', '10',
         '--cls_token', '--batch_size', '64', '--blr', '40', '--warmup_epochs', '1', '--num_workers', '1']


def write_digits(folder: str) -> Dict[str, int]:
    """digits/{train,val}/<digit>/<n>.png, 32-px greyscale as RGB (bilinear upscaling of the 0-16 scans)."""
    from sklearn.datasets import load_digits  # offline: the data set ships with scikit-learn
    digits = load_digits()
    seen = {c: 0 for c in range(10)}
    counts = {'train': 0, 'val': 0}
    for n, (image, label) in enumerate(zip(digits.images, digits.target)):
        split = 'train' if seen[label] < TRAIN_PER_CLASS else 'val'
        seen[label] += 1
        counts[split] += 1
        path = os.path.join(folder, split, str(label))
        os.makedirs(path, exist_ok=True)
        grey = Image.fromarray(np.uint8(np.round(image * 255 / 16))).resize((SIZE, SIZE), Image.BILINEAR)
        grey.convert('RGB').save(os.path.join(path, f'{n:04d}.png'))
    return counts


def run(script: str, *args) -> str:
    """A script of this repository, as a user runs it; its stdout (stops the tool if it fails)."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return proc.stdout


def knn_accuracy(checkpoint: str, data: str, feature: str) -> Dict[int, float]:
    """main_knn.py's top-1 for k = 10, 20, 200 (its '* k-NN k=20 ... top-1 61.250 ...' lines)."""
    out = run('main_knn.py', '--resume', checkpoint, '--data_path', data, '--feature', feature, '--nb_knn', 10, 20,
              200, '--batch_size', 128, '--num_workers', 1, *COMMON)
    return {int(line.split('k=')[1].split()[0]): float(line.split('top-1 ')[1].split()[0])
            for line in out.splitlines() if '* k-NN' in line}


def linear_probe(checkpoint: str, data: str, output_dir: str, epochs: int) -> float:
    """main_linprobe.py (the recipe's LARS probe on the class token) from the checkpoint: top-1 after the last
    epoch (not the best epoch: no choice is made on the held-out images)."""
    run('main_linprobe.py', '--finetune', checkpoint, '--data_path', data, '--output_dir', output_dir,
        '--epochs', epochs, *PROBE)
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return json.loads(f.read().splitlines()[-1])['test_acc1']


def raw_pixel_knn(data: str) -> float:
    """k-NN (k = 20, T = 0.07) on the normalised pixels of the same eval crops: what the images alone allow."""
    loaded = knn.read_knn_data(data, SIZE, 0, 0)
    bank = F.normalize(torch.stack([image.flatten() for image, _ in loaded.bank]), dim=1)
    queries = F.normalize(torch.stack([image.flatten() for image, _ in loaded.queries]), dim=1)
    hits = knn.knn_hits(queries, torch.tensor(loaded.queries.targets), bank, torch.tensor(loaded.bank.targets), 10,
                        [20], 0.07)
    return 100 * hits[20][0].item() / len(loaded.queries)


def save_initial_model(path: str, pretrain_argv: List[str]):
    """The weights main_pretrain.py starts from with these flags (seeded, then built, as it does)."""
    args = cli.parse_with(main_pretrain.get_args_parser(), pretrain_argv)
    torch.save({'model': initial_model(args).state_dict()}, path)


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.knn_evidence', __doc__.split('\n')[0])
    parser.add_argument('--output_dir', default='knn_evidence', help='folder for the images, runs and results')
    parser.add_argument('--epochs', default=100, type=int, help='pretraining epochs')
    parser.add_argument('--probe_epochs', default=10, type=int, help='linear-probing epochs')
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = os.path.abspath(args.output_dir)
    data = os.path.join(out, 'digits')
    start = time.time()
    counts = write_digits(data) if not os.path.isdir(data) else None
    print(f'digits: {counts or "reusing"} in {data}', flush=True)

    pretrain = ['--data_path', data, '--output_dir', os.path.join(out, 'pretrain'), '--epochs', args.epochs,
                '--warmup_epochs', 2, '--batch_size', 64, '--blr', 4e-3, '--num_workers', 1, '--print_freq', 100,
                '--knn_data_path', data, '--knn_every', 5, '--knn_train_per_class', 0, '--knn_val_per_class', 0,
                '--knn_feature', knn.DEFAULT_FEATURE, *COMMON]
    pretrain = [str(a) for a in pretrain]
    init = os.path.join(out, 'init.pth')
    save_initial_model(init, pretrain)
    run('main_pretrain.py', *pretrain)  # a rerun continues it, or finds it finished
    trained = os.path.join(out, 'pretrain', 'checkpoint-last.pth')
    with open(os.path.join(out, 'pretrain', 'log.txt')) as f:
        monitor = [(e['epoch'], e['knn_top1'], e['train_loss']) for e in map(json.loads, f) if 'knn_top1' in e]

    rows = {}
    for name, checkpoint in (('initialisation', init), (f'after {args.epochs} epochs', trained)):
        rows[name] = {f'knn_{feature}': knn_accuracy(checkpoint, data, feature) for feature in ('cls', 'mean')}
        rows[name]['linear_probe'] = linear_probe(checkpoint, data, os.path.join(out, f'probe_{len(rows)}'),
                                                  args.probe_epochs)
    pixels = raw_pixel_knn(data)
    result = {'rows': rows, 'raw_pixels_knn20': pixels, 'monitor': monitor, 'minutes': (time.time() - start) / 60,
              'cpu_minutes': cpu_seconds() / 60, 'epochs': args.epochs, 'probe_epochs': args.probe_epochs}
    with open(os.path.join(out, 'evidence.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(table(result))
    return 0


def cpu_seconds() -> float:
    """CPU time of this process and of the scripts it ran (user + system, all cores)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def table(result: dict) -> str:
    lines = ['| encoder | k-NN cls (k=10 / 20 / 200) | k-NN mean (k=10 / 20 / 200) | linear probe (cls) |',
             '|---|---|---|---|']
    for name, row in result['rows'].items():
        cells = [' / '.join(f'{row[key][k]:.1f}' for k in (10, 20, 200)) for key in ('knn_cls', 'knn_mean')]
        lines.append(f'| {name} | {cells[0]} | {cells[1]} | {row["linear_probe"]:.1f} |')
    lines.append(f'| raw pixels | | k=20: {result["raw_pixels_knn20"]:.1f} | |')
    lines.append(f'\nmonitor ({knn.DEFAULT_FEATURE}, k=20; epoch, k-NN top-1, train loss): '
                 + ', '.join(f'({e}, {a:.1f}, {loss:.4f})' for e, a, loss in result['monitor']))
    lines.append(f'total {result["minutes"]:.1f} min wall clock, {result["cpu_minutes"]:.1f} CPU minutes (all cores)')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
