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


__all__ = ["load", "LossccError", "SpecError", "BuildError", "LoadError", "__version__"]
