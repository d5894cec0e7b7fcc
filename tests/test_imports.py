"""Every module of the project imports when it is the first project module imported (no import cycle).

A cycle such as ``reconstructor -> pretrain -> reconstructor`` fails only when a particular module is
imported first, so each module is imported first in its own fresh interpreter. To keep this fast, one
child interpreter imports the third-party libraries once and then forks a process per project module,
in which that module is the first project module imported; where ``fork`` is missing, each module gets
a plain fresh interpreter of its own. An ``ImportError`` (or any other error at import) fails the test.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tokencompress_env", "agents", "callbacks", "experiments")
#: Third-party libraries the child imports before forking (their import time is paid once).
PRELOAD = (
    "numpy",
    "torch",
    "torch.utils.tensorboard",
    "transformers",
    "transformers.activations",
    "transformers.models.gpt2.modeling_gpt2",
    "datasets",
    "gymnasium",
    "stable_baselines3",
    "sb3_contrib",
    "tokenizers",
    "safetensors",
    "matplotlib.pyplot",
    "accelerate",
)


def project_modules() -> list[str]:
    """Every module and package of the project, found on disk (nothing is imported here).

    :return: dotted module names
    """
    names: list[str] = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return sorted(names)


FORKING_CHILD = r"""
import importlib, os, sys, traceback
for lib in sys.argv[1].split(","):
    try:
        importlib.import_module(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(",")], "a project module was preloaded"
failed = []
for name in sys.argv[3:]:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        failed.append(name)
print("FAILED:" + ",".join(failed))
sys.exit(1 if failed else 0)
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_modules_are_found():
    modules = project_modules()
    assert "tokencompress_env.reconstructor" in modules and "tokencompress_env.presets" in modules
    assert "callbacks.checkpoint" in modules and "experiments.train_ppo" in modules


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork; see test_each_module_imports_first_without_fork")
def test_each_module_imports_first_in_a_fresh_interpreter():
    modules = project_modules()
    result = subprocess.run(
        [sys.executable, "-c", FORKING_CHILD, ",".join(PRELOAD), ",".join(PACKAGES), *modules],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"modules that fail to import first: {result.stdout.strip()}\n{result.stderr[-4000:]}"


def test_each_module_imports_first_without_fork():
    if hasattr(os, "fork"):
        pytest.skip("the forking test covers every module where fork exists")
    failed = []
    for module in project_modules():
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            failed.append(f"{module}: {result.stderr.strip().splitlines()[-1]}")
    assert not failed, failed


def test_reconstructor_does_not_import_the_trainer():
    """Loading sits below training: importing the reconstructor loads neither pretraining nor the presets."""
    code = "import sys, tokencompress_env.reconstructor; print(sorted(m for m in sys.modules if m.endswith(('.pretrain', '.presets'))))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "[]"


def import_graph() -> dict[str, set[str]]:
    """Which project modules each project module imports, anywhere in its source (function bodies included).

    :return: module -> the project modules it imports
    """
    files = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} & files.keys()
                deps |= {f"{node.module}.{alias.name}" for alias in node.names} & files.keys()
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names} & files.keys()
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle_even_inside_functions():
    """A deferred import inside a function hides a cycle from the import test above; this reads the source."""
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    cycles = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if reaches(b, a))
    assert not cycles, cycles
