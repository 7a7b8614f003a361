import os

import pytest
import torch

# The tests use tiny matrices: one thread avoids oversubscription, which slows
# small LAPACK calls by an order of magnitude on a loaded 2-core machine.
torch.set_num_threads(1)

#: Under CI (``CI=true``, as .ci/run is started) every dataset, weight file and optional dependency is installed by
#: ``make install``, so a test skipped for a missing one is a failure of the install step, not a reason to skip.
#: ``DLRT_ALLOW_SKIPS=1`` turns this off. Tests marked ``gpu`` may still skip.
STRICT_SKIPS = os.environ.get("CI", "").lower() in ("1", "true", "yes") and os.environ.get("DLRT_ALLOW_SKIPS") != "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_root(tmp_path):
    """A directory of small generated MNIST idx files (96 training and 40 test images)."""
    from .test_data_demo import write_idx

    root = tmp_path / "mnist"
    write_idx(root, n_train=96, n_test=40)
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT_SKIPS and report.skipped and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where make install provides everything: {reason}"


def load_benchmark(name: str):
    """The script ``benchmarks/NAME.py`` as a module (the folder is no package), loaded once.

    The folder goes on ``sys.path`` first, so that the script's own imports (``benchlib``)
    resolve as when it runs.
    """
    import importlib.util
    import sys
    from pathlib import Path

    key = f"benchmark_{name}"
    if key not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "benchmarks"
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        spec = importlib.util.spec_from_file_location(key, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]
