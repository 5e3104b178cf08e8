"""The `>>>` examples in the library's docstrings run, and say what the code returns.

Every top-level module (and data/arith/prepare.py) is collected by `python -m pytest -q`
through this file; a module whose source holds an example must run at least one.
"""

import doctest
import glob
import importlib
import importlib.util
import os

import pytest

from conftest import ROOT

MODULES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "*.py"))) + ["data/arith/prepare.py"]


def load(path):
    if os.path.dirname(path) == "":
        return importlib.import_module(path[:-3])
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_library_is_all_here():
    assert {"task.py", "voices.py", "files.py", "tokenizer.py", "model.py", "options.py", "checkpoints.py", "evaluate.py",
            "training.py", "rewards.py", "rfprm.py", "processbench.py", "grpo_objective.py", "grpo.py"} <= set(MODULES)


@pytest.mark.parametrize("path", MODULES)
def test_doctests(path):
    has_examples = ">>>" in open(os.path.join(ROOT, path), encoding="utf-8").read()
    result = doctest.testmod(load(path), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests of {path} failed (printed above)"
    if has_examples:
        assert result.attempted > 0, f"{path} has >>> examples but none ran"
