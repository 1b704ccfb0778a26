"""Command-line flags shared by the main_* scripts, and the parser they are read with.

Every flag of the official scripts keeps its name and default; the new ones (device, precision, fault tolerance,
speed) are grouped below. `--help` shows each flag's default and unit; a malformed value is one line, exit 2.
A flag carries its own rules where it is defined: `check=` its range (every value out of range is one line,
exit 2, before any work) and `recipe=True` when it is part of what a run learns (a resume refuses a change;
util/training_plan.py). Checks that relate several flags or look at files are in util/checks.py.
"""
import argparse
import sys
from typing import Any, Callable, Dict, Tuple

from util import pixels
from util.device import AMP_CHOICES, DEVICE_CHOICES
from util.images import DEFAULT_MAX_PIXELS
from util.trackers import TRACKERS


Rule = Tuple[Callable[[Any], bool], str]  # (accepts the parsed value, the requirement in words)
# the recipe flags of every parser built in this process (each script builds its parser before main() runs)
RECIPE: Dict[str, None] = {}  # an ordered set
# k-NN: (similarity - nearest) / T, in util/knn.ranked_classes, stays a finite float64 from here on (|sim| <= 1)
MIN_TEMPERATURE = 1e-300


def number(x: float) -> str:
    return f'{x:g}' if isinstance(x, float) else str(x)


def at_least(low: float, note: str = '') -> Rule:
    """`low` or more (None, an unset optional flag, passes); NaN fails."""
    return (lambda v: v is None or v >= low), f'must be >= {number(low)}{note}'


def above(low: float, note: str = '') -> Rule:
    return (lambda v: v is None or v > low), f'must be > {number(low)}{note}'


def within(low: float, high: float, closed: str = '[]') -> Rule:
    """In the interval from low to high; `closed` says which ends belong to it, as in '[)'."""
    def ok(v):
        return v is None or ((v >= low if closed[0] == '[' else v > low) and
                             (v <= high if closed[1] == ']' else v < high))
    return ok, f'must be in {closed[0]}{number(low)}, {number(high)}{closed[1]}'


POSITIVE_INT: Rule = ((lambda v: v is None or v >= 1), 'must be a positive integer')
SEED: Rule = ((lambda v: 0 <= v < 2 ** 31), 'must be in [0, 2^31) (numpy seeds are 32-bit and each process adds its '
                                            'rank)')
TEMPERATURE: Rule = at_least(MIN_TEMPERATURE, ' (a positive float64)')


def one_of(*choices: str) -> Rule:
    """For string flags whose official parser takes any string (argparse `choices` would change its message)."""
    return (lambda v: v in choices), f'choose from {", ".join(choices)}'


class HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to every flag that takes a value and whose help does not state its default."""

    def _get_help_string(self, action):
        text = action.help or ''
        if '(default' in text or 'required' in text or action.default is argparse.SUPPRESS or action.nargs == 0:
            return text
        if action.option_strings:
            default = 'none' if action.default in (None, '') else '%(default)s'
            text += f' (default: {default})'
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults in --help and a malformed command line reported in one line (exit 2), not
    the whole usage text."""

    def __init__(self, prog: str, description: str, **kwargs):
        """prog: how the user runs it ('main_pretrain.py', 'python -m tools.benchmark'), for usage and errors."""
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
        self.rules = []  # (flag, dest, Rule) of every add_argument(check=...)

    def add_argument(self, *names, check: Rule = None, recipe: bool = False, **kwargs):
        """argparse's, plus the flag's rules: `check` its range, `recipe` whether it is part of the recipe."""
        action = super().add_argument(*names, **kwargs)
        if check is not None:
            flag = action.option_strings[0] if action.option_strings else action.dest
            self.rules.append((flag, action.dest, check))
        if recipe:
            RECIPE[action.dest] = None
        return action

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, then every flag's range: each value out of range is one line on stderr, exit code 2 (also for
        code that calls parse_args itself, as the official scripts do)."""
        parsed, extras = super().parse_known_args(args, namespace)
        problems = self.out_of_range(parsed)
        if problems:
            self.exit(2, ''.join(f'error: {line}\n' for line in problems))
        return parsed, extras

    def out_of_range(self, args: argparse.Namespace) -> list:
        """'--flag value: requirement' for every value that breaks its flag's rule."""
        return [f'{flag} {getattr(args, dest)}: {requirement}' for flag, dest, (ok, requirement) in self.rules
                if not ok(getattr(args, dest))]

    def error(self, message: str):
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def parse_with(parser: ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse argv (default: sys.argv[1:]); the parser checks every flag's range. --log_dir defaults to
    --output_dir."""
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, 'log_dir', '') is None:  # only scripts with an output folder have --log_dir
        args.log_dir = args.output_dir
    return args


def add_schedule_args(parser, batch_size: int, epochs: int, blr: float, weight_decay: float, min_lr: float,
                      warmup_epochs: int):
    parser.add_argument('--batch_size', default=batch_size, type=int, check=POSITIVE_INT,
                        help='images per process and iteration (effective batch: batch_size x accum_iter x '
                             'number of processes)')
    parser.add_argument('--epochs', default=epochs, type=int, check=POSITIVE_INT, help='epochs to train')
    parser.add_argument('--accum_iter', default=1, type=int, check=at_least(1),
                        help='iterations whose gradients are accumulated into one optimizer step (raises the '
                             'effective batch under memory constraints)')
    parser.add_argument('--weight_decay', type=float, default=weight_decay, check=at_least(0), recipe=True,
                        help='AdamW / LARS weight decay (none on biases and norm weights)')
    parser.add_argument('--lr', type=float, default=None, metavar='LR', check=above(0),
                        help='absolute learning rate (default: blr x effective batch / 256)')
    parser.add_argument('--blr', type=float, default=blr, metavar='LR', check=above(0), recipe=True,
                        help='base learning rate: lr = blr x effective batch / 256')
    parser.add_argument('--min_lr', type=float, default=min_lr, metavar='LR', check=at_least(0), recipe=True,
                        help='learning rate at the end of the cosine schedule')
    parser.add_argument('--warmup_epochs', type=int, default=warmup_epochs, metavar='N', check=at_least(0),
                        recipe=True,
                        help='epochs of linear learning-rate warm-up before the cosine decay')


def add_model_args(parser, model: str, classifier: bool = False):
    parser.add_argument('--model', default=model, type=str, metavar='MODEL', help='model name (see models_*.py)')
    if classifier:  # None: resolved by util/classification.resolve_sizes
        add_input_size(parser, None, "image side in pixels, or height and width (default: 224; with --eval, the "
                                     "checkpoint's, and another size interpolates its position embeddings)")
    else:
        add_input_size(parser, 224, 'image side in pixels, or height and width (H W) for rectangular images')
    pixels.add_args(parser, training=True)
    parser.add_argument('--patch_size', default=None, type=int, check=POSITIVE_INT, recipe=True,
                        help="patch side in pixels (default: the model's own, 16 or 14)")
    parser.add_argument('--attn', default='sdpa', choices=('sdpa', 'eager'),
                        help='attention kernel: fused scaled_dot_product_attention, or the official eager formula')


def add_input_size(parser, default, help: str, recipe: bool = True):
    """--input_size H [W]: an int for squares (the official flag), (H, W) for rectangles (util/pixels.py)."""
    parser.add_argument('--input_size', default=default, type=int, nargs='+', action=pixels.SizeAction,
                        metavar='PX', check=(pixels.positive_size, 'must be positive'), recipe=recipe, help=help)


def add_run_args(parser, folders: str):
    """The flags every training script shares: data, outputs and checkpoints, device and processes."""
    add_data_args(parser, folders)
    add_output_args(parser)
    add_nonfinite_args(parser)
    add_runtime_args(parser)


def add_data_args(parser, folders: str):
    parser.add_argument('--data_path', default=None, type=str, recipe=True,
                        help=f'dataset folder holding {folders}, one sub-folder of images per class (the ImageNet '
                             'layout); required')
    parser.add_argument('--num_workers', default=10, type=int, check=at_least(0),
                        help='DataLoader worker processes per process')
    parser.add_argument('--pin_mem', action='store_true',
                        help='pin CPU memory in the DataLoader for faster copies to the accelerator (on by default)')
    parser.add_argument('--no_pin_mem', action='store_false', dest='pin_mem', help='do not pin CPU memory')
    parser.set_defaults(pin_mem=True)
    parser.add_argument('--persistent_workers', action='store_true',
                        help='keep DataLoader workers alive between epochs')
    parser.add_argument('--max_bad_images', default=0.001, type=float, check=at_least(0),
                        help='stop when more images than this could not be read (replaced in training, left out of '
                             'evaluations): a fraction of the dataset if < 1, else a count')
    add_max_image_pixels(parser)


def add_max_image_pixels(parser):
    parser.add_argument('--max_image_pixels', default=DEFAULT_MAX_PIXELS, type=int, check=at_least(0, ' (0: no limit)'),
                        help="images with more pixels are not decoded (Pillow's decompression-bomb limit, a guard "
                             'against files made to exhaust memory); 0: no limit')


def add_output_args(parser):
    parser.add_argument('--output_dir', default='./output_dir',
                        help="folder for checkpoints and logs; '' saves nothing")
    parser.add_argument('--log_dir', default=None, help='TensorBoard folder (default: --output_dir)')
    parser.add_argument('--report_to', default=['tensorboard'], nargs='+', choices=(*TRACKERS, 'none'),
                        help='experiment trackers the run reports to, one or more: tensorboard (in --log_dir), wandb, '
                             "mlflow (each set up by its own environment variables), or none (log.txt only)")
    parser.add_argument('--resume', default='',
                        help='checkpoint to continue from, path or https URL: our .pth (training state too), or '
                             'weights only: a .safetensors file or a Hugging Face ViTMAE folder')
    parser.add_argument('--start_epoch', default=0, type=int, metavar='N', check=at_least(0),
                        help='first epoch when not resuming (a resumed run continues where it stopped)')
    parser.add_argument('--no_auto_resume', action='store_false', dest='auto_resume',
                        help='do not continue from the checkpoint in --output_dir')
    parser.set_defaults(auto_resume=True)
    parser.add_argument('--overwrite', action='store_true',
                        help='with --no_auto_resume: start over in an --output_dir that holds a run')
    parser.add_argument('--allow_recipe_change', action='store_true',
                        help='continue a run whose recipe changed (batch size, learning rate, data, augmentation, '
                             '...); without it such a resume is refused')
    parser.add_argument('--save_every_iters', default=0, type=int, check=at_least(0, ' (0: off)'),
                        help='also update checkpoint-last.pth every N iterations inside an epoch (0: off)')
    parser.add_argument('--keep_last', default=0, type=int, check=at_least(0, ' (0: keep all)'),
                        help='keep only the K newest numbered checkpoints (0: keep all; default %(default)s)')
    parser.add_argument('--print_freq', default=20, type=int, check=at_least(1),
                        help='print a progress line every N iterations')
    parser.add_argument('--verbose', action='store_true',
                        help='also print every setting, the model and the optimizer (always written to '
                             'output_dir/run_details.txt)')


def add_nonfinite_args(parser):
    """What a NaN or infinite loss does (util/rollback.py). The two numbers belong to rollback; util/checks.py
    refuses them without it (their defaults, 200 and 5, are util/rollback.py's)."""
    parser.add_argument('--on_nonfinite', default='stop', choices=('stop', 'rollback'),
                        help='on a NaN or infinite loss: stop with the last good checkpoint, or roll back to a '
                             'snapshot in host memory, skip the bad batch and go on')
    parser.add_argument('--snapshot_every', default=None, type=int, metavar='K', check=at_least(1),
                        help='with --on_nonfinite rollback: snapshot every K optimizer steps (default: 200)')
    parser.add_argument('--max_rollbacks', default=None, type=int, metavar='M', check=at_least(1),
                        help='with --on_nonfinite rollback: stop at the fault after M rollbacks in the run '
                             '(default: 5)')


def add_runtime_args(parser, training: bool = True):
    """Device, precision, seed and processes; training scripts also get --compile and --grad_checkpointing."""
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES,
                        help='backend: auto picks npu, else sdaa, else cuda, else mps, else cpu')
    parser.add_argument('--amp', default=None, choices=AMP_CHOICES,
                        help='mixed precision (default: fp16 on cuda/npu/sdaa, off on cpu/mps)')
    if training:
        parser.add_argument('--compile', action='store_true', help='torch.compile the model')
        parser.add_argument('--grad_checkpointing', action='store_true',
                            help='recompute block activations in backward to save memory')
    parser.add_argument('--seed', default=0, type=int, check=SEED, help='random seed (each process adds its rank)')
    parser.add_argument('--world_size', default=1, type=int,
                        help='accepted for the official command lines; the launcher sets the process count')
    parser.add_argument('--local_rank', '--local-rank', default=-1, type=int,
                        help='accepted for torch.distributed.launch; LOCAL_RANK is read from the environment')
    parser.add_argument('--dist_on_itp', action='store_true', help='read ranks from OpenMPI variables')
    parser.add_argument('--dist_url', default='env://', help='process-group rendezvous URL')
    parser.add_argument('--dist_timeout', default=30, type=float, check=above(0, ' minutes'),
                        help='minutes a collective may wait for a peer before the job fails')


def add_fsdp_args(parser):
    parser.add_argument('--fsdp', action='store_true',
                        help='shard parameters, gradients and optimizer state over the processes (FSDP2) instead of '
                             'replicating them (DDP); start with torchrun. Checkpoints keep the official format')


ADAMW_IMPLS = ('auto', 'fused', 'foreach', 'loop')


def add_adamw_args(parser):
    parser.add_argument('--adamw_impl', default='auto', choices=ADAMW_IMPLS,
                        help="AdamW kernel: auto is torch's choice (foreach on GPUs, as the official runs); fused "
                             'is one kernel, equal to rounding')


def add_classifier_args(parser, global_pool: bool):
    """The sizes left None are resolved by util/classification.resolve_sizes: read off the checkpoint with --eval,
    else the script's defaults."""
    pooling = 'the mean of the patch tokens' if global_pool else 'the class token'
    parser.add_argument('--finetune', default='',
                        help='MAE checkpoint whose encoder training starts from: .pth, .safetensors or a Hugging '
                             'Face ViTMAE folder, path or https URL')
    parser.add_argument('--global_pool', action='store_true', default=None, recipe=True,
                        help=f"classify the mean of the patch tokens (default: {pooling}; with --eval, the "
                             "checkpoint's pooling)")
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='classify the class token instead of the mean of the patch tokens')
    parser.add_argument('--nb_classes', default=None, type=int, check=POSITIVE_INT, recipe=True,
                        help="outputs of the classification head (default: 1000; with --eval, the checkpoint's)")
    parser.add_argument('--eval', action='store_true', help='only evaluate the --resume checkpoint on val/')
    parser.add_argument('--dist_eval', action='store_true',
                        help='share the evaluation images out over the processes (each image counted once)')
