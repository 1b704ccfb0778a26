"""docs/ARCHITECTURE.md is true: every file it names exists, and every `file.py:name` is defined in that file."""
import ast
import os
import re

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
