"""Shared test setup.

``import distill`` comes first: it lets torchvision import on machines where its C++ extension
cannot load (see distill/_compat.py), before torchmetrics, timm or smp import torchvision.
"""

import os
import sys
from pathlib import Path

import distill  # noqa: F401  (side effect: torchvision compatibility step)
import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests name factories as `helpers:tiny`; the folder must be importable in every process.
sys.path.insert(0, str(REPO / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
from helpers import CAMVID, CAMVID_PLACES  # noqa: E402  (the path above first)


@pytest.fixture
def camvid_root() -> Path:
    """The real CamVid folder; the test is skipped when it is absent."""
    if not (CAMVID / "train").is_dir():
        pytest.skip("CamVid data not found (looked in " + ", ".join(str(p) for p in CAMVID_PLACES)
                    + "; set DISTILL_CAMVID to its folder)")
    return CAMVID


# Modules whose tests start processes or train end to end go first: `make test` runs two workers
# that steal work from each other, so the long tests start early and the short ones fill the end,
# instead of one long test running alone while the other worker waits.
SLOW_MODULES_FIRST = ("test_bench_smoke.py", "test_distributed.py", "test_api.py", "test_reliability.py",
                      "test_notebook.py", "test_recipes.py", "test_cache.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keeps its order
