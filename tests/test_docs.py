"""docs/ARCHITECTURE.md is true: every file it names exists, and every `file.py:name` is defined in that file; the
README's test command says what it deselects."""
import ast
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

DOC = os.path.join(ROOT, 'docs', 'ARCHITECTURE.md')


def defined_names(path: str) -> set:
    """Top-level functions, classes and assignments, and the methods of its classes."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(n.name for n in node.body if isinstance(n, ast.FunctionDef))
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_every_file_and_function_the_architecture_doc_names_exists_there():
    text = open(DOC).read()
    references = re.findall(r'`([\w/]+\.(?:py|md))(?::(\w+))?', text)
    assert len(references) > 60
    missing = []
    for path, name in references:
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):
            missing.append(path)
        elif name and name not in defined_names(full):
            missing.append(f'{path}:{name}')
    assert not missing, missing


@pytest.mark.slow
def test_the_readme_test_command_says_how_many_gpu_tests_it_deselected():
    """Under -n (the README's command) the workers collect, not the controller that prints the summary: the
    'gpu tests deselected' line was lost."""
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '1', '-p', 'no:cacheprovider',
                           os.path.join('tests', 'test_gpu.py')], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    said = re.search(r'^(\d+) gpu tests deselected: no CUDA device here', proc.stdout, re.MULTILINE)
    if torch.cuda.is_available():  # they run there
        assert said is None, proc.stdout[-2000:]
    else:
        assert said and int(said.group(1)) > 0, proc.stdout[-2000:]
