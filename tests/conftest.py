"""Shared fixtures and the markers. The fixtures hand out what tests/helpers.py and tests/distributed.py define
(import those directly in code that runs in a worker process: a fixture cannot be pickled into one).

    tiny_detector   helpers.TinyDetector: tiny_detector(seed=1) builds one (float64, R-CNN parameter names)
    make_config     helpers.make_config(*opts, config="configs/shapes/sgd.yaml", register=False, num_workers=1)
    free_port       a free TCP port on 127.0.0.1 (distributed.free_port)
    run_workers     distributed.run_workers(fn, world_size, *args, timeout=120, start_method=None, threads=1)
    one_thread      torch.set_num_threads(1) from the first test that asks for it to the end of its module

Markers: ``slow`` (end-to-end runs in subprocesses or worker processes, seconds each; ``make test-fast`` skips
them) and ``cuda`` (needs a GPU).
"""
import pytest
import torch

import distributed
import helpers


def pytest_configure(config):
    # detectron2 0.6 uses numpy / Pillow / torch APIs that now warn on every call: noise, not our code
    for message in (r"`np\.(int|bool|float)` is a deprecated alias", "LINEAR is deprecated",
                    r".*torch\.jit\.script.* is deprecated", r"torch\.meshgrid"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one, run by tools/gpu_check.sh")
    config.addinivalue_line("markers", "slow: an end-to-end run in subprocesses / worker processes, seconds each; "
                            "`make test-fast` (-m 'not slow') skips it")


@pytest.fixture(scope="session")
def tiny_detector():
    """The TinyDetector class of tests/helpers.py: call it (with its arguments) for a model."""
    return helpers.TinyDetector


@pytest.fixture(scope="session")
def make_config():
    """helpers.make_config: a validated config from a YAML (default configs/shapes/sgd.yaml) + KEY VALUE pairs."""
    return helpers.make_config


@pytest.fixture
def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return distributed.free_port()


@pytest.fixture(scope="session")
def run_workers():
    """distributed.run_workers: fn(rank, world_size, *args) in N gloo CPU worker processes, results by rank."""
    return distributed.run_workers


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the rest of the module: tiny models and CPU convs on a busy 2-core machine run
    several times faster with one OpenMP thread than with two (measured: BatchNorm2d on 1x32x32x32, 16 ms with 2
    threads vs 0.65 ms with 1 at load 10 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
