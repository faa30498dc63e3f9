"""Test settings: offline, and hypothesis profiles ("ci" small and derandomised, "thorough" large)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=6, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FXHOOK_HYPOTHESIS_PROFILE", "ci"))

# at most two threads per process: the cores are shared by pytest-xdist's workers (-n) when it runs
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))

_SMOLLM2_FIXTURES = {"smollm2_raw", "smollm2_processed"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n N --dist loadgroup`): a test file runs on one worker, so its module
    fixtures are built once, and every file that uses the SmolLM2 fixtures runs on the same worker,
    so the real model is loaded once."""
    smollm2_files = {item.nodeid.split("::")[0] for item in items
                     if _SMOLLM2_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("smollm2" if path in smollm2_files else path))


# --------------------------------------------------------------------------- the real model, loaded once
# Loading and capturing SmolLM2 takes most of a minute: every test file shares these two.
@pytest.fixture(scope="session")
def smollm2_raw():
    """SmolLM2-135M-Instruct (packaged, offline), weights as in HF (logits equal HF's)."""
    from fxhook import HookedTransformer

    return HookedTransformer.from_pretrained_no_processing("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_processed():
    """The same model processed as TransformerLens does (what the examples load)."""
    from fxhook import HookedTransformer

    return HookedTransformer.from_pretrained("smollm2", device="cpu", dtype="float32")


# --------------------------------------------------------------------------- support table
# `@pytest.mark.support(family, feature)`: this test checks `feature` for `family` (tests/support.py).
# With FXHOOK_SUPPORT_JSON=path the outcomes are written there for scripts/support_table.py.
import support  # noqa: E402

_records: list[support.Record] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"support(family, feature): the test checks feature ({', '.join(support.FEATURES)}) for "
                   "a model family ('*': the families it draws); feeds the README support table")


def _support_tags(item) -> list[tuple[str, str]]:
    tags = []
    for mark in item.iter_markers("support"):
        family, feature = mark.args
        if feature not in support.FEATURES:
            raise pytest.UsageError(f"{item.nodeid}: support feature {feature!r} is not one of {support.FEATURES}")
        tags.append((family, feature))
    return tags


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    support.reset_seen()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    tags = _support_tags(item)
    if not tags:
        return
    report = outcome.get_result()
    record = next((r for r in _records if r.nodeid == item.nodeid), None)
    if record is None:
        record = support.Record(item.nodeid, tags)
        _records.append(record)
    record.seen |= support.seen()
    if report.failed:
        record.outcome = "failed"
    elif report.skipped and record.outcome == "passed":
        record.outcome = "skipped"


def pytest_sessionfinish(session):
    path = os.environ.get(support.ENV_VAR)
    if path and os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError(f"{support.ENV_VAR} records outcomes in one process: run without -n")
    if path and _records:
        support.write(path, _records)
