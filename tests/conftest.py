import os
import sys

# the package lives in projects/largebatch (installed editable by `make`); make the tests work from a bare checkout too
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))


def pytest_configure(config):
    # detectron2 0.6 uses numpy / Pillow / torch APIs that now warn on every call: noise, not our code
    for message in (r"`np\.(int|bool|float)` is a deprecated alias", "LINEAR is deprecated",
                    r".*torch\.jit\.script.* is deprecated", r"torch\.meshgrid"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}")
