"""`losscc build` and `losscc list` as a user runs them: a subprocess in a scratch folder.

The full catalogue is compiled twice per module (once, then after editing one spec), which is
most of this file's ~30 s; --force and -v use a one-loss catalogue.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import losscc
from losscc.spec import load_spec

from conftest import ROOT, SPECS

NAMES = [p.stem for p in sorted(SPECS.glob("*.yaml"))]  # build order: spec files sorted

# `losscc list` of the catalogue, by hand from specs/*.yaml: name (aliases): params with
# their defaults (%g); variants with their values, then the summary.
LIST = {
    "hinge": ["hinge (HingeLoss): margin=1",
              "    Hinge loss for labels in {-1, 1}; zero once pred * label reaches the margin."],
    "huber": ["huber (HuberLoss): rho=1",
              "    Quadratic within rho of the label, linear beyond (smoothed L1)."],
    "l1": ["l1 (L1Loss)", "    Absolute error."],
    "l2": ["l2 (L2Loss)", "    Half the squared error."],
    "logistic": ["logistic (LogisticLoss): label_format=signed|binary",
                 "    Logistic loss log(1 + exp(-pred * label)) on logits."],
    "poisson_nll": ["poisson_nll (PoissonNLLLoss): epsilon=1e-08; from_logits=True|False, compute_full=False|True",
                    "    Negative log likelihood of a Poisson target, on log-rates or rates."],
    "sigmoid_bce": ["sigmoid_bce (SigmoidBinaryCrossEntropyLoss, SigmoidBCELoss): epsilon=1e-12; "
                    "from_sigmoid=False|True; call-time pos_weight=1",
                    "    Binary cross entropy on logits (stable), or on probabilities with from_sigmoid."],
    "squared_hinge": ["squared_hinge (SquaredHingeLoss): margin=1",
                      "    Squared hinge loss for labels in {-1, 1}."],
    "log_cosh": ["log_cosh (LogCoshLoss): scale=1",
                 "    log(cosh(pred - label)), quadratic near 0 and linear far out."],
    "cosine_embedding": ["cosine_embedding (CosineEmbeddingLoss): margin=0, epsilon=1e-12",
                         "    Cosine-similarity loss of two embeddings, pulled together (label 1) or "
                         "apart (label -1)."],
    "kl_div": ["kl_div (KLDivLoss): from_logits=True|False",
               "    Kullback-Leibler divergence of pred from the label distribution, mean over classes."],
    "softmax_cross_entropy": [
        "softmax_cross_entropy (SoftmaxCrossEntropyLoss, SoftmaxCELoss): label_smoothing=0, "
        "ignore_index=-100; sparse_label=True|False, from_logits=False|True; call-time class_weight=1",
        "    Softmax cross entropy over the class axis, fused and stable."],
    "softmax_focal": ["softmax_focal (SoftmaxFocalLoss): gamma=2",
                      "    Focal loss on softmax probabilities, -(1 - p)^gamma log p of the labelled class."],
    "triplet": ["triplet (TripletLoss): margin=1",
                "    Triplet loss on squared distances, relu(|positive - pred|^2 - |negative - pred|^2 "
                "+ margin)."],
}
HINT = "run `losscc build SPECS --out DIR --name NAME` to (re)build it"


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self):
        return self.stdout.splitlines()


def cli(*args, cwd) -> Run:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "losscc.cli", *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    return Run(run.returncode, run.stdout, run.stderr, time.perf_counter() - t0)


def assert_one_line_error(run: Run, message: str):
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr == f"losscc: error: {message}\n"


@dataclass
class Session:
    root: Path
    first: Run
    again: Run
    edited: Run
    listing: Run
    links: tuple  # the published folder after each build


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    """The catalogue built, rebuilt unchanged, rebuilt after editing l1.yaml, then listed."""
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(SPECS, root / "specs")
    build = ("build", "specs", "--out", "out", "--name", "mymod")
    first = cli(*build, cwd=root)
    link1 = os.readlink(root / "out" / "mymod")
    again = cli(*build, cwd=root)
    link2 = os.readlink(root / "out" / "mymod")
    with open(root / "specs" / "l1.yaml", "a") as f:
        f.write("# edited: a comment changes the spec's bytes, not its math\n")
    edited = cli(*build, cwd=root)
    link3 = os.readlink(root / "out" / "mymod")
    listing = cli("list", "out/mymod", cwd=root)
    return Session(root, first, again, edited, listing, (link1, link2, link3))


def _kernel_count() -> int:
    # 3 modes (v, vg, vgh) x 2 dtypes per variant combination; row losses have no vgh, and
    # those with optional inputs twice as many (the plain kernels, for absent inputs)
    specs = [load_spec(p) for p in sorted(SPECS.glob("*.yaml"))]
    plain = [s.is_row and any(i.default is not None and not i.differentiable for i in s.inputs) for s in specs]
    return sum((4 * (2 if p else 1) if s.is_row else 6) * len(s.variant_combos()) for s, p in zip(specs, plain))


def _assert_built(run, derived, recompiled):
    """A build that compiled: one line per loss in order ('derived' for those in `derived`,
    else 'cached'); as the compiler finishes each recompiled loss (from its threads, so in
    any order after that loss's line), 'compiled N objects'; the compile line (with how many
    losses were compiled again), the table of losses and the summary."""
    assert run.returncode == 0 and run.stderr == ""
    n = len(NAMES)
    progress = [ln for ln in run.lines if re.fullmatch(r"  \w+: compiled \d+ objects? \(\d+\.\d s of compiler time\)", ln)]
    lines = [ln for ln in run.lines if ln not in progress]
    assert len(progress) == recompiled
    for line in progress:
        name = line.split(":")[0].strip()
        assert run.lines.index(line) > run.lines.index(next(ln for ln in lines if ln.startswith(f"  {name}: ")))
    assert len(lines) == 2 * n + 3
    for name, line in zip(NAMES, lines):
        if name in derived:
            assert re.fullmatch(rf"  {name}: derived \(\d+\.\d\d s\)", line), line
        else:
            assert line == f"  {name}: cached"
    assert re.fullmatch(rf"  compiled {_kernel_count()} kernels in \d+\.\d s, derivations included "
                        rf"\({recompiled} of {n} losses recompiled\)", lines[n])
    assert lines[n + 1].split() == ["loss", "variants", "kernels", "derive", "compile"]
    assert [ln.split()[0] for ln in lines[n + 2:2 * n + 2]] == NAMES
    assert re.fullmatch(rf"out/mymod: built {n} losses in \d+\.\d s", lines[2 * n + 2])


def test_first_build_derives_every_loss(session):
    _assert_built(session.first, derived=NAMES, recompiled=len(NAMES))


def test_rerun_with_nothing_changed_is_up_to_date(session):
    run = session.again
    assert run.returncode == 0 and run.stderr == ""
    n = len(NAMES)
    assert run.lines[:n] == [f"  {name}: up to date" for name in NAMES]
    assert len(run.lines) == n + 1
    assert re.fullmatch(rf"out/mymod: up to date \({n} losses, \d+\.\d\d s\)", run.lines[n])
    assert session.links[1] == session.links[0]  # nothing republished
    assert run.seconds < 10  # no derivation, no compiler


def test_editing_one_spec_rederives_only_it(session):
    # l1 is derived again, but its C is the same (a comment changed): its object is reused
    _assert_built(session.edited, derived={"l1"}, recompiled=0)
    assert session.links[2] != session.links[1]  # a new cache key, a new folder


def test_published_module_loads_with_losscc_load(session):
    module = losscc.load(session.root / "out" / "mymod")
    assert list(module.LOSSES) == NAMES
    assert module.L2Loss is module.l2 is module.LOSSES["l2"]
    assert module.SigmoidBCELoss is module.SigmoidBinaryCrossEntropyLoss
    # by hand: 0.5 * (1 - 2)**2 = 0.5; |1 - 2| = 1
    np.testing.assert_array_equal(module.L2Loss()(np.ones(2), np.ones(2) * 2), [0.5, 0.5])
    np.testing.assert_array_equal(module.L1Loss()(np.ones(2), np.ones(2) * 2), [1.0, 1.0])


def test_published_module_imports_by_name(session):
    code = "import mymod, numpy as np; print(sorted(mymod.LOSSES), mymod.HuberLoss(rho=0.5)(np.zeros(1), np.ones(1)))"
    run = subprocess.run([sys.executable, "-c", code], cwd=session.root / "out", capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr
    # by hand: |0 - 1| = 1 > 0.5, so 1 - 0.25 = 0.75
    assert run.stdout == f"{sorted(NAMES)} [0.75]\n"


def test_list_shows_every_loss_with_its_params(session):
    run = session.listing
    assert run.returncode == 0 and run.stderr == ""
    missing = sorted(set(NAMES) - set(LIST))
    assert not missing, f"add {missing} to LIST, by hand"
    assert run.lines == [line for name in NAMES for line in LIST[name]]


def test_a_failed_build_keeps_the_published_module(session):
    bad = session.root / "bad"
    bad.mkdir()
    (bad / "broken.yaml").write_text("name: broken\nsummary: s\nreference: r\ninputs:\n  pred: {}\n"
                                     "loss: expp(pred)\n")
    run = cli("build", "specs", "bad", "--out", "out", "--name", "mymod", cwd=session.root)
    assert run.returncode == 1
    assert run.stderr.startswith("losscc: error: bad/broken.yaml:6:7: loss: unknown function 'expp' (known: ")
    assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
    assert os.readlink(session.root / "out" / "mymod") == session.links[2]
    assert cli("list", "out/mymod", cwd=session.root).returncode == 0


# ---------------------------------------------------------------------------- a one-loss catalogue


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    (root / "specs").mkdir()
    shutil.copy(SPECS / "l2.yaml", root / "specs" / "l2.yaml")
    run = cli("build", "specs", "--out", "out", "--name", "one", cwd=root)
    assert run.returncode == 0, run.stderr
    return root


def test_force_rebuilds_and_verbose_shows_the_derivatives(small):
    run = cli("build", "specs", "--out", "out", "--name", "one", "--force", "-v", cwd=small)
    assert run.returncode == 0 and run.stderr == ""
    lines = [ln for ln in run.lines if not ln.startswith("  l2: compiled")]  # (if the object was not cached)
    assert len(lines) == 7
    assert re.fullmatch(r"  l2: derived \(\d+\.\d\d s\)", lines[0])
    # d/dpred of 0.5 * (pred - label)**2 is pred - label; the second derivative is 1
    assert lines[1:3] == ["    [base] d/dpred: -x_label + x_pred", "    [base] d2/dpred2: 1"]
    assert re.fullmatch(r"  compiled 6 kernels in \d+\.\d s, derivations included \([01] of 1 loss recompiled\)",
                        lines[3])
    assert lines[4].split() == ["loss", "variants", "kernels", "derive", "compile"]
    assert re.fullmatch(r"  l2 +1 +6 +\d+\.\d\d s +(cached|\d+\.\d s \(1 obj\))", lines[5]), lines[5]
    assert re.fullmatch(r"out/one: built 1 loss in \d+\.\d s", lines[6])
    again = cli("build", "specs", "--out", "out", "--name", "one", cwd=small)
    assert again.lines == ["  l2: up to date", again.lines[1]]
    assert re.fullmatch(r"out/one: up to date \(1 loss, \d+\.\d\d s\)", again.lines[1])


def test_json_and_quiet_for_scripts(small):
    """--json prints only the report: per loss its status, variants, kernels (l2: 1 variant,
    v/vg/vgh in float32 and float64) and timings; --quiet prints nothing."""
    import json

    run = cli("build", "specs", "--out", "out", "--name", "one", "--force", "--json", cwd=small)
    assert run.returncode == 0 and run.stderr == ""
    report = json.loads(run.stdout)
    assert report["status"] == "built" and report["path"] == "out/one" and len(report["cache_key"]) == 64
    (l2,) = report["losses"]
    assert l2["name"] == "l2" and l2["status"] == "derived" and (l2["variants"], l2["kernels"]) == (1, 6)
    assert l2["objects_compiled"] + l2["objects_cached"] == 1 and l2["derive_seconds"] > 0
    again = json.loads(cli("build", "specs", "--out", "out", "--name", "one", "--json", cwd=small).stdout)
    assert again["status"] == "up to date" and again["cache_key"] == report["cache_key"]
    assert again["losses"] == [{**l2, "status": "up to date", "derive_seconds": 0.0, "objects_compiled": 0,
                                "objects_cached": 0, "compile_seconds": 0.0}]
    quiet = cli("build", "specs", "--out", "out", "--name", "one", "--force", "-q", cwd=small)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    bad = cli("build", "nowhere", "--out", "out", "--json", cwd=small)
    assert bad.returncode == 1 and bad.stdout == "" and "nowhere: no such spec file or folder" in bad.stderr


def test_force_repairs_a_damaged_build(small):
    (so,) = (small / "out" / "one").glob("_kernels*")
    so.unlink()  # e.g. removed by a clean-up script
    run = cli("build", "specs", "--out", "out", "--name", "one", "--force", cwd=small)
    assert run.returncode == 0
    assert cli("list", "out/one", cwd=small).lines == LIST["l2"]


# ---------------------------------------------------------------------------- errors


def test_missing_spec_path(tmp_path):
    assert_one_line_error(cli("build", "nope.yaml", "--out", "out", cwd=tmp_path),
                          "nope.yaml: no such spec file or folder")
    assert not (tmp_path / "out").exists()


def test_folder_without_specs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("build", "empty", "--out", "out", cwd=tmp_path),
                          "empty: no *.yaml spec files in this folder")


def test_bad_module_name(tmp_path):
    assert_one_line_error(cli("build", SPECS / "l2.yaml", "--out", "out", "--name", "my-mod", cwd=tmp_path),
                          "--name 'my-mod' must be an ASCII Python identifier not starting with '_'")


def test_list_of_a_missing_module(tmp_path):
    assert_one_line_error(cli("list", "nowhere", cwd=tmp_path),
                          f"{tmp_path / 'nowhere'}: not a losscc build (no manifest.json); {HINT}")


def test_duplicate_names_across_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SPECS / "l2.yaml", tmp_path / "a" / "l2.yaml")
    shutil.copy(SPECS / "l2.yaml", tmp_path / "b" / "l2.yaml")
    assert_one_line_error(cli("build", "a", "b", "--out", "out", cwd=tmp_path),
                          "b/l2.yaml:1:7: loss name 'l2' is already used by a/l2.yaml (l2)")


# --------------------------------------------------------------------------- losscc show


def _function(text: str, name: str) -> str:
    """The definition of C function `name` in `text`, through its closing brace (by hand:
    the first line that opens its body, then brace counting)."""
    start = next(i for i, line in enumerate(text.splitlines(keepends=True))
                 if f" {name}(" in line and not line.rstrip().endswith(";"))
    lines = text.splitlines(keepends=True)[start:]
    body, depth = [], 0
    for line in lines:
        body.append(line)
        depth += line.count("{") - line.count("}")
        if depth == 0 and "}" in line:
            break
    return "".join(body).rstrip()


def test_show_prints_the_spec_the_derivation_and_the_built_kernel(built):
    """`losscc show` on a spec: its text, the derivatives (l2's by hand: pred - label, then 1),
    and the C of the kernel exactly as the build compiled it."""
    run = cli("show", "L2Loss", SPECS, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert (SPECS / "l2.yaml").read_text().strip() in run.stdout
    assert "d loss/d pred = -x_label + x_pred" in run.stdout
    assert "d2 loss/d pred^2 = 1" in run.stdout
    kernels = (built / "kernels.c").read_text()
    shown = run.stdout.split("(templates/elementwise.c.j2) ==\n", 1)[1].rstrip()
    assert shown == _function(kernels, "lcc_l2__base__vg_f64_chunk")


def test_show_row_loss_names_its_scalars_rewrites_and_plain_kernel(built):
    run = cli("show", "softmaxcrossentropyloss", SPECS, "--plain", "--dtype", "float32", cwd=ROOT)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "m1 + r1 = logsumexp_j(x_pred)" in out and "xg0_1 = pred[i_label]" in out
    assert "loss = m1 + r1 - xg0_1" in out
    # softmax - 1 at the label: the expm1 rewrite fired (numerics: no cancellation there)
    assert "expm1: exp(-m1 - r1 + x_pred) - 1 -> expm1(-m1 - r1 + x_pred)" in out
    name = "lcc_softmax_cross_entropy__sparse_label_true__from_logits_false__plain__vg_f32_range"
    assert out.split("(templates/rows.c.j2) ==\n", 1)[1].rstrip() == _function((built / "kernels.c").read_text(), name)
    dense = cli("show", "softmax_cross_entropy", SPECS, "--variant", "sparse_label=false", "--mode", "v",
                cwd=ROOT)
    assert "variant sparse_label=false, from_logits=false" in dense.stdout
    assert "lcc_softmax_cross_entropy__sparse_label_false__from_logits_false__v_f64_range(" in dense.stdout


@pytest.mark.parametrize("args, message", [
    (("show", "nope", SPECS), "no loss named 'nope' in .* \\(losses: cosine_embedding, hinge"),
    (("show", "l2", SPECS, "--variant", "from_sigmoid=true"), "l2.yaml:1:7: --variant 'from_sigmoid=true': "
                                                              "expected NAME=VALUE with NAME a variant of l2"),
    (("show", "sigmoid_bce", SPECS, "--variant", "from_sigmoid=maybe"), "from_sigmoid takes false, true"),
    (("show", "kl_div", SPECS, "--mode", "vgh"), "kl_div is a row loss: it has no vgh kernel"),
    (("show", "huber", SPECS, "--plain"), "huber has no plain kernels"),
])
def test_show_errors_are_one_line(args, message):
    run = cli(*args, cwd=ROOT)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("losscc: error: ") and run.stderr.count("\n") == 1, run.stderr
    assert re.search(message, run.stderr), run.stderr
