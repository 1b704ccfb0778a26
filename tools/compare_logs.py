"""Compare the loss curves of two runs' log.txt (say a GPU run and an NPU run of one recipe), the check vendor
ports are accepted on: pass when the mean relative error or the mean absolute error is within its threshold.
Writes a figure (matplotlib, headless) of both curves and the per-epoch relative error, by default next to the
candidate log as compare_<key>.png.

python -m tools.compare_logs gpu_run/log.txt npu_run/log.txt --max_mre 0.05 --max_mae 2e-4
Exit code 0: pass, 1: fail, 2: the logs cannot be compared.
"""
import json
import math
import os
import sys
from typing import Dict, List, Optional, Tuple

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from util import flags as cli

MARKED_EPOCHS = 60  # longer curves are drawn as lines only


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


def plot(curves: List[Tuple[str, Dict[int, float]]], result: dict, key: str, max_mre: Optional[float],
         verdict_line: str, path: str):
    """Two panels drawn off-screen with matplotlib (Agg: no display needed on a cluster): both curves of `key` per
    epoch (markers, so a one-epoch run still shows), and the per-epoch relative error with the --max_mre line;
    the legend sits above the curves, never on them."""
    figure = Figure(figsize=(8, 6.5), dpi=100, layout='constrained', facecolor='white')
    values, errors = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    # the candidate's markers are hollow, so a point both runs share shows both
    for (name, curve), (colour, marker, fill, style) in zip(curves, (('tab:blue', 'o', 'tab:blue', '-'),
                                                                     ('tab:red', 's', 'none', '--'))):
        epochs = sorted(curve)
        values.plot(epochs, [curve[e] for e in epochs], color=colour, linestyle=style, label=name,
                    marker=marker if len(epochs) <= MARKED_EPOCHS else None, markersize=6, markerfacecolor=fill)
    values.set_ylabel(key)
    values.grid(alpha=0.3)
    values.legend(loc='lower left', bbox_to_anchor=(0, 1.02), frameon=False, fontsize=9)
    figure.suptitle(verdict_line, fontsize=11)
    epochs = [row['epoch'] for row in result['rows']]
    errors.plot(epochs, [100 * row['rel_error'] for row in result['rows']], color='black', marker='o', markersize=4,
                label='|candidate - reference| / |reference|')
    if max_mre is not None:
        errors.axhline(100 * max_mre, color='tab:orange', linestyle=':', label=f'--max_mre {max_mre:.2%}')
    every_epoch = sorted({e for _, curve in curves for e in curve})
    errors.set_xlim(every_epoch[0] - 0.5, every_epoch[-1] + 0.5)  # a one-epoch run gets an axis around its epoch
    errors.set_xlabel('epoch')
    errors.set_ylabel('relative error (%)')
    errors.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    errors.set_ylim(bottom=0)
    errors.grid(alpha=0.3)
    errors.legend(loc='best', fontsize=9)
    figure.savefig(path)


def default_png(candidate: str, key: str) -> str:
    """Next to the candidate log, named for what it shows: <candidate's folder>/compare_<key>.png."""
    return os.path.join(os.path.dirname(os.path.abspath(candidate)), f'compare_{key}.png')


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.compare_logs', 'Compare the loss curves of two runs')
    parser.add_argument('reference', help='log.txt of the reference run (e.g. the GPU run)')
    parser.add_argument('candidate', help='log.txt of the run to check (e.g. the NPU run)')
    parser.add_argument('--key', default='train_loss', help='which logged value to compare')
    parser.add_argument('--max_mre', type=float, default=0.05, help='pass if mean relative error <= this')
    parser.add_argument('--max_mae', type=float, default=2e-4, help='or if mean absolute error <= this')
    parser.add_argument('--png', default=None,
                        help="where to save the figure of both curves and their relative error (default: "
                             "compare_<key>.png in the candidate log's folder)")
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
    verdict_line = f"{'PASS' if passed else 'FAIL'}: {reason} over {len(result['epochs'])} epochs"
    png = args.png or default_png(args.candidate, args.key)
    plot([(f'reference: {args.reference}', reference), (f'candidate: {args.candidate}', candidate)], result,
         args.key, args.max_mre, verdict_line, png)
    result.update(passed=passed, reason=reason, png=png)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(result, f, indent=2)
    print(f'{verdict_line}; figure in {png}')
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
