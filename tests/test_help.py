"""`--help` of every script and tool: each flag that takes a value shows its default (or says it is required), and
no help text is cut off or carries unbalanced brackets."""
import importlib

import pytest

SCRIPTS = ['main_pretrain', 'main_finetune', 'main_linprobe', 'main_infer', 'main_knn', 'tools.benchmark',
           'tools.compare_logs', 'tools.export', 'tools.gpu_check', 'tools.knn_evidence']
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


@pytest.mark.parametrize('module_name', SCRIPTS)
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


def test_the_pretraining_help_says_what_it_reads_and_what_the_mask_ratio_is():
    _, helps = flag_helps('main_pretrain')
    text = {action.option_strings[0]: help_text for action, help_text in helps}
    assert 'train/ (val/ is not read)' in text['--data_path']
    assert text['--mask_ratio'].startswith('fraction of the patches hidden')
    assert '(default: 0.75)' in text['--mask_ratio']
    assert '(default: 400)' in text['--epochs'] and '(default: 64)' in text['--batch_size']
    assert '(default: mae_vit_large_patch16)' in text['--model'] and '(default: 0.001)' in text['--blr']
