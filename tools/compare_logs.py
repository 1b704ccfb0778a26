"""Compare the loss curves of two runs' log.txt (say a GPU run and an NPU run of one recipe), the check vendor
ports are accepted on: pass when the mean relative error or the mean absolute error is within its threshold.

python -m tools.compare_logs gpu_run/log.txt npu_run/log.txt --max_mre 0.05 --max_mae 2e-4 --png curves.png
Exit code 0: pass, 1: fail, 2: the logs cannot be compared.
"""
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageDraw

from util import args as cli

COLOURS = ((31, 119, 180), (214, 39, 40))


class LogError(ValueError):
    """A log cannot be read or compared; the message is one line."""


def read_curve(path: str, key: str) -> Dict[int, float]:
    """epoch -> value of `key` from a log.txt of JSON lines (the last entry wins if an epoch repeats)."""
    if not os.path.isfile(path):
        raise LogError(f'{path}: no such file')
    curve = {}
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise LogError(f'{path}:{number}: not a JSON line (is this a log.txt of this codebase?)') from None
            if key in entry:
                curve[int(entry.get('epoch', len(curve)))] = float(entry[key])
    if not curve:
        raise LogError(f'{path}: no "{key}" values (choose --key from the log, e.g. train_loss)')
    return curve


def compare(reference: Dict[int, float], candidate: Dict[int, float]) -> dict:
    """Per-epoch values on the shared epochs, the mean relative error (relative to the reference) and the
    mean absolute error."""
    epochs = sorted(set(reference) & set(candidate))
    if not epochs:
        raise LogError('the two logs share no epoch')
    rows = []
    for epoch in epochs:
        ref, cand = reference[epoch], candidate[epoch]
        abs_err = abs(cand - ref)
        rows.append({'epoch': epoch, 'reference': ref, 'candidate': cand, 'abs_error': abs_err,
                     'rel_error': abs_err / abs(ref) if ref else math.inf})
    return {'epochs': epochs, 'rows': rows,
            'mean_relative_error': sum(r['rel_error'] for r in rows) / len(rows),
            'mean_absolute_error': sum(r['abs_error'] for r in rows) / len(rows),
            'missing_in_candidate': sorted(set(reference) - set(candidate)),
            'missing_in_reference': sorted(set(candidate) - set(reference))}


def verdict(result: dict, max_mre: Optional[float], max_mae: Optional[float]) -> Tuple[bool, str]:
    """Pass when any given threshold holds (ports use 'MRE <= 5% or MAE <= 2e-4')."""
    checks = []
    mre, mae = result['mean_relative_error'], result['mean_absolute_error']
    if max_mre is not None:
        checks.append((mre <= max_mre, f"MRE {mre:.4%} {'<=' if mre <= max_mre else '>'} {max_mre:.4%}"))
    if max_mae is not None:
        checks.append((mae <= max_mae, f"MAE {mae:.3e} {'<=' if mae <= max_mae else '>'} {max_mae:.3e}"))
    passed = any(ok for ok, _ in checks)
    return passed, ' or '.join(text for _, text in checks)


def plot(curves: List[Tuple[str, Dict[int, float]]], path: str, key: str, size=(720, 420)):
    """Both curves on one set of axes, with a legend: a PNG drawn with PIL alone."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 45
    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    epochs = sorted({e for _, c in curves for e in c})
    values = [v for _, c in curves for v in c.values()]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1
    e_lo, e_hi = epochs[0], max(epochs[-1], epochs[0] + 1)

    def xy(epoch, value):
        x = left + (epoch - e_lo) / (e_hi - e_lo) * (width - left - right)
        y = top + (hi - value) / (hi - lo) * (height - top - bottom)
        return x, y
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        _, y = xy(e_lo, value)
        draw.line([left - 4, y, left, y], fill='black')
        draw.text((4, y - 6), f'{value:.4g}', fill='black')
    for epoch in epochs[:: max(1, len(epochs) // 8)]:
        x, _ = xy(epoch, lo)
        draw.line([x, height - bottom, x, height - bottom + 4], fill='black')
        draw.text((x - 6, height - bottom + 8), str(epoch), fill='black')
    draw.text((width // 2 - 20, height - 18), 'epoch', fill='black')
    draw.text((left, 10), key, fill='black')
    for (name, curve), colour in zip(curves, COLOURS):
        points = [xy(e, curve[e]) for e in sorted(curve)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    for i, ((name, _), colour) in enumerate(zip(curves, COLOURS)):
        y = top + 8 + 16 * i
        draw.line([width - right - 230, y + 6, width - right - 210, y + 6], fill=colour, width=3)
        draw.text((width - right - 205, y), name[-32:], fill='black')
    image.save(path)


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.compare_logs', 'Compare the loss curves of two runs')
    parser.add_argument('reference', help='log.txt of the reference run (e.g. the GPU run)')
    parser.add_argument('candidate', help='log.txt of the run to check (e.g. the NPU run)')
    parser.add_argument('--key', default='train_loss', help='which logged value to compare')
    parser.add_argument('--max_mre', type=float, default=0.05, help='pass if mean relative error <= this')
    parser.add_argument('--max_mae', type=float, default=2e-4, help='or if mean absolute error <= this')
    parser.add_argument('--png', default='loss_curves.png', help='where to save the plot of both curves')
    parser.add_argument('--json', default=None, help='also write the comparison as JSON')
    return parser


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        reference = read_curve(args.reference, args.key)
        candidate = read_curve(args.candidate, args.key)
        result = compare(reference, candidate)
    except LogError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'{"epoch":>6}  {"reference":>12}  {"candidate":>12}  {"abs err":>10}  {"rel err":>8}')
    for row in result['rows']:
        print(f"{row['epoch']:>6}  {row['reference']:>12.6f}  {row['candidate']:>12.6f}  {row['abs_error']:>10.3e}"
              f"  {row['rel_error']:>8.3%}")
    for label in ('missing_in_candidate', 'missing_in_reference'):
        if result[label]:
            print(f"note: epochs {result[label]} are {label.replace('_', ' ')}")
    passed, reason = verdict(result, args.max_mre, args.max_mae)
    plot([(args.reference, reference), (args.candidate, candidate)], args.png, args.key)
    result.update(passed=passed, reason=reason, png=args.png)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=2)
    print(f"{'PASS' if passed else 'FAIL'}: {reason} over {len(result['epochs'])} epochs; curves in {args.png}")
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
