import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config):
    # The environment must say it before Python starts (transformers reads it at import); say so loudly.
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        raise pytest.UsageError("run the tests with HF_HUB_OFFLINE=1 set in the environment")


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" must never pass silently
    if session.testscollected == 0 and exitstatus == 5:
        session.exitstatus = 1


@pytest.fixture(scope="session")
def minilm():
    from mmkd_core.teachers import create_teacher

    return create_teacher("minilm-l6")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA
