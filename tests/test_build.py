"""The build stage: cache, per-loss derivation cache, atomic publication, compiler errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import losscc
from losscc import codegen
from losscc.build import build
from losscc.errors import BuildError

from conftest import ROOT, SPECS


@pytest.fixture(scope="module")
def two_specs(tmp_path_factory):
    d = tmp_path_factory.mktemp("specs")
    for name in ("l2.yaml", "l1.yaml"):
        shutil.copy(SPECS / name, d / name)
    return d


def _build(specs, out, **kw):
    lines = []
    report = build([specs], out=out, log=lines.append, **kw)
    return report, lines


def test_cache_unchanged_rebuild_does_nothing(two_specs, tmp_path):
    report, lines = _build(two_specs, tmp_path)
    assert report.status == "built"
    assert any(ln == "  l1: derived" or ln.startswith("  l1: derived (") for ln in lines)
    so = report.path / losscc.load(report.path)._manifest["extension"]
    stamp = so.stat().st_mtime_ns
    report2, lines2 = _build(two_specs, tmp_path)
    assert report2.status == "up to date" and report2.cache_key == report.cache_key
    assert lines2[:2] == ["  l1: up to date", "  l2: up to date"]
    assert lines2[-1].startswith(f"{report.path}: up to date (2 losses")
    assert so.stat().st_mtime_ns == stamp


def test_editing_one_spec_rederives_only_that_one(two_specs, tmp_path):
    specs = tmp_path / "specs"
    shutil.copytree(two_specs, specs)
    _build(specs, tmp_path / "out")
    text = (specs / "l2.yaml").read_text().replace("Half the squared error.", "Half the squared error!")
    (specs / "l2.yaml").write_text(text)
    report, lines = _build(specs, tmp_path / "out")
    assert report.status == "built"
    assert "  l1: cached" in lines
    assert any(ln.startswith("  l2: derived") for ln in lines)
    assert losscc.load(report.path).L2Loss.__doc__.startswith("Half the squared error!")


def test_force_rebuilds(two_specs, tmp_path):
    _build(two_specs, tmp_path)
    report, lines = _build(two_specs, tmp_path, force=True)
    assert report.status == "built" and any(ln.startswith("  l2: derived") for ln in lines)


def test_published_by_symlink_and_old_folders_removed(two_specs, tmp_path, monkeypatch):
    report, _ = _build(two_specs, tmp_path)
    assert report.path.is_symlink()
    first = os.readlink(report.path)
    assert first.startswith(f".losses-{report.cache_key[:16]}-")
    monkeypatch.setattr("losscc.build.STALE_SECONDS", -1)
    (tmp_path / ".losses.tmp-killed").mkdir()          # left by a killed build
    _build(two_specs, tmp_path, force=True)
    second = os.readlink(report.path)
    assert second != first                              # every build gets its own folder
    _build(two_specs, tmp_path, force=True)
    third = os.readlink(report.path)
    # the published folder and the one before it stay (a process may be importing it)
    assert sorted(p.name for p in tmp_path.glob(".losses*")) == sorted([second, third])


def test_a_folder_that_is_not_a_build_is_never_replaced(two_specs, tmp_path):
    (tmp_path / "losses").mkdir()
    (tmp_path / "losses" / "notes.txt").write_text("precious")
    with pytest.raises(BuildError, match="losses exists and is not a losscc build"):
        _build(two_specs, tmp_path)
    assert (tmp_path / "losses" / "notes.txt").read_text() == "precious"


def test_reload_after_rebuild_runs_the_new_kernels(two_specs, tmp_path):
    specs = tmp_path / "specs"
    shutil.copytree(two_specs, specs)
    report, _ = _build(specs, tmp_path / "out")
    assert losscc.load(report.path).L2Loss()(np.array([2.0]), np.zeros(1))[0] == 2.0
    text = (specs / "l2.yaml").read_text().replace("0.5 * (pred - label)**2", "3 * (pred - label)**2")
    (specs / "l2.yaml").write_text(text)
    report, _ = _build(specs, tmp_path / "out")
    assert losscc.load(report.path).L2Loss()(np.array([2.0]), np.zeros(1))[0] == 12.0  # 3 * 2**2


def test_compiler_flags_from_the_environment_are_part_of_the_key(two_specs, monkeypatch):
    from losscc.build import cache_key
    from losscc.spec import load_spec

    specs = [load_spec(two_specs / "l2.yaml")]
    plain = cache_key(specs)
    monkeypatch.setenv("CFLAGS", "-ffast-math")
    assert cache_key(specs) != plain


def test_failed_compile_names_the_spec_and_keeps_the_previous_module(two_specs, tmp_path, monkeypatch):
    report, _ = _build(two_specs, tmp_path)
    before = os.readlink(report.path)
    real_generate = codegen.generate

    def broken(sym):
        src = real_generate(sym)
        if sym.spec.name == "l2":  # a C error inside l2's kernels only
            src = type(src)(src.name, src.c_source + "\nint broken( { \n", src.cdef, src.meta)
        return src

    monkeypatch.setattr(codegen, "generate", broken)
    with pytest.raises(BuildError) as exc:
        _build(two_specs, tmp_path, force=True)
    message = str(exc.value)
    assert message.startswith(f"C compiler failed on the kernels of {two_specs / 'l2.yaml'} (l2): ")
    assert "error" in message
    assert os.readlink(report.path) == before        # the previous module is still published
    assert not list(tmp_path.glob(".losses.tmp-*"))  # no half-built folder left behind
    module = losscc.load(report.path)
    assert module.L2Loss()(np.ones(1), np.zeros(1))[0] == 0.5


def test_cli_reports_a_compile_failure_in_one_line(tmp_path):
    env = dict(os.environ, CC="/nonexistent/cc")
    run = subprocess.run([sys.executable, "-m", "losscc.cli", "build", str(SPECS / "l2.yaml"),
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("losscc: error: C compiler failed")
    assert "Traceback" not in run.stderr


def test_bad_module_name(two_specs, tmp_path):
    with pytest.raises(BuildError, match="--name 'my-losses' must be an ASCII Python identifier"):
        _build(two_specs, tmp_path, name="my-losses")


def test_load_errors_say_how_to_rebuild(tmp_path):
    with pytest.raises(losscc.LoadError, match="not a losscc build .no manifest.json.; run `losscc build"):
        losscc.load(tmp_path)


def test_generated_files_carry_a_banner(built):
    c = (built / "kernels.c").read_text()
    assert c.startswith("/* Generated by losscc")
    assert "edit the spec, not this file" in c
    init = (built / "__init__.py").read_text()
    assert "Generated -- edit the specs, not this file" in init


def test_wheel_ships_the_templates(tmp_path):
    # A non-editable install must find templates/ inside the package (losscc/templates).
    src = tmp_path / "src"  # a copy, so setuptools' own build/ stays out of the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", ".git", "*.egg-info", "__pycache__"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (wheel,) = tmp_path.glob("losscc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for t in (ROOT / "templates").glob("*.j2"):
        assert f"losscc/templates/{t.name}" in names


def test_full_disk_is_a_clear_error(two_specs, tmp_path, monkeypatch):
    import errno
    import tempfile

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".losses.tmp-x"))

    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    with pytest.raises(BuildError, match=r"cannot build under .*\.losses\.tmp-x: No space left on device"):
        _build(two_specs, tmp_path)


def test_derivation_cache_keeps_one_entry_per_loss(two_specs, tmp_path):
    specs = tmp_path / "specs"
    shutil.copytree(two_specs, specs)
    _build(specs, tmp_path / "out")
    for word in ("error!", "error?"):
        text = (specs / "l2.yaml").read_text().replace("Half the squared error", f"Half the squared {word}")
        (specs / "l2.yaml").write_text(text)
        _build(specs, tmp_path / "out")
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "out" / ".cache").glob("*.json")) == ["l1", "l2"]


def test_a_removed_loss_leaves_nothing_in_the_caches(two_specs, tmp_path, monkeypatch):
    specs = tmp_path / "specs"
    shutil.copytree(two_specs, specs)
    _build(specs, tmp_path / "out")
    cache = tmp_path / "out" / ".cache"
    assert sorted(p.name.split("-")[0] for p in (cache / "obj" / "losses").iterdir()) == ["l1", "l2"]
    (specs / "l1.yaml").unlink()
    _build(specs, tmp_path / "out")
    # its object goes at once (this module's build did not use it) ...
    assert [p.name.split("-")[0] for p in (cache / "obj" / "losses").iterdir()] == ["l2"]
    # ... its derivation once unused for a week (another module in this folder may use it)
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.json")) == ["l1", "l2"]
    monkeypatch.setattr("losscc.build.UNUSED_DERIVATION_SECONDS", -1)
    _build(specs, tmp_path / "out", force=True)
    assert [p.name.split("-")[0] for p in cache.glob("*.json")] == ["l2"]


def test_inputs_named_like_the_kernels_own_names(tmp_path):
    # w, h, sw, lw, wq, g_pred, q_pred: each must stay the spec's input, with its own strides
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "names.yaml").write_text(
        "name: names\nsummary: Inputs named like the generated code's names.\nreference: a test.\n"
        "inputs:\n  pred: {}\n  w: {}\n  h: {differentiable: true}\n  sw: {}\n  lw: {}\n  wq: {}\n"
        "  g_pred: {}\n  q_pred: {}\n"
        "loss: (pred - w)**2 * h + sw * pred + lw * wq + g_pred * q_pred * pred\n")
    report, _ = _build(specs, tmp_path / "out")
    loss = losscc.load(report.path).names()
    rng = np.random.default_rng(7)
    shape = (5, 300)  # more than one chunk of 256 features per sample
    a = {k: rng.standard_normal(shape) for k in ("pred", "w", "h", "sw", "lw", "wq", "g_pred", "q_pred")}
    a["w"] = np.asfortranarray(a["w"])           # strided: staged
    a["sw"] = rng.standard_normal((5, 1))        # broadcast along the features: stride 0
    a["lw"] = a["lw"][:, ::-1]                   # a negative stride
    weight = rng.random((5, 1))
    args = [a[k] for k in ("pred", "w", "h", "sw", "lw", "wq", "g_pred", "q_pred")]
    value, (gp, gh) = loss.value_and_grad(*args, sample_weight=weight, wrt=("pred", "h"))
    p, w, h, sw, lw, wq, gpr, qp = (np.broadcast_to(x, shape) for x in args)
    ell = (p - w) ** 2 * h + sw * p + lw * wq + gpr * qp * p
    np.testing.assert_allclose(value, (ell * weight).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(gp, (2 * (p - w) * h + sw + gpr * qp) * weight / shape[1], rtol=1e-12)
    np.testing.assert_allclose(gh, (p - w) ** 2 * weight / shape[1], rtol=1e-12)


def test_modules_built_into_one_folder_share_compiled_objects(two_specs, tmp_path):
    """A second module built from the same specs into the same folder (`losscc check` after
    `losscc build`) compiles nothing: the objects name no module. Each module's cache holds
    its own links, so a module dropping a loss leaves the other's object in place."""
    specs = tmp_path / "specs"
    shutil.copytree(two_specs, specs)
    first, _ = _build(specs, tmp_path / "out", name="first")
    second, _ = _build(specs, tmp_path / "out", name="second")
    assert [r["objects_compiled"] for r in first.losses] == [1, 1]
    assert [(r["objects_compiled"], r["objects_cached"]) for r in second.losses] == [(0, 1), (0, 1)]
    x, y = np.linspace(-3, 3, 7), np.zeros(7)
    assert np.array_equal(losscc.load(first.path).L2Loss()(x, y), losscc.load(second.path).L2Loss()(x, y))
    (specs / "l1.yaml").unlink()
    _build(specs, tmp_path / "out", name="first")
    cache = tmp_path / "out" / ".cache" / "obj"
    assert [p.name.split("-")[0] for p in (cache / "first").iterdir()] == ["l2"]
    assert sorted(p.name.split("-")[0] for p in (cache / "second").iterdir()) == ["l1", "l2"]
