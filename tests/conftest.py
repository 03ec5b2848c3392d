"""Shared fixtures, and the strict-skip switch CI sets.

With DCAE_STRICT_SKIPS=1 (set by .ci/run) a test that skips fails instead: missing shared data or a missing test
dependency must not make the reference-value tests vanish silently. The one exception is a skip whose reason starts
with ROOT_FEATURE: tests of fixes that need a kernel or root feature the CI machine may lack (user namespaces,
setpriv); docs/hardening.md lists which fixes those tests are the only test of. Likewise HARDWARE: a test that only
means something on hardware this CPU lacks (native bf16) says so and skips.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ROOT_FEATURE = "needs a root feature:"  # skip reasons with these prefixes are still allowed in strict mode
HARDWARE = "hardware:"


def strict_skips() -> bool:
    return os.environ.get("DCAE_STRICT_SKIPS", "") not in ("", "0")


def _strict(report) -> None:
    """Turn a skip into a failure under DCAE_STRICT_SKIPS, unless its reason names a root feature."""
    if not (strict_skips() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if ROOT_FEATURE in reason or HARDWARE in reason:
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under DCAE_STRICT_SKIPS=1 (CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module-level pytest.importorskip skips at collection
    _strict(outcome.get_result())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_dir() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread oversubscription makes them 10x slower.

    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
