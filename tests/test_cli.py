"""Bad input is caught before any work: one line naming the flag, exit code 2, nothing written."""

import argparse
import importlib
import re

import pytest
import torch
from conftest import PHOTO, TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, colour_folder, run_in_process, run_script

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit
from tools.synthetic import CLASSES, make_image_folder

SCRIPTS = {'main_pretrain.py': main_pretrain, 'main_finetune.py': main_finetune, 'main_linprobe.py': main_linprobe}


@pytest.fixture
def places(tmp_path, texture_data):
    empty = tmp_path / 'empty'
    empty.mkdir()
    no_classes = tmp_path / 'no_classes'
    (no_classes / 'train').mkdir(parents=True)
    (no_classes / 'val').mkdir()
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    held = tmp_path / 'held'
    held.mkdir()
    (held / 'log.txt').write_text('{"epoch": 0}\n')
    weights = tmp_path / 'weights.pth'
    torch.save({'model': {'w': torch.zeros(1)}}, weights)
    return dict(data=texture_data, empty=empty, no_classes=no_classes, text=text, tmp=tmp_path,
                unwritable=blocker / 'sub', held=held, weights=weights)


# (script, flags, the one line expected on stderr); {data}, {empty}... are filled from the fixture
CASES = [
    ('main_pretrain.py', [], '--data_path: required; point it at a folder holding train/'),
    ('main_pretrain.py', ['--data_path', '{tmp}/nowhere'], '--data_path {tmp}/nowhere: no such folder'),
    ('main_pretrain.py', ['--data_path', '{empty}'], '--data_path {empty}: has no train/ folder'),
    ('main_finetune.py', ['--data_path', '{empty}'], '--data_path {empty}: has no train/ or val/ folder'),
    ('main_linprobe.py', ['--data_path', '{empty}', '--eval', '--resume', '{weights}'],
     '--data_path {empty}: has no val/ folder'),
    ('main_pretrain.py', ['--data_path', '{no_classes}'], "{no_classes}/train: Couldn't find any class folder"),
    ('main_finetune.py', ['--model', 'mae_vit_base_patch16'],
     '--model mae_vit_base_patch16: that is an MAE (pretraining) model; use it with main_pretrain.py'),
    ('main_pretrain.py', ['--model', 'vit_base_patch16'], '--model vit_base_patch16: that is a classifier; use it '
     'with main_finetune.py or main_linprobe.py'),
    ('main_pretrain.py', ['--mask_ratio', '1.0'], '--mask_ratio 1.0: must be in [0, 1)'),
    ('main_pretrain.py', ['--mask_ratio', '-0.1'], '--mask_ratio -0.1: must be in [0, 1)'),
    ('main_pretrain.py', ['--batch_size', '0'], '--batch_size 0: must be a positive integer'),
    ('main_pretrain.py', ['--epochs', '0'], '--epochs 0: must be a positive integer'),
    ('main_finetune.py', ['--accum_iter', '0'], '--accum_iter 0: must be >= 1'),
    ('main_pretrain.py', ['--blr', '-1'], '--blr -1.0: must be > 0'),
    ('main_pretrain.py', ['--warmup_epochs', '-2'], '--warmup_epochs -2: must be >= 0'),
    ('main_pretrain.py', ['--input_size', '30'], '--input_size 30: must be divisible by the patch size 4'),
    ('main_finetune.py', ['--layer_decay', '1.5'], '--layer_decay 1.5: must be in (0, 1]'),
    ('main_finetune.py', ['--drop_path', '1.0'], '--drop_path 1.0: must be in [0, 1)'),
    ('main_finetune.py', ['--num_workers', '-1'], '--num_workers -1: must be >= 0'),
    ('main_pretrain.py', ['--mask_ratio', '0'], '--mask_ratio 0.0: hides none of the 64 patches (32 px images, '
                                                '4 px patches), and the loss is computed on hidden patches only'),
    ('main_pretrain.py', ['--mask_ratio', '0.99'], '--mask_ratio 0.99: leaves none of the 64 patches'),
    ('main_linprobe.py', ['--batch_size', '1'], '--batch_size 1: the BatchNorm before the linear head normalises '
                                                'over the batch'),
    ('main_pretrain.py', ['--save_freq', '0'], '--save_freq 0: must be >= 1'),
    ('main_pretrain.py', ['--seed', '-1'], '--seed -1: must be in [0, 2^31)'),
    ('main_finetune.py', ['--cutmix_minmax', '0.5'], '--cutmix_minmax [0.5]: must be two fractions'),
    ('main_finetune.py', ['--remode', 'noise'], '--remode noise: choose from pixel, rand, const'),
    ('main_finetune.py', ['--min_lr', '0.01'], '--min_lr 0.01: above the peak learning rate 6.25e-05'),
    ('main_finetune.py', ['--color_jitter', '-1'], '--color_jitter -1.0: must be >= 0'),
    ('main_finetune.py', ['--mixup', '0.8', '--batch_size', '15'], '--batch_size 15: mixup/cutmix needs an even '
     'batch size'),
    ('main_finetune.py', ['--aa', 'bogus'], '--aa bogus: not an augmentation policy timm knows'),
    ('main_finetune.py', ['--nb_classes', '2'], '--nb_classes 2: {data} has 4 classes'),
    ('main_pretrain.py', ['--resume', '{tmp}/missing.pth'], '--resume {tmp}/missing.pth: no such file'),
    ('main_pretrain.py', ['--resume', '{tmp}'], '--resume {tmp}: is a folder, not a checkpoint file'),
    ('main_finetune.py', ['--finetune', '{tmp}/missing.pth'], '--finetune {tmp}/missing.pth: no such file'),
    ('main_finetune.py', ['--finetune', '{text}'], '{text}: not a readable checkpoint'),
    ('main_finetune.py', ['--eval', '--resume', '{text}'], '{text}: not a readable checkpoint'),
    ('main_finetune.py', ['--eval', '--finetune', '{weights}'], '--eval: no weights to evaluate; pass the '
     'fine-tuned or linear-probe checkpoint as --resume'),
    ('main_linprobe.py', ['--eval'], '--eval: no weights to evaluate'),
    ('main_pretrain.py', ['--output_dir', '{unwritable}'], '--output_dir {unwritable}: cannot create or write'),
    ('main_pretrain.py', ['--output_dir', '{held}', '--no_auto_resume'],
     '--output_dir {held}: already holds a run (checkpoint-last.pth, log.txt); rerun without --no_auto_resume'),
    ('main_pretrain.py', ['--save_every_iters', '3', '--accum_iter', '2'],
     '--save_every_iters 3: must be a multiple of --accum_iter 2'),
    ('main_pretrain.py', ['--device', 'npu'], '--device npu: torch_npu is not installed (pip install torch-npu '
     'matching your torch and CANN versions)'),
    ('main_finetune.py', ['--device', 'sdaa'], '--device sdaa: torch_sdaa is not installed'),
    ('main_linprobe.py', ['--device', 'mps'], '--device mps: MPS is not available'),
]


def base_flags(script, places):
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    return ['--data_path', places['data'], *tiny, '--output_dir', str(places['tmp'] / 'out')]


@pytest.mark.parametrize('script, flags, expected', CASES, ids=[f'{c[0]}:{" ".join(c[1])}' for c in CASES])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(script, flags, expected, places, capsys):
    flags = [f.format(**places) for f in flags]
    argv = [str(a) for a in base_flags(script, places)] + flags
    if script == 'main_pretrain.py' and not any('--data_path' in f for f in flags) and expected.startswith(
            '--data_path: required'):
        argv = argv[2:]  # drop the default --data_path
    code, _, err_lines = run_in_process(SCRIPTS[script], argv, capsys)
    assert code == 2 and len(err_lines) == 1, err_lines
    assert err_lines[0].startswith('error: ' + expected.format(**places)), err_lines[0]
    assert not (places['tmp'] / 'out').exists()


@pytest.mark.parametrize('flags, expected', [
    (['--model', 'mae_vit_gigantic'], 'error: --model mae_vit_gigantic: unknown MAE model; choose from'),
    (['--device', 'npu'], 'error: --device npu: torch_npu is not installed'),
    (['--amp', 'fp8'], "argument --amp: invalid choice: 'fp8'"),
])
def test_the_cli_itself_exits_2_with_the_message(flags, expected, places):
    proc = run_script('main_pretrain.py', *base_flags('main_pretrain.py', places), *flags)
    assert proc.returncode == 2 and expected in proc.stderr
    assert not (places['tmp'] / 'out').exists()


def test_several_bad_flags_are_all_reported(places, capsys):
    argv = base_flags('main_pretrain.py', places) + ['--mask_ratio', '2', '--epochs', '0']
    _, _, err = run_in_process(main_pretrain, argv, capsys)
    assert sorted(err) == ['error: --epochs 0: must be a positive integer',
                           'error: --mask_ratio 2.0: must be in [0, 1)']


def test_a_checkpoint_of_another_model_is_named_not_dumped(places, tmp_path, capsys):
    torch.save({'model': models_vit.vit_small_patch16(num_classes=4).state_dict()}, tmp_path / 'small.pth')
    argv = base_flags('main_finetune.py', places) + ['--eval', '--resume', tmp_path / 'small.pth']
    code, _, err = run_in_process(main_finetune, argv, capsys)
    assert code == 2 and len(err) == 1
    assert 'does not fit --model vit_tiny_patch16: patch 16 px in the checkpoint, 4 px in the model' in err[0]
    assert 'embed dim 384 and 12 blocks in the checkpoint, 192 and 12 in the model' in err[0]
    assert 'shape mismatch' in err[0] and 'small.pth' in err[0]


def six_images(tmp_path):
    return colour_folder(tmp_path / 'data', {'train': {'a': 3, 'b': 3}, 'val': {'a': 1, 'b': 1}})


@pytest.mark.parametrize('script', list(SCRIPTS))
@pytest.mark.parametrize('flags, world_size, expected', [
    (['--batch_size', '8'], 1, '--batch_size 8: the 6 images in {train} make no full batch, so an epoch would '
                               'take no optimizer step; use --batch_size 6 or less'),
    (['--batch_size', '4'], 2, '--batch_size 4: the 6 images (3 per process, 2 processes) in {train} make no full '
                               'batch'),
    (['--batch_size', '2', '--accum_iter', '4'], 1, '--accum_iter 4: an epoch has 3 iterations of 2 images per '
                                                    'process (6 images in {train}, 1 process) and one optimizer '
                                                    'step takes 4'),
], ids=['batch', 'processes', 'accum_iter'])
def test_an_epoch_without_an_optimizer_step_is_refused_before_any_work(script, flags, world_size, expected,
                                                                      tmp_path, capsys, monkeypatch):
    data = six_images(tmp_path)
    if world_size > 1:  # what torchrun sets; the check runs before the process group would be joined
        monkeypatch.setenv('RANK', '0')
        monkeypatch.setenv('WORLD_SIZE', str(world_size))
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', data, '--output_dir', out, *tiny, *flags],
                                       capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ' + expected.format(train=data / 'train')), err
    assert not out.exists() and stdout == ''


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_an_empty_train_folder_and_a_text_file_checkpoint_are_refused_before_anything_is_printed(script, tmp_path,
                                                                                                capsys):
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'val' / 'a').mkdir(parents=True)
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', empty, '--output_dir', out, *tiny], capsys)
    assert code == 2 and len(err) == 1 and 'Found no valid file for the classes a' in err[0] and stdout == ''
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    flag = '--resume' if script == 'main_pretrain.py' else '--finetune'
    good = colour_folder(tmp_path / 'data', {'train': {'a': 16, 'b': 16}, 'val': {'a': 1}})
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', good, '--output_dir', out, *tiny, flag, text],
                                       capsys)
    assert code == 2 and err == [f'error: {text}: not a readable checkpoint (it is neither a file written by '
                                 "torch.save nor a safetensors file; it starts with b'not ')"]
    assert stdout == '' and not out.exists()


@pytest.mark.parametrize('script', ['main_pretrain.py', 'main_infer.py', '-m tools.benchmark'])
def test_a_malformed_value_is_one_line_not_the_usage_text(script):
    argv = script.split() + ['--batch_size' if script != 'main_infer.py' else '--topk', 'abc']
    proc = run_script(argv[0], *argv[1:])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid int value: 'abc'" in proc.stderr and proc.stderr.startswith('error: ')


HELP_MODULES = ['main_pretrain', 'main_finetune', 'main_linprobe', 'main_infer', 'main_knn', 'tools.benchmark',
                'tools.compare_logs', 'tools.export', 'tools.gpu_check', 'tools.knn_evidence']
# the flags a parser requires, for reading its defaults
REQUIRED = {'main_infer': ['--model', 'x', '--resume', 'x', '--img_path', 'x'],
            'tools.export': ['--to', 'hf', 'a', 'b'],
            'tools.compare_logs': ['a', 'b']}
PAIRS = {'(': ')', '[': ']', '{': '}'}


def balanced(text: str) -> bool:
    stack = []
    for char in text:
        if char in PAIRS:
            stack.append(PAIRS[char])
        elif char in PAIRS.values() and (not stack or stack.pop() != char):
            return False
    return not stack


def flag_helps(module_name: str):
    parser = importlib.import_module(module_name).get_args_parser()
    formatter = parser._get_formatter()
    return parser, [(action, formatter._expand_help(action) if action.help else '') for action in parser._actions
                    if action.option_strings and action.dest != 'help']


@pytest.mark.parametrize('module_name', HELP_MODULES)
def test_every_flag_states_its_default_and_its_help_reads_whole(module_name):
    parser, helps = flag_helps(module_name)
    for action, text in helps:
        flag = action.option_strings[0]
        assert text.strip(), f'{flag} has no help'
        assert balanced(text), f'{flag}: unbalanced brackets in {text!r}'
        assert '" + "' not in text and not text.rstrip().endswith(('(', ',', 'for')), f'{flag}: {text!r}'
        if action.nargs != 0:  # a flag that takes a value
            assert 'default' in text or 'required' in text, f'{flag} does not show its default: {text!r}'
    usage = parser.format_usage()
    runs_as = f'python -m {module_name}' if module_name.startswith('tools.') else f'{module_name}.py'
    assert usage.startswith(f'usage: {runs_as} '), usage  # how the user runs it, not a title


@pytest.mark.parametrize('module_name', HELP_MODULES)
def test_the_default_each_help_shows_is_the_one_the_parser_uses(module_name):
    """'(default: X)' in --help is the value a run gets without the flag (the formatter reads it off the parser,
    so a default changed in the code shows in the help)."""
    parser, helps = flag_helps(module_name)
    real = vars(parser.parse_args(REQUIRED.get(module_name, [])))
    shown = 0
    for action, text in helps:
        match = re.search(r'\(default: ([^)]*)\)$', text)
        if match and '(default' not in (action.help or ''):  # appended by the formatter, not written by hand
            value = real[action.dest]
            expected = 'none' if value in (None, '') else str(value)
            assert match.group(1) == expected, f'{action.option_strings[0]}: help says {match.group(1)}, runs with '
            shown += 1
    assert shown >= 1


def test_the_pretraining_help_says_what_it_reads_and_what_the_mask_ratio_is():
    _, helps = flag_helps('main_pretrain')
    text = {action.option_strings[0]: help_text for action, help_text in helps}
    assert 'train/ (val/ is not read)' in text['--data_path']
    assert text['--mask_ratio'].startswith('fraction of the patches hidden')


# runs the script's main() (main_infer: run()) on the parsed command line in a fresh process and compares
CHECK = '''
import copy, importlib, sys
import util
name, entry = sys.argv[1], sys.argv[2]
module = importlib.import_module(name)
from util import flags as cli
args = cli.parse_with(module.get_args_parser(), sys.argv[3:])
typed = copy.deepcopy(vars(args))
getattr(module, entry)(args)
changed = {k: (typed.get(k), v) for k, v in vars(args).items() if typed.get(k, object()) != v}
changed.update({k: (v, 'deleted') for k, v in typed.items() if k not in vars(args)})
print('args changed:', changed if changed else 'nothing')
'''


ONE_EPOCH = ['--epochs', '1', '--warmup_epochs', '0']


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """A few images, a tiny MAE checkpoint and a 4-class classifier of 32-px images in 4-px patches."""
    tmp = tmp_path_factory.mktemp('runs')
    make_image_folder(str(tmp / 'data'), {'train': 4, 'val': 2}, size=32, classes=CLASSES[:4])
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, tmp / 'mae.pth')
    classifier = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=True)
    torch.save({'model': classifier.state_dict()}, tmp / 'classifier.pth')
    return tmp


def script_commands(data, runs, out):
    mae, classifier = runs / 'mae.pth', runs / 'classifier.pth'
    tiny_sizes = TINY_CLASSIFIER_ARGS[:6]  # --model, --input_size, --patch_size
    return {
        'pretrain': ('main_pretrain', 'main', *TINY_PRETRAIN_ARGS, *ONE_EPOCH, '--data_path', data,
                     '--output_dir', out),
        'finetune': ('main_finetune', 'main', *TINY_CLASSIFIER_ARGS, *ONE_EPOCH, '--data_path', data, '--finetune',
                     mae, '--output_dir', out),
        'finetune --eval, sizes from the checkpoint': ('main_finetune', 'main', '--model', 'vit_tiny_patch16',
                                                       '--eval', '--resume', classifier, '--data_path', data,
                                                       '--num_workers', '0', '--output_dir', ''),
        'linprobe': ('main_linprobe', 'main', *TINY_CLASSIFIER_ARGS, *ONE_EPOCH, '--data_path', data, '--finetune',
                     mae, '--output_dir', out),
        'knn': ('main_knn', 'main', *tiny_sizes, '--resume', mae, '--data_path', data, '--num_workers', '0',
                '--nb_knn', '5'),
        'infer': ('main_infer', 'run', '--model', 'vit_tiny_patch16', '--resume', classifier, '--img_path', PHOTO),
    }


@pytest.mark.slow
@pytest.mark.parametrize('case', ['pretrain', 'finetune', 'finetune --eval, sizes from the checkpoint', 'linprobe',
                                  'knn', 'infer'])
def test_args_after_main_are_exactly_what_the_user_typed(case, runs, tmp_path):
    command = script_commands(runs / 'data', runs, tmp_path / 'out')[case]
    proc = run_script('-c', CHECK, *command, check=True)
    assert 'args changed: nothing' in proc.stdout, proc.stdout[-2000:]


def test_a_checkpoint_saves_the_args_as_typed_and_the_lr_it_trained_with_is_recomputed_from_them():
    """A resumed run's recipe check reads the peak lr from the saved args (blr x effective batch / 256) whether
    or not they hold it: ours leave --lr unset, the official code wrote its lr there."""
    from util.training_plan import recipe_changes
    ours = argparse.Namespace(lr=None, blr=1e-3, batch_size=16, accum_iter=1)
    official = argparse.Namespace(lr=1e-3 * 16 / 256, blr=1e-3, batch_size=16, accum_iter=1)
    assert recipe_changes(ours, official, 1, 1) == recipe_changes(official, ours, 1, 1) == []
    assert recipe_changes(ours, argparse.Namespace(**{**vars(ours), 'lr': 1e-4}), 1, 1) == [
        'lr 6.25e-05 (now 0.0001)']


# every model the README's tables name, in the order they are listed
MAE_MODELS = ('mae_vit_tiny_patch16, mae_vit_small_patch16, mae_vit_base_patch16, mae_vit_large_patch16, '
              'mae_vit_huge_patch14, mae_vit_giant_patch14, mae_vit_2b_patch14')
CLASSIFIERS = MAE_MODELS.replace('mae_', '')


@pytest.mark.parametrize('script, flags, expected', [
    ('main_pretrain.py', ['--model', 'mae_vit_gigantic'],
     f'--model mae_vit_gigantic: unknown MAE model; choose from {MAE_MODELS}'),
    ('main_finetune.py', ['--model', 'vit_gigantic'], f'--model vit_gigantic: unknown classifier; choose from '
                                                      f'{CLASSIFIERS}'),
    ('main_linprobe.py', ['--model', 'vit_gigantic'], f'--model vit_gigantic: unknown classifier; choose from '
                                                      f'{CLASSIFIERS}'),
])
def test_an_unknown_model_name_lists_every_model_there_is(script, flags, expected, places, capsys):
    code, _, err_lines = run_in_process(SCRIPTS[script], [str(a) for a in base_flags(script, places)] + flags, capsys)
    assert code == 2 and err_lines == ['error: ' + expected]


def test_the_official_parse_args_pattern_checks_the_ranges_too(capsys):
    """Code written like the official scripts (main(get_args_parser().parse_args())) gets the same refusal."""
    with pytest.raises(SystemExit) as exit_info:
        main_pretrain.get_args_parser().parse_args(['--batch_size', '0', '--mask_ratio', 'nan'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ['error: --batch_size 0: must be a positive integer',
                                                    'error: --mask_ratio nan: must be in [0, 1)']


def test_the_mask_ratio_check_names_the_flag_it_checks():
    errors = []
    main_pretrain.check_mask_ratio(0.99, 32, 4, errors, flag='--mask_ratio_end')
    assert errors[0].startswith('--mask_ratio_end 0.99: leaves none of the 64 patches')
