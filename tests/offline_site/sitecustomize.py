"""Start-up hook: Python imports `sitecustomize` in every process whose sys.path holds this folder.

tests/conftest.py prepends this folder to PYTHONPATH for the whole test session, so that the Python subprocesses
started by tests (examples/*.py, `accelerate launch` and its torchrun workers) refuse network access like the
pytest process does. See offline_guard.py.
"""

import importlib.machinery
import importlib.util
import os
import sys

import offline_guard


offline_guard.install()

# This file shadows any sitecustomize further down sys.path (some distributions ship one): run that one too.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
)
if _spec is not None and _spec.loader is not None:
    _next = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_next)
