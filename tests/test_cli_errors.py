"""Bad input is caught before any work: one line naming the flag, exit code 2, nothing written."""

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
from conftest import TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, run_in_process, run_script

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
    ('main_pretrain.py', ['--model', 'mae_vit_gigantic'],
     '--model mae_vit_gigantic: unknown MAE model; choose from mae_vit_tiny_patch16, mae_vit_small_patch16, '
     'mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14'),
    ('main_finetune.py', ['--model', 'vit_gigantic'], '--model vit_gigantic: unknown classifier; choose from '
     'vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16, vit_huge_patch14'),
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
    import models_vit
    torch.save({'model': models_vit.vit_small_patch16(num_classes=4).state_dict()}, tmp_path / 'small.pth')
    argv = base_flags('main_finetune.py', places) + ['--eval', '--resume', tmp_path / 'small.pth']
    code, _, err = run_in_process(main_finetune, argv, capsys)
    assert code == 2 and len(err) == 1
    assert 'does not fit --model vit_tiny_patch16: patch 16 px in the checkpoint, 4 px in the model' in err[0]
    assert 'embed dim 384 and 12 blocks in the checkpoint, 192 and 12 in the model' in err[0]
    assert 'shape mismatch' in err[0] and 'small.pth' in err[0]
