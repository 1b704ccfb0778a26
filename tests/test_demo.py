"""The first README command: `python main_pretrain.py --demo`, here with a reduced budget."""
import argparse
import json
import os
import signal

import pytest
import torch
from conftest import (
    ROOT,
    TINY_PRETRAIN_ARGS,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
    script_command,
    start_process,
    wait_for_line,
)
from PIL import Image

import main_pretrain
from tools.demo import DEMO_DEFAULTS


@pytest.mark.slow
def test_demo_pretrains_and_shows_it_learned(tmp_path):
    out = tmp_path / 'demo_output'
    proc = run_script('main_pretrain.py', '--demo', '--epochs', '3', '--demo_images', '24', '--output_dir', out,
                      '--data_path', out / 'data', check=True)
    # the real training code wrote the official outputs
    assert {'checkpoint-last.pth', 'checkpoint-2.pth', 'log.txt', 'reconstruction_before.png',
            'reconstruction_after.png', 'demo_result.json'} <= set(os.listdir(out))
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out))
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1, 2]
    assert 'img/s' in proc.stdout and 'loss' in proc.stdout
    # before / after numbers, and the after error is lower
    result = json.loads((out / 'demo_result.json').read_text())
    assert result['held_out_error_after'] < result['held_out_error_before']
    assert (f"{result['held_out_error_before']:.4f} before training -> {result['held_out_error_after']:.4f} after"
            in proc.stdout)
    # one row of 4 titled panels (240 px each) per held-out class
    figure = Image.open(out / 'reconstruction_after.png')
    assert figure.size == (4 * 240, 8 * 240 + 40)
    # where everything went and what to run next
    for text in (f'Everything is in {out}/', 'tensorboard --logdir', 'python main_finetune.py',
                 'python main_linprobe.py', 'python main_infer.py'):
        assert text in proc.stdout


@pytest.mark.slow
def test_the_next_step_printed_by_the_demo_runs(tmp_path):
    out = tmp_path / 'demo_output'
    run_script('main_pretrain.py', '--demo', '--epochs', '1', '--demo_images', '8', '--output_dir', out,
               '--data_path', out / 'data', check=True)
    proc = run_script('main_finetune.py', '--data_path', out / 'data', '--model', 'vit_tiny_patch16',
                      '--input_size', '64', '--patch_size', '8', '--nb_classes', '8', '--finetune',
                      out / 'checkpoint-last.pth', '--epochs', '1', '--batch_size', '16', '--num_workers', '0',
                      '--output_dir', out / 'finetune', check=True)
    assert '* Acc@1' in proc.stdout


def test_the_demo_settings_give_the_images_and_the_few_hundred_optimizer_steps_the_readme_promises():
    """The demo's defaults against what they are for: the README's image counts, an MAE that learns within a few
    hundred optimizer steps (one process), a warm-up that ends, a training plan the checks accept."""
    import main_pretrain
    from tools.demo import DEMO_VAL_IMAGES
    from tools.synthetic import CLASSES
    from util import flags as cli
    from util.training_plan import check_training_plan
    parser = main_pretrain.get_args_parser()
    parser.set_defaults(**DEMO_DEFAULTS)
    args = cli.parse_with(parser, [])
    train_images, held_out = len(CLASSES) * args.demo_images, len(CLASSES) * DEMO_VAL_IMAGES
    steps = args.epochs * (train_images // (args.batch_size * args.accum_iter))
    grid = args.input_size // args.patch_size
    readme = ' '.join(open(os.path.join(ROOT, 'README.md')).read().split())
    assert (f'pretrained for {args.epochs} epochs on {train_images:,} procedurally generated images, {held_out} '
            'held out') in readme
    assert f'across the {grid}x{grid} patch grid' in readme and 'within a few hundred steps' in readme
    assert 200 <= steps < 1000 and args.warmup_epochs < args.epochs
    check_training_plan(train_images, args.data_path, args, world_size=1)  # no refusal
    assert args.output_dir == 'demo_output' and args.data_path.startswith(args.output_dir)


def test_a_demo_rerun_with_another_seed_starts_over_instead_of_a_refused_resume(tmp_path):
    """A resumed run cannot take another --seed (refused); the demo must start over rather than try."""
    import main_pretrain
    from tools.demo import decide_continue_or_start_over
    from util import flags as cli
    parser = main_pretrain.get_args_parser()
    parser.set_defaults(**{**DEMO_DEFAULTS, 'output_dir': str(tmp_path / 'demo_output')})
    args = cli.parse_with(parser, ['--seed', '1'])
    os.makedirs(args.output_dir)
    saved = argparse.Namespace(**{**vars(args), 'seed': 0})
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 2, 'args': saved}, os.path.join(args.output_dir,
                                                                                       'checkpoint-last.pth'))
    typed = dict(vars(args))
    assert decide_continue_or_start_over(args) is False and vars(args) == typed


def test_demo_refuses_a_real_run_and_a_real_dataset_and_changes_neither(tmp_path):
    run = tmp_path / 'my_run'
    run.mkdir()
    (run / 'checkpoint-1.pth').write_bytes(b'weights of a week of training')
    (run / 'log.txt').write_text('{"epoch": 0}\n')
    dataset = tmp_path / 'imagenet'
    (dataset / 'train' / 'n01440764').mkdir(parents=True)
    (dataset / 'train' / 'n01440764' / '00000.jpg').write_bytes(b'a real photo')
    before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
    proc = run_script('main_pretrain.py', '--demo', '--output_dir', run, '--data_path', dataset)
    assert proc.returncode == 2
    assert '--output_dir' in proc.stderr and '--data_path' in proc.stderr and 'Traceback' not in proc.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()} == before


@pytest.mark.slow
def test_a_second_demo_replaces_the_first_and_its_outputs_and_says_so(tmp_path):
    out = tmp_path / 'demo_output'
    # a fine-tuning run of the first demo's model, left by its next step; a linear probe of another model
    for name, model in (('finetune', out / 'checkpoint-last.pth'), ('linprobe', tmp_path / 'mae_pretrain.pth')):
        (out / name).mkdir(parents=True)
        (out / name / 'log.txt').write_text('{"epoch": 0}\n')
        torch.save({'model': {}, 'args': argparse.Namespace(finetune=str(model))}, out / name / 'checkpoint-0.pth')
    procs = [run_script('main_pretrain.py', '--demo', '--epochs', '1', '--demo_images', '8', '--output_dir', out,
                        '--data_path', out / 'data', check=True) for _ in range(2)]
    # said before anything is deleted: the fine-tuning run of the demo's model goes, the other run stays
    assert (f"Demo: starting over in {out} (no earlier demo run): it deletes the fine-tuning run in "
            f"{out / 'finetune'}/ (trained from the previous demo's model; the commands printed at the end make it "
            'again)\n') in procs[0].stdout
    assert procs[0].stdout.index('Demo: starting over') < procs[0].stdout.index('Epoch: [0]')
    assert (f'Demo: starting over in {out} (the previous demo finished): it replaces the checkpoints, log.txt and '
            'TensorBoard files there\n') in procs[1].stdout
    assert [e['epoch'] for e in read_json_log(out)] == [0]
    assert len([n for n in os.listdir(out) if n.startswith('events.out.tfevents')]) == 1  # not one per run
    assert not (out / 'finetune').exists() and (out / 'linprobe' / 'checkpoint-0.pth').is_file()


@pytest.mark.slow
def test_ctrl_c_during_the_demo_then_the_same_command_continues_it(tmp_path):
    out = tmp_path / 'demo_output'
    command = script_command('main_pretrain.py', '--demo', '--epochs', '3', '--demo_images', '24', '--output_dir',
                             out, '--data_path', out / 'data', '--num_workers', '0', '--print_freq', '2')
    proc = start_process(command, tmp_path / 'first.log', own_group=True)
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [2/', proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    assert 'rerun the same command to continue' in open(tmp_path / 'first.log').read()
    again = run_script(*command[1:], check=True)
    assert 'Demo: continuing the interrupted demo' in again.stdout and 'Demo finished' in again.stdout
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1, 2]


def test_demo_without_an_output_folder_is_refused(tmp_path):
    proc = run_script('main_pretrain.py', '--demo', '--output_dir', '', '--data_path', tmp_path / 'data')
    assert proc.returncode == 2 and "--output_dir '': --demo needs a folder" in proc.stderr
    assert not (tmp_path / 'data').exists()


@pytest.mark.slow
def test_demo_under_torchrun_generates_its_images_once_and_runs(tmp_path):
    out = tmp_path / 'demo_output'
    proc = run_torchrun('main_pretrain.py', '--demo', '--epochs', '1', '--demo_images', '8', '--output_dir', out,
                      '--data_path', out / 'data', '--num_workers', '0', '--batch_size', '8')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Demo images: generating') == 1 and 'Demo finished' in proc.stdout


def test_a_plain_pretraining_run_does_not_take_over_the_demos_folder(texture_data, tmp_path, capsys):
    demo_out = tmp_path / 'demo_output'
    demo_out.mkdir()
    (demo_out / 'demo_run.json').write_text('{"demo": true}')
    (demo_out / 'log.txt').write_text('{"epoch": 0}\n')
    code, _, err = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', demo_out,
                                                  *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and err == [f"error: --output_dir {demo_out}: holds the built-in demo's run; choose another "
                                 '--output_dir (or rerun the demo with --demo)']


def test_a_demo_rerun_with_no_auto_resume_is_not_refused_for_the_folder_it_owns(tmp_path):
    """The demo decides itself whether it continues or replaces its own run; --no_auto_resume must not make the
    output-folder check refuse it (as it refuses a plain run)."""
    from util import flags as cli
    from util.checks import check_output
    from util.checks import DEMO_RUN_MARKER
    out = tmp_path / 'demo_output'
    out.mkdir()
    (out / 'log.txt').write_text('{"epoch": 0}\n')
    (out / DEMO_RUN_MARKER).write_text('{}')
    parser = main_pretrain.get_args_parser()
    parser.set_defaults(**{**DEMO_DEFAULTS, 'output_dir': str(out)})
    errors = []
    check_output(cli.parse_with(parser, ['--demo', '--no_auto_resume']), errors)
    assert errors == []
    check_output(cli.parse_with(main_pretrain.get_args_parser(), ['--output_dir', str(out), '--no_auto_resume']),
                 errors)
    assert len(errors) == 2  # a plain run: the demo's folder, and a folder holding a run


def test_an_interrupted_demo_rerun_with_no_auto_resume_starts_over_and_says_why(tmp_path, capsys):
    from tools.demo import decide_continue_or_start_over
    from util import flags as cli
    parser = main_pretrain.get_args_parser()
    parser.set_defaults(**{**DEMO_DEFAULTS, 'output_dir': str(tmp_path / 'demo_output')})
    args = cli.parse_with(parser, ['--demo', '--no_auto_resume'])
    os.makedirs(args.output_dir)
    saved = argparse.Namespace(**vars(args))
    torch.save({'model': {}, 'optimizer': {}, 'epoch': 0, 'epoch_in_progress': {'epoch': 1, 'iteration': 3},
                'args': saved}, os.path.join(args.output_dir, 'checkpoint-last.pth'))
    assert decide_continue_or_start_over(args) is False
    assert f'Demo: starting over in {args.output_dir} (--no_auto_resume)' in capsys.readouterr().out
