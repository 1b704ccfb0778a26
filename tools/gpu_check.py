"""What only a GPU can show, in one command: `pytest -m gpu`, then the benchmarks the README quotes (MAE ViT-B/16
pretraining and ViT-B fine-tuning steps beside the eager-attention and official baselines, --compile, the step
fed by real JPEGs, the input pipeline), written to one JSON report with each target marked met or not.

python -m tools.gpu_check --json gpu_report.json                       # about 7 minutes on one H100 / H200
python -m tools.gpu_check --device cpu --tiny --skip_tests --json r.json   # the same code paths on a CPU (CI)

The real JPEGs are made from the photograph in tests/data (random crops at ImageNet sizes), so nothing is
downloaded. Exit code 0 when the tests passed (the benchmark targets are reported, not enforced), 1 otherwise.
"""
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Dict, List

from PIL import Image

from util import flags as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTO = os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg')
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 400))
# (what, value key, target): the targets for an H100/H200-class GPU
TARGETS = [('MAE ViT-B/16 bf16 pretraining, synthetic, img/s', 'synthetic_images_per_sec', 6000),
           ('same, fraction of the matmul peak', 'fraction_of_matmul_peak', 0.45),
           ('real JPEGs end to end / synthetic', 'end_to_end_vs_synthetic', 0.8),
           ('ours / the official step (fp16, eager attention)', 'speedup_vs_official', 1.5),
           ('--compile / eager, img/s', 'compile_speedup', 1.0)]


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.gpu_check', 'The gpu tests and the benchmarks, one JSON report')
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='where to run the benchmarks')
    parser.add_argument('--tiny', action='store_true',
                        help='tiny models, one timed step, no --compile run: checks the tool itself')
    parser.add_argument('--skip_tests', action='store_true', help='leave out pytest -m gpu')
    parser.add_argument('--num_workers', default=os.cpu_count(), type=int,
                        help='DataLoader workers for the real-JPEG runs (default: every core)')
    parser.add_argument('--json', default='gpu_report.json', help='where the report goes')
    return parser


def make_jpegs(root: str, count: int, seed: int = 0) -> str:
    """root/train/<2 classes>/*.jpg: random crops of the test photograph, resized to ImageNet sizes."""
    rng = random.Random(seed)
    photo = Image.open(PHOTO).convert('RGB')
    for i in range(count):
        w, h = rng.choice(IMAGENET_SIZES)
        left, top = rng.randint(0, photo.width // 3), rng.randint(0, photo.height // 3)
        crop = photo.crop((left, top, left + photo.width * 2 // 3, top + photo.height * 2 // 3)).resize((w, h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, 'train', f'class_{i % 2}')
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
    return root


def run_gpu_tests(report_dir: str) -> Dict:
    """pytest -m gpu: counts, failures, and the peak-memory lines the memory test prints."""
    junit = os.path.join(report_dir, 'gpu_tests.xml')
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-s', '-p', 'no:cacheprovider',
                           f'--junitxml={junit}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = {'exit_code': proc.returncode, 'seconds': time.time() - start,
              'peak_memory': [line.strip() for line in proc.stdout.splitlines() if 'batch 64 fp16: peak' in line],
              'output_tail': proc.stdout[-4000:]}
    if os.path.isfile(junit):
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
        result.update({key: int(suite.get(key, 0)) for key in ('tests', 'failures', 'errors', 'skipped')})
        result['failed'] = [case.get('name') for case in suite.iter('testcase')
                            if case.find('failure') is not None or case.find('error') is not None]
    return result


def benchmark(flags: List[str], report_dir: str, name: str) -> Dict:
    """One `python -m tools.benchmark` run in its own process (a fresh GPU); its JSON."""
    out = os.path.join(report_dir, f'{name}.json')
    proc = subprocess.run([sys.executable, '-m', 'tools.benchmark', *flags, '--json', out], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        return {'error': proc.stderr[-3000:], 'command': flags}
    with open(out) as f:
        return json.load(f)


def benchmark_plan(args, data: str) -> Dict[str, List[str]]:
    if args.tiny:
        mae = ['--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--batch_size', '8']
        vit = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--batch_size', '8']
        steps = ['--warmup', '0', '--steps', '1', '--windows', '1']
    else:
        mae = ['--model', 'mae_vit_base_patch16', '--batch_size', '256']
        vit = ['--model', 'vit_base_patch16', '--batch_size', '128']
        steps = ['--warmup', '5', '--steps', '10', '--windows', '3']
    common = ['--device', args.device, '--amp', 'bf16', *steps]
    workers = ['--num_workers', str(args.num_workers)]
    plan = {'pretrain': [*mae, *common, '--compare', '--official', '--end_to_end', '--data_path', data, *workers],
            'pretrain_compiled': [*mae, *common, '--compile'],
            'finetune': [*vit, *common, '--compare', '--official'],
            'pipeline': ['--pipeline', '--data_path', data, *workers, '--device', args.device,
                         '--pipeline_batches', '2' if args.tiny else '40']}
    if args.tiny:  # compiling takes a minute on a CPU; the gpu tests cover --compile
        del plan['pretrain_compiled']
    return plan


def summary(results: Dict) -> Dict:
    """The figures the README and the targets need, read off the benchmark JSONs."""
    figures = {}
    pretrain = results.get('pretrain', {})
    if 'steps' in pretrain:
        ours = pretrain['steps'][0]
        figures.update(synthetic_images_per_sec=ours['images_per_sec'],
                       fraction_of_matmul_peak=ours['fraction_of_matmul_peak'], peak_mem_gib=ours['peak_mem_gib'],
                       speedup_vs_eager=ours.get('speedup_vs_eager'),
                       speedup_vs_official=ours.get('speedup_vs_official'),
                       matmul_peak_tflops=pretrain['matmul_peak_tflops'])
        rows = pretrain.get('end_to_end', [])
        if rows:
            figures['end_to_end_images_per_sec'] = max(row['images_per_sec'] for row in rows)
            figures['end_to_end_vs_synthetic'] = max(row['vs_synthetic'] for row in rows)
    compiled = results.get('pretrain_compiled', {})
    if 'steps' in compiled and 'synthetic_images_per_sec' in figures:
        figures['compile_speedup'] = compiled['steps'][0]['images_per_sec'] / figures['synthetic_images_per_sec']
    finetune = results.get('finetune', {})
    if 'steps' in finetune:
        figures.update(finetune_images_per_sec=finetune['steps'][0]['images_per_sec'],
                       finetune_speedup_vs_eager=finetune['steps'][0].get('speedup_vs_eager'),
                       finetune_peak_mem_gib=finetune['steps'][0]['peak_mem_gib'])
    figures['targets'] = [{'what': what, 'value': figures.get(key), 'target': target,
                           'met': figures.get(key) is not None and figures[key] >= target}
                          for what, key, target in TARGETS]
    return figures


def main(argv=None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    report = {'device': args.device, 'tiny': args.tiny, 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    with tempfile.TemporaryDirectory(prefix='mae-gpu-check-') as work:
        if not args.skip_tests:
            report['gpu_tests'] = run_gpu_tests(work)
        data = make_jpegs(os.path.join(work, 'jpegs'), 96 if args.tiny else 2048)
        plan = benchmark_plan(args, data)
        report['benchmarks'] = {name: benchmark(flags, work, name) for name, flags in plan.items()}
    report['summary'] = summary(report['benchmarks'])
    with open(args.json, 'w') as f:
        json.dump(report, f, indent=2)
    for target in report['summary']['targets']:
        value = target['value']
        shown = 'not measured' if value is None else f'{value:.3g}'
        print(f"{'met' if target['met'] else 'NOT met':>8}  {target['what']}: {shown} (target {target['target']})")
    tests = report.get('gpu_tests')
    passed = tests is None or (tests['exit_code'] == 0)
    print(f'report: {args.json}' + ('' if passed else f"; gpu tests FAILED: {tests.get('failed')}"))
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
