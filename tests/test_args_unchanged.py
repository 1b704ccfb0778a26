"""args is what the user typed, before and after each script's main(): run values (the learning rate, the sizes
a checkpoint decides, the demo's start-over) are returned and passed, never written into it."""
import pytest

from conftest import PHOTO, TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, run_script

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
def runs(texture_data, tmp_path_factory):
    """A tiny MAE checkpoint and a fine-tuned classifier, both made by the scripts."""
    tmp = tmp_path_factory.mktemp('runs')
    run_script('main_pretrain.py', *TINY_PRETRAIN_ARGS, *ONE_EPOCH, '--data_path', texture_data, '--output_dir',
               tmp / 'pretrain', check=True)
    run_script('main_finetune.py', *TINY_CLASSIFIER_ARGS, *ONE_EPOCH, '--data_path', texture_data, '--finetune',
               tmp / 'pretrain' / 'checkpoint-last.pth', '--output_dir', tmp / 'finetune', check=True)
    return tmp


def script_commands(data, runs, out):
    mae, classifier = runs / 'pretrain' / 'checkpoint-last.pth', runs / 'finetune' / 'checkpoint-best.pth'
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
def test_args_after_main_are_exactly_what_the_user_typed(case, runs, texture_data, tmp_path):
    command = script_commands(texture_data, runs, tmp_path / 'out')[case]
    proc = run_script('-c', CHECK, *command, check=True)
    assert 'args changed: nothing' in proc.stdout, proc.stdout[-2000:]


def test_a_checkpoint_saves_the_args_as_typed_and_the_lr_it_trained_with_is_recomputed_from_them():
    """A resumed run's recipe check reads the peak lr from the saved args (blr x effective batch / 256) whether
    or not they hold it: ours leave --lr unset, the official code wrote its lr there."""
    import argparse
    from util.training_plan import recipe_changes
    ours = argparse.Namespace(lr=None, blr=1e-3, batch_size=16, accum_iter=1)
    official = argparse.Namespace(lr=1e-3 * 16 / 256, blr=1e-3, batch_size=16, accum_iter=1)
    assert recipe_changes(ours, official, 1, 1) == recipe_changes(official, ours, 1, 1) == []
    assert recipe_changes(ours, argparse.Namespace(**{**vars(ours), 'lr': 1e-4}), 1, 1) == [
        'lr 6.25e-05 (now 0.0001)']
