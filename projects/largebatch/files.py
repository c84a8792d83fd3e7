"""Small helpers shared by the trainer and the tools."""
import os
import tempfile


def atomic_write(path: str, write, mode: str = "w") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it into place: readers (and a
    later ``--resume``) never see a half-written file, whatever stops the writer."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"), "wb")
