"""losscc: declare a loss as math in YAML, get fused, stable C kernels for value and gradient.

    losscc build specs/          # -> build/losses
    losses = losscc.load("build/losses")
    value, grad = losses.L2Loss().value_and_grad(pred, label)

Importing losscc is cheap: sympy, jinja2 and the compiler stages load only when building.
"""

__version__ = "0.1.0"

from .errors import BuildError, LoadError, LossccError, SpecError  # noqa: E402


def load(path):
    """Import a built loss module (a folder written by `losscc build`) and return it."""
    from .runtime import load_module

    return load_module(path)


def set_num_threads(n: int) -> None:
    """Use at most `n` threads per kernel call (default: $LOSSCC_NUM_THREADS, else every
    core this process may use). Results are the same bits for any thread count."""
    from .runtime import set_num_threads as _set

    _set(n)


def get_num_threads() -> int:
    """The thread count kernel calls use (see set_num_threads)."""
    from .runtime import get_num_threads as _get

    return _get()


__all__ = ["load", "set_num_threads", "get_num_threads", "LossccError", "SpecError", "BuildError", "LoadError", "__version__"]
