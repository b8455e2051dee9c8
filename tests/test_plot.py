"""`losscc plot` and `loss.plot()` (losscc/plot.py): the tutorial's curves.

The curves are checked against closed forms written here in numpy (each says where it comes
from), and every built-in loss is rendered and checked to be a picture of two curves.
"""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from losscc.errors import LossccError  # noqa: E402
from losscc.plot import plot_data  # noqa: E402

from conftest import SPECS  # noqa: E402


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# (loss, closed form of the loss and its derivative along the plotted input, where from)
CURVES = {
    # the tutorial's regression losses at label 0: 0.5 x^2 and |x|
    "L2Loss": (lambda x: 0.5 * x * x, lambda x: x),
    "L1Loss": (np.abs, np.sign),
    # classification at label 1: log(1 + e^-x) (logistic, sigmoid BCE), max(0, 1 - x) (hinge)
    "LogisticLoss": (lambda x: np.log1p(np.exp(-x)), lambda x: -_sigmoid(-x)),
    "SigmoidBCELoss": (lambda x: np.log1p(np.exp(-x)), lambda x: -_sigmoid(-x)),
    "HingeLoss": (lambda x: np.maximum(0, 1 - x), lambda x: -(x < 1).astype(float)),
    # the spec's plot section: two classes (x, 0), label 0: -log softmax = log(1 + e^-x)
    "SoftmaxCrossEntropyLoss": (lambda x: np.log1p(np.exp(-x)), lambda x: _sigmoid(x) - 1),
    # (x, 1) against (1, 0), label 1: 1 - cos = 1 - x / sqrt(x^2 + 1); d/dx -1 / (x^2 + 1)^1.5
    "CosineEmbeddingLoss": (lambda x: 1 - x / np.sqrt(x * x + 1), lambda x: -1 / (x * x + 1) ** 1.5),
    # anchor x, positive 0, negative 1, margin 1: max(0, x^2 - (x - 1)^2 + 1) = max(0, 2x)
    "TripletLoss": (lambda x: np.maximum(0, 2 * x), lambda x: 2.0 * (x > 0)),
}


@pytest.mark.parametrize("name", sorted(CURVES))
def test_curves_are_the_closed_forms(losses, name):
    x0 = np.linspace(-4.9, 4.9, 197) + 0.0123  # off the kinks at 0 and 1
    f, df = CURVES[name]
    x, value, grad, _ = plot_data(getattr(losses, name)(), x0)
    np.testing.assert_allclose(value, f(x0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, df(x0), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(x, x0)


def test_loss_plot_draws_both_curves_on_given_axes(losses):
    ax = Figure().add_subplot()
    assert losses.HuberLoss(rho=2.0).plot(ax) is ax
    (loss_line, grad_line) = [ln for ln in ax.lines if ln.get_label() in ("loss", "gradient")]
    x = loss_line.get_xdata()
    assert x[0] == -5.0 and x[-1] < 5.0 and len(x) == 1000  # [-5, 5) as the tutorial
    # huber (rho 2) at label 0: 0.5 x^2 / rho inside, |x| - rho / 2 outside; gradient clip(x / rho)
    want = np.where(np.abs(x) > 2, np.abs(x) - 1, 0.25 * x * x)
    np.testing.assert_allclose(loss_line.get_ydata(), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_line.get_ydata(), np.clip(x / 2, -1, 1), rtol=1e-12, atol=1e-15)
    assert ax.get_xlabel() == "pred (label=0)"


def test_plot_cli_renders_every_builtin_loss(tmp_path, built):
    """Every loss of the catalogue as a PNG, plus the overview sheet: real pictures (the
    two curves' colours are there, on a white background). Built beside the session's
    build, whose cached derivations it reuses (a cold derivation of the catalogue is
    test_cli's)."""
    import matplotlib.image

    from losscc.cli import main

    assert main(["plot", str(SPECS), "--out", str(tmp_path / "plots"), "--build", str(built.parent),
                 "--format", "png"]) == 0
    names = sorted(p.stem for p in SPECS.glob("*.yaml"))
    files = sorted(p.stem for p in (tmp_path / "plots").glob("*.png"))
    assert files == sorted([*names, "overview"])
    for name in files:
        img = matplotlib.image.imread(tmp_path / "plots" / f"{name}.png")[..., :3]
        assert img.shape[0] > 200 and img.shape[1] > 300
        blue = np.all(np.abs(img - np.array([0x1f, 0x77, 0xb4]) / 255) < 0.08, axis=-1).sum()
        orange = np.all(np.abs(img - np.array([0xff, 0x7f, 0x0e]) / 255) < 0.08, axis=-1).sum()
        white = np.all(img > 0.98, axis=-1).mean()
        # (poisson at target 0: both curves are e^x, the dashed one over the other)
        assert blue > 100 and orange > 100 and white > 0.5, (name, blue, orange, white)


def test_a_row_loss_without_a_plot_section_says_so(tmp_path):
    import losscc
    from losscc.build import build

    spec = (SPECS / "softmax_focal.yaml").read_text()
    spec = "\n".join(ln for ln in spec.splitlines() if not ln.startswith("plot:")) + "\n"
    (tmp_path / "f.yaml").write_text(spec.replace("name: softmax_focal", "name: focal_noplot")
                                     .replace("[SoftmaxFocalLoss]", "[FocalNoPlot]"))
    mod = losscc.load(build([tmp_path / "f.yaml"], out=tmp_path / "b", log=lambda *a: None).path)
    with pytest.raises(LossccError, match="its spec has no plot section"):
        mod.focal_noplot().plot(Figure().add_subplot())


def test_readme_plot_line(losses):
    """The README's one line, on new pyplot axes (headless: matplotlib picks Agg)."""
    import matplotlib.pyplot as plt

    ax = losses.HuberLoss(rho=2.0).plot()
    try:
        assert [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")] == ["loss", "gradient"]
    finally:
        plt.close(ax.figure)
