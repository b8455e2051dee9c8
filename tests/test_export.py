"""`losscc export` (losscc/export.py): the kernels as a C library, compiled with the system C
compiler into a small C program (no Python), whose numbers must equal the Python module's."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from losscc.cli import main

from conftest import SPECS

PROGRAM = r"""
#include <stdio.h>
#include "losses.h"

int main(void)
{
README
    printf("%.17g\n", total);
    for (int i = 0; i < 3; ++i) printf("%.17g\n", v[i]);
    for (int i = 0; i < 6; ++i) printf("%.17g\n", g[i]);
    /* softmax CE (integer labels, no class weights: the plain kernel), (4, 3) float32,
       per-sample values; params label_smoothing 0, ignore_index -100 */
    const float x[12] = {1, 10, 0, 8, 2, -1, 0, 0, 0, -3, 30, 2.5f};
    const int64_t y[4] = {0, 1, 2, 1};
    const float onef = 1.0f;
    float cv[4], cg[12];
    int64_t status[4];
    lcc_softmax_cross_entropy__sparse_label_true__from_logits_false__plain__vg_f32(
        2, 4, 1, 3, x, 3, 0, 1, y, 1, 0, &onef, 0, 0, 0, &onef, 0, 0, 0.0, -100.0, 1.0, 1.0,
        cv, 1, status, cg, 3, 0, 1);
    printf("%lld\n", (long long)status[0]);
    for (int i = 0; i < 4; ++i) printf("%.9g\n", cv[i]);
    for (int i = 0; i < 12; ++i) printf("%.9g\n", cg[i]);
    return 0;
}
"""


def _readme_block() -> str:
    """The README's C example (L2 over a (3, 2) batch), without its #include line."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### Standalone C\n.*?```c\n(.*?)```", readme, re.S).group(1)
    return "\n".join(line for line in block.splitlines() if not line.startswith("#include"))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_exported_library_links_into_a_c_program_and_agrees(tmp_path, losses):
    for name in ("l2", "softmax_cross_entropy"):
        shutil.copy(SPECS / f"{name}.yaml", tmp_path / f"{name}.yaml")
    assert main(["export", str(tmp_path / "l2.yaml"), str(tmp_path / "softmax_cross_entropy.yaml"),
                 "--out", str(tmp_path / "lib")]) == 0
    header = (tmp_path / "lib" / "losses.h").read_text()
    assert "double lcc_l2__base__vg_f64(int64_t nthreads, int64_t nb, int64_t nf, const void *a_pred" in header
    assert "parameters: label_smoothing (default 0), ignore_index (default -100)" in header
    (tmp_path / "app.c").write_text(PROGRAM.replace("README", _readme_block()))
    run = subprocess.run(["cc", "-O2", "-std=c99", "-I", str(tmp_path / "lib"), str(tmp_path / "app.c"),
                          str(tmp_path / "lib" / "losses.c"), "-o", str(tmp_path / "app"), "-lm", "-lpthread"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = subprocess.run([str(tmp_path / "app")], capture_output=True, text=True, check=True).stdout.split()
    nums = [float(t) for t in out]
    pred = np.array([0.5, -1.25, 2.0, 3.5, -0.75, 0.125]).reshape(3, 2)
    label = np.array([1.0, 0.0, -2.0, 3.0, 0.25, 0.5]).reshape(3, 2)
    mean, g = losses.L2Loss(reduction="mean").value_and_grad(pred, label)
    per_sample = losses.L2Loss()(pred, label)
    # the README's example; the same C, compiled apart: the same per-element operations
    # (no contraction in C99)
    np.testing.assert_allclose(nums[0] / 3, mean, rtol=1e-15)
    np.testing.assert_array_equal(nums[1:4], per_sample)
    np.testing.assert_array_equal(nums[4:10], g.ravel())
    x = np.array([1, 10, 0, 8, 2, -1, 0, 0, 0, -3, 30, 2.5], np.float32).reshape(4, 3)
    y = np.array([0, 1, 2, 1])
    cv, cg = losses.SoftmaxCrossEntropyLoss().value_and_grad(x, y)
    assert nums[10] == 0  # status
    np.testing.assert_array_equal(np.array(nums[11:15], np.float32), cv)
    np.testing.assert_array_equal(np.array(nums[15:27], np.float32).reshape(4, 3), cg)


def test_export_errors(tmp_path):
    from losscc.errors import LossccError
    from losscc.export import export

    with pytest.raises(LossccError, match="no such spec file or folder"):
        export([tmp_path / "nope.yaml"], tmp_path / "out")
    with pytest.raises(LossccError, match="must be an ASCII C identifier"):
        export([SPECS / "l2.yaml"], tmp_path / "out", name="my-lib")
