"""Builds that survive (issue 7, part 3): two builds into one folder at once, a build killed at
any moment, a corrupted or stale build folder, a read-only folder, a full disk.

Every build here is of one small spec, `sq` (factor * (pred - label)**2, no variants: one
object file), in two versions told apart by their value at pred = 1, label = 0: the factor.
The read-only and full-disk tests mount a real tmpfs in a private mount namespace
(`unshare -Urm`); where the machine does not allow that they are skipped, and the
monkeypatched versions in test_build.py still run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import losscc
from losscc.build import build
from losscc.ir import manifest_checksum

from conftest import ROOT

SPEC = """name: sq
aliases: [SqLoss]
summary: A scaled square (a test spec).
reference: none
inputs:
  pred: {{}}
  label: {{}}
loss: {factor} * (pred - label)**2
"""
HINT = "run `losscc build SPECS --out DIR --name NAME` to (re)build it"


def _specs(folder: Path, factor: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sq.yaml").write_text(SPEC.format(factor=factor))
    return folder


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "losscc.cli", "build", *map(str, args)]


_VALUE = "import sys, numpy as np, losscc; print(losscc.load(sys.argv[1]).SqLoss()(np.ones(1), np.zeros(1))[0])"


def _value_in_a_fresh_process(path) -> str:
    """What a new interpreter gets from the module at `path`: its value at (1, 0), or the error."""
    run = subprocess.run([sys.executable, "-c", _VALUE, str(path)], capture_output=True, text=True,
                         env=_env(), timeout=120)
    return run.stdout.strip() if run.returncode == 0 else run.stderr.strip().splitlines()[-1]


def _leftovers(out: Path, name="losses") -> list[str]:
    """Files of unfinished builds: work folders, symlinks not yet renamed, partial objects."""
    found = [*out.glob(f".{name}.tmp-*"), *out.glob(f".{name}.link-*"),
             *(out / ".cache" / "obj" / name).glob(".*"), *(out / ".cache").glob(".*.tmp")]
    return sorted(p.name for p in found)


# ---------------------------------------------------------------------------- concurrent builds


def _at_once(*commands):
    runs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
            for c in commands]
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        assert stdout == stderr == ""


def test_two_builds_into_one_folder_at_once_both_finish_with_a_valid_module(tmp_path):
    a, b = _specs(tmp_path / "a", 2.0), _specs(tmp_path / "b", 3.0)
    out = tmp_path / "out"
    # Two versions of one loss: each build evicts the other's cached object (not the one it
    # uses) and links its own hard-linked copy, so neither loses a file it needs.
    _at_once(_cli(a, "--out", out, "-q"), _cli(b, "--out", out, "-q"))
    # The later publication wins the name; the earlier one is kept as the previous folder.
    folders = {p.name: float(_value_in_a_fresh_process(p)) for p in out.glob(".losses-*")}
    assert sorted(folders.values()) == [2.0, 3.0], folders
    assert float(_value_in_a_fresh_process(out / "losses")) in (2.0, 3.0)
    # The same specs twice (two jobs building specs/ into build/): both succeed, one wins.
    _at_once(_cli(a, "--out", out, "-q"), _cli(a, "--out", out, "-q"))
    assert _value_in_a_fresh_process(out / "losses") == "2.0"
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------- killed builds


def test_a_build_killed_at_any_moment_leaves_the_previous_module(tmp_path, monkeypatch):
    old, new = _specs(tmp_path / "old", 2.0), _specs(tmp_path / "new", 3.0)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    subprocess.run(_cli(old, "--out", out, "-q"), check=True, env=_env(), timeout=300)
    seconds = time.perf_counter() - t0
    # Kill the new version's build (its process group: the compiler too, as Ctrl-C or a CI
    # timeout does) at 5 moments spread over a whole build. --force re-derives and
    # recompiles, so every attempt goes through every stage.
    seen = []
    for i in range(5):
        run = subprocess.Popen(_cli(new, "--out", out, "-q", "--force"), env=_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds * (i + 0.5) / 5)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        # The name points at a whole module: the old one, or the new one if this attempt (or
        # an earlier one) got as far as publishing it before its kill; never back again.
        seen.append(_value_in_a_fresh_process(out / "losses"))
        assert seen[-1] in ("2.0", "3.0") and seen[-1] >= max(seen), f"after a kill at {i + 0.5}/5: {seen}"
    assert "2.0" in seen  # some kills came before the publication
    # The next build finishes, and clears what the killed ones left once it is stale.
    monkeypatch.setattr("losscc.build.STALE_SECONDS", -1)
    report = build([new], out=out, log=lambda *a: None)
    assert report.status in ("built", "up to date")
    assert losscc.load(report.path).SqLoss()(np.ones(1), np.zeros(1))[0] == 3.0
    build([new], out=out, force=True, log=lambda *a: None)  # a build that surely cleans up
    assert _leftovers(out) == []
    assert len(list((out / ".cache" / "obj" / "losses").iterdir())) == 1  # the object in use, only


def test_a_long_builds_files_are_never_taken_for_leftovers(tmp_path, monkeypatch):
    # Age alone cannot tell a killed build's files from those of a build still deriving after
    # a minute: a file whose name carries a live process id stays, a dead one's goes.
    from losscc.build import _remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".losses.tmp-{os.getpid()}-abc": True, f".losses.tmp-{dead.pid}-abc": False,
             f".losses.link-{os.getpid()}": True, f".losses.link-{dead.pid}": False,
             ".losses.tmp-nopid": False}
    for n in names:
        (tmp_path / n).mkdir()
    (tmp_path / ".cache").mkdir()
    for n, alive in ((f".l2.json.{os.getpid()}.1.tmp", True), (f".l2.json.{dead.pid}.1.tmp", False)):
        (tmp_path / ".cache" / n).write_text("{")
        names[f".cache/{n}"] = alive
    monkeypatch.setattr("losscc.build.STALE_SECONDS", -1)
    _remove_stale(tmp_path, "losses", keep=set())
    assert {n: (tmp_path / n).exists() for n in names} == names


# ---------------------------------------------------------------------------- damaged build folders


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A finished build of sq (factor 2), resolved to its folder; tests damage copies of it."""
    tmp = tmp_path_factory.mktemp("good")
    report = build([_specs(tmp / "specs", 2.0)], out=tmp / "out", log=lambda *a: None)
    return report.path.resolve()


def _extension(folder: Path) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["extension"]


def _rewrite_manifest(folder: Path, change, fix_checksum=True):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    if fix_checksum:
        manifest["checksum"] = manifest_checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def _other_build_kernels(folder: Path, tmp: Path):
    other = build([_specs(tmp / "other", 5.0)], out=tmp / "other_out", log=lambda *a: None).path
    shutil.copy(_extension(other), _extension(folder))


EXT = "_kernels" + (__import__("sysconfig").get_config_var("EXT_SUFFIX") or ".so")

# damage -> what load says (before HINT); each was read off the code path in runtime._manifest
DAMAGE = {
    "no manifest": (lambda d, t: (d / "manifest.json").unlink(), "not a losscc build (no manifest.json)"),
    "truncated manifest": (lambda d, t: _truncate(d / "manifest.json"), "unreadable manifest.json (Expecting"),
    "manifest not an object": (lambda d, t: (d / "manifest.json").write_text("[1, 2]"),
                               "unreadable manifest.json (not a JSON object)"),
    "older losscc": (lambda d, t: _rewrite_manifest(d, lambda m: m.update(format=1)),
                     "built by another losscc version (manifest format 1, this losscc reads 2)"),
    "manifest edited": (lambda d, t: _rewrite_manifest(d, lambda m: m["losses"][0].update(summary="x"), False),
                        "the build is corrupted (manifest.json was changed after the build)"),
    "another Python": (lambda d, t: _rewrite_manifest(d, lambda m: m.update(python=".cpython-39-x.so")),
                       "built for another Python ('.cpython-39-x.so'; this is "),
    "no kernels": (lambda d, t: _extension(d).unlink(), f"the build is incomplete ({EXT} is missing)"),
    "truncated kernels": (lambda d, t: _truncate(_extension(d)), f"the build is corrupted ({EXT} is not the file it built)"),
    "one flipped byte": (lambda d, t: _flip_one_byte(_extension(d)), f"the build is corrupted ({EXT} is not the file it built)"),
    "another build's kernels": (_other_build_kernels, f"the build is corrupted ({EXT} is not the file it built)"),
    "package edited": (lambda d, t: (d / "__init__.py").write_text(
        (d / "__init__.py").read_text() + "\nopen('CANARY', 'w')\n"),
        "the build is corrupted (__init__.py is not the file it built)"),
    "no package": (lambda d, t: (d / "__init__.py").unlink(), "the build is incomplete (__init__.py is missing)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_build_is_refused_on_load_with_a_hint_to_rebuild(damage, good, tmp_path, monkeypatch):
    folder = tmp_path / "losses"
    shutil.copytree(good, folder)
    make, message = DAMAGE[damage]
    make(folder, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(losscc.LoadError) as exc:
        losscc.load(folder)
    text = str(exc.value)
    assert text.startswith(f"{folder}: {message}"), text
    assert text.endswith(f"; {HINT}")
    assert not (tmp_path / "CANARY").exists()  # refused before anything of the build ran


def test_import_by_name_checks_the_kernels_too(good, tmp_path):
    # `import losses` with the build's parent on sys.path: the package checks its files itself.
    shutil.copytree(good, tmp_path / "losses")
    _flip_one_byte(_extension(tmp_path / "losses"))
    run = subprocess.run([sys.executable, "-c", "import losses"], cwd=tmp_path, capture_output=True,
                         text=True, env=_env())
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"losscc.errors.LoadError: {tmp_path / 'losses'}: the build is corrupted ({EXT} is not the file it "
        f"built); {HINT}")


# ---------------------------------------------------------------------------- read-only and full disks

_UNSHARE = shutil.which("unshare")


def _namespaces_work() -> bool:
    if _UNSHARE is None:
        return False
    run = subprocess.run([_UNSHARE, "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/tmp"],
                         capture_output=True)
    return run.returncode == 0


needs_mounts = pytest.mark.skipif(not _namespaces_work(),
                                  reason="this machine does not allow a private mount namespace (unshare -Urm)")

# Runs as the first process of a private mount namespace: mounts a tmpfs of the given size at
# a folder, then runs its steps, each a build or a load, and prints their results as JSON.
_IN_NAMESPACE = r"""
import json, os, subprocess, sys
mnt, size, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt], check=True)
results = []
for kind, arg in steps:
    if kind == "sh":
        run = subprocess.run(["sh", "-c", arg], capture_output=True, text=True)
    elif kind == "build":
        run = subprocess.run([sys.executable, "-m", "losscc.cli", "build", *arg], capture_output=True, text=True)
    else:  # load
        run = subprocess.run([sys.executable, "-c", arg[0], arg[1]], capture_output=True, text=True)
    results.append([run.returncode, run.stdout, run.stderr])
print(json.dumps(results))
"""


def _in_namespace(mnt: Path, size: str, steps: list) -> list:
    mnt.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([_UNSHARE, "-Urm", sys.executable, "-c", _IN_NAMESPACE, str(mnt), size, json.dumps(steps, default=str)],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _one_line_error(result) -> str:
    code, stdout, stderr = result
    assert code == 1 and stdout == "" and "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("losscc: error: "), stderr
    return lines[0][len("losscc: error: "):]


@needs_mounts
def test_a_read_only_folder(tmp_path):
    specs = _specs(tmp_path / "specs", 2.0)
    mnt = tmp_path / "mnt"
    ro = f"mount -o remount,ro {mnt}"
    results = _in_namespace(mnt, "8m", [
        ["build", [specs, "--out", mnt / "out", "-q"]],          # 0: built while writable
        ["sh", f"cp {specs / 'sq.yaml'} {mnt}/sq.yaml && {ro}"],  # 1: specs there too; then read-only
        ["build", [specs, "--out", mnt / "out", "-q"]],          # 2: up to date: needs no write
        ["load", [_VALUE, mnt / "out" / "losses"]],               # 3: a read-only build loads
        ["build", [specs, "--out", mnt / "out", "-q", "--force"]],  # 4: a rebuild cannot write
        ["build", [specs, "--out", mnt / "new", "-q"]],          # 5: nor a new build
        ["build", [mnt / "sq.yaml", "--out", tmp_path / "out", "-q"]],  # 6: specs read-only, out writable
    ])
    assert [r[0] for r in results[:4]] == [0, 0, 0, 0], results
    assert results[3][1].strip() == "2.0"
    assert _one_line_error(results[4]).endswith(": Read-only file system")
    assert _one_line_error(results[4]).startswith(f"cannot build under {mnt / 'out'}")
    assert _one_line_error(results[5]) == f"cannot build under {mnt / 'new'}: Read-only file system"
    assert results[6][0] == 0, results[6]


@needs_mounts
def test_a_full_disk_fails_cleanly_at_every_stage_and_keeps_the_previous_module(tmp_path):
    old, new = _specs(tmp_path / "old", 2.0), _specs(tmp_path / "new", 3.0)
    mnt = tmp_path / "mnt"
    out = mnt / "out"
    # The old version is built; then a file fills the disk up to `free` bytes and the new
    # version's build runs out of space: early (the derivation cache), while compiling, while
    # linking, while writing the package. Each attempt leaves the old module working.
    steps = [["build", [old, "--out", out, "-q"]]]
    levels = [40_000, 120_000, 200_000, 280_000]
    for free in levels:
        steps += [["sh", f"rm -f {mnt}/fill; avail=$(df -B1 --output=avail {mnt} | tail -1); "
                         f"head -c $((avail - {free})) /dev/zero > {mnt}/fill 2>/dev/null; true"],
                  ["build", [new, "--out", out, "-q", "--force"]],
                  ["load", [_VALUE, out / "losses"]]]
    steps += [["sh", f"rm -f {mnt}/fill"], ["build", [new, "--out", out, "-q"]], ["load", [_VALUE, out / "losses"]]]
    results = _in_namespace(mnt, "4m", steps)
    assert results[0][0] == 0, results[0]
    published, failed = "2.0", 0
    for i, free in enumerate(levels):
        built, loaded = results[2 + 3 * i], results[3 + 3 * i]
        if built[0] == 0:  # enough room after all: the new version is published
            published = "3.0"
        else:
            failed += 1
            error = _one_line_error(built)
            assert "No space left on device" in error, (free, error)
            assert error.startswith(("cannot build under ", "C compiler failed")), (free, error)
        assert loaded[1].strip() == published, (free, loaded)
    assert failed >= 3, results
    assert results[-2][0] == 0 and results[-1][1].strip() == "3.0", results[-2:]
