"""PyTorch DistributedDataParallel (issue 9, part 5): `loss.torch()` in a two-process DDP run
(gloo, loopback only) trains to the weights of one process on the full batch.

Proven here, in float64, for a 2-layer MLP (20 -> 32 tanh -> 10) trained 20 SGD steps on 512
samples split 256/256, for softmax cross-entropy and Huber (rho 0.5) losses:

- the losses reach the workers pickled by reference to the session's build (tests/conftest.py's
  `built`): each rank holds losses of that build, path and cache key, with the arguments given
  here, and trains with their `.torch()` modules under DDP;
- both ranks end with the same bits (DDP keeps the replicas in step), and those weights agree
  with one process on the full batch (the same training code, the same loss) to TOL: DDP
  averages the two ranks' gradients, and losscc's reduction 'mean' divides by the local batch
  (256), so the average of the halves' gradients is the full batch's mean gradient -- with
  sample weights too, since losscc's (Gluon's) weighted mean is sum(w * l) / N, not
  / sum(w) (torch's cross_entropy(weight=) divides by the weights' sum, which would not shard
  this way);
- reduction 'sum': DDP's average halves the full batch's gradient, so each rank's loss is
  multiplied by the world size (2), the usual fix; backward then runs with an incoming
  gradient of 2 rather than 1;
- reduction 'none' followed by `.mean()`: the per-sample backward path under DDP;
- the single-process runs with torch's own losses (torch.nn.functional.cross_entropy and
  smooth_l1_loss, no losscc) reach the same weights to TOL: the losscc runs are right, not only
  consistent with each other (and DDP with torch's losses is measured too, as the baseline of
  what DDP alone changes);
- every TCP socket of the workers (gloo's pairs, the store's) is on loopback, listening or
  connected, read from /proc (Linux): gloo has GLOO_SOCKET_IFNAME=lo, and the store's server
  listens on a socket this test binds to 127.0.0.1 and hands to rank 0 (left to itself,
  TCPStore listens on every interface).

TOL: the batch sums of the gradient run in another order under DDP (two halves of 256, then
the allreduce) than in one process, about an ulp (2.2e-16 relative) per step, which the 20
steps carry forward; measured: at most 4.4e-16 absolute, 6.9e-16 of the largest |weight|
(about 0.6), for DDP against one process and for losscc against torch alike. TOL = 1e-12 of
the largest |weight| leaves a margin of 1000x, and is 10^10 times smaller than what is being
checked: training moves some weight by 0.37 to 0.62 from its start (asserted > 0.05), and the
sample weights change the final weights by 0.03 or more.

Time: each rank spends about 6 s of CPU, most in importing torch (3 s) and torch._dynamo (2.5 s,
which DDP's constructor imports); its 14 trainings take well under a second. The two ranks run
in parallel, and this process's single-process runs (about 0.5 s) overlap their start.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from conftest import ROOT  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
N, D, H, C = 512, 20, 32, 10  # samples (256 per rank), features, hidden units, classes/outputs
STEPS = 20
TOL = 1e-12  # of the largest weight: see the module docstring
TIMEOUT = 150  # seconds for the whole two-process run (each rank about 6 s of CPU; 18 to 40 s of wall
# time measured on 2 cores at a load average of 5 to 9); a hang fails rather than blocks. The ranks'
# own timeout (the store, gloo) is 120 s.

# The training code, shared by the workers (run as `python -c`, __name__ == "__main__") and this
# process (exec'd for the single-process runs), so that both run the very same steps.
_WORKER = r'''
import ipaddress, os, pickle, sys, time
import torch
import torch.nn.functional as F

# name: (target, weighted, reduction, lr, rho). target "class": int64 labels for a softmax CE;
# "reg": float64 targets of shape (N, C) for a Huber loss. The learning rates give steps of
# the same size: 'sum' is 512 times the mean's gradient, Huber's mean also averages over the
# 10 outputs.
CASES = {
    "ce_mean": ("class", False, "mean", 0.5, None),
    "ce_mean_weighted": ("class", True, "mean", 0.5, None),
    "ce_sum": ("class", False, "sum", 0.5 / 512, None),
    "ce_none_weighted_then_mean": ("class", True, "none", 0.5, None),
    "huber_mean": ("reg", False, "mean", 2.0, 0.5),
    "huber_mean_weighted": ("reg", True, "mean", 2.0, 0.5),
    "huber_sum_weighted": ("reg", True, "sum", 2.0 / 512, 0.5),
}


def _reduce(per_sample, reduction):
    return {"none": per_sample, "mean": per_sample.mean(), "sum": per_sample.sum()}[reduction]


def torch_loss(name):
    """The case's loss in torch ops alone, with losscc's (Gluon's) semantics: the sample weight
    multiplies each sample's loss, 'mean' divides by the number of samples; Gluon's HuberLoss(rho)
    is torch's smooth_l1_loss(beta=rho) (specs/huber.yaml), averaged over the outputs per sample."""
    target, _, reduction, _, rho = CASES[name]

    def fn(pred, label, sample_weight=None):
        if target == "class":
            per = F.cross_entropy(pred, label, reduction="none")
        else:
            per = F.smooth_l1_loss(pred, label, beta=rho, reduction="none")
        per = per if sample_weight is None else per * sample_weight
        per = per.mean(1) if per.ndim == 2 else per
        return _reduce(per, reduction)

    return fn


def objective(name, fn, out, y, w, world):
    """The scalar that backward runs from: 'none' averaged over the local samples, 'sum'
    times the world size (DDP averages the ranks' gradients; see the test's docstring)."""
    _, weighted, reduction, _, _ = CASES[name]
    v = fn(out, y, sample_weight=w) if weighted else fn(out, y)  # by name: the module's keyword path
    if reduction == "none":
        v = v.mean()
    if reduction == "sum":
        v = v * world
    return v


def model(init):
    m = torch.nn.Sequential(torch.nn.Linear(init["0.weight"].shape[1], init["0.weight"].shape[0]),
                            torch.nn.Tanh(),
                            torch.nn.Linear(init["2.weight"].shape[1], init["2.weight"].shape[0])).double()
    m.load_state_dict(init)
    return m


def train(name, fn, init, x, y, w, steps, ddp=False, world=1):
    """`steps` of plain SGD on (x, y, w); the final weights as {name: tensor}. The step is
    torch.optim.SGD's without momentum (p += -lr * grad), written out: the first
    torch.optim.Optimizer imports torch._dynamo (2 to 8 s measured), which the workers pay for
    DDP anyway but the test's own process need not."""
    net = model(init)
    run = torch.nn.parallel.DistributedDataParallel(net) if ddp else net
    lr = CASES[name][3]
    for _ in range(steps):
        objective(name, fn, run(x), y, w, world).backward()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _hex_ip(h):
    b = bytes.fromhex(h)
    if len(b) == 4:
        return ".".join(str(c) for c in b[::-1])
    words = [b[i:i + 4][::-1] for i in range(0, 16, 4)]  # /proc: each 32-bit word in host order
    return str(ipaddress.IPv6Address(b"".join(words)))


def sockets():
    """This process's TCP sockets as (local, remote, state) from /proc (Linux), else None."""
    if not os.path.exists("/proc/self/net/tcp"):
        return None
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/self/net/{table}") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                (lip, lport), (rip, rport) = (a.split(":") for a in f[1:3])
                found.append((f"{_hex_ip(lip)}:{int(lport, 16)}", f"{_hex_ip(rip)}:{int(rport, 16)}",
                              "LISTEN" if f[3] == "0A" else f[3]))
    return found


if __name__ == "__main__":
    import datetime
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, port, fd, job, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    # the store's server (rank 0) listens on the socket the test bound to 127.0.0.1 and passed
    # down (left to itself, TCPStore listens on every interface); rank 1 connects to it
    timeout = datetime.timedelta(seconds=120)
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout, master_listen_fd=fd if rank == 0 else None)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    world = dist.get_world_size()
    with open(job, "rb") as fh:
        data = pickle.load(fh)  # the losses unpickle here: by reference to the build
    n = data["x"].shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    x, yc, yr, w = data["x"][part], data["y_class"][part], data["y_reg"][part], data["w"][part]
    result = {"losscc": {}, "torch": {}}
    for name, loss in data["losses"].items():
        y = yc if CASES[name][0] == "class" else yr
        ws = w if CASES[name][0] == "class" else w[:, None]  # a Huber sample weight is (N, 1)
        result["losscc"][name] = train(name, loss.torch(), data["init"], x, y, ws, data["steps"], True, world)
        result["torch"][name] = train(name, torch_loss(name), data["init"], x, y, ws, data["steps"], True, world)
    result["sockets"] = sockets()
    result["losses"] = {name: (loss._build["path"], loss._build["cache_key"], repr(loss))
                        for name, loss in data["losses"].items()}
    result["cpu_seconds"] = time.process_time()
    dist.barrier()
    dist.destroy_process_group()
    with open(out, "wb") as fh:
        pickle.dump(result, fh)
'''

_SHARED: dict = {"__name__": "ddp_worker"}
exec(compile(_WORKER, "<ddp worker>", "exec"), _SHARED)  # defines CASES, train, torch_loss, ...
CASES = _SHARED["CASES"]


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # one thread per process (two ranks on CI's 2 cores); gloo's interface is loopback's rather
    # than the one the host name resolves to
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", LOSSCC_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME=_loopback_interface())
    return env


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names or "lo0" not in names else "lo0"  # Linux's, else BSD's and macOS's


def _losses(losses):
    return {name: (losses.SoftmaxCrossEntropyLoss(reduction=red) if target == "class"
                   else losses.HuberLoss(rho=rho, reduction=red))
            for name, (target, _, red, _, rho) in CASES.items()}


def _data():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(N, D, dtype=torch.float64, generator=gen)
    teacher = torch.randn(D, C, dtype=torch.float64, generator=gen)
    y_class = (x @ teacher + torch.randn(N, C, dtype=torch.float64, generator=gen)).argmax(1)  # learnable labels
    y_reg = torch.tanh(x @ teacher / 3) * 2 + 0.3 * torch.randn(N, C, dtype=torch.float64, generator=gen)
    w = torch.rand(N, dtype=torch.float64, generator=gen) + 0.5
    torch.manual_seed(9)  # torch.nn.Linear's own initialization, once: every run starts from it
    init = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    return {"x": x, "y_class": y_class, "y_reg": y_reg, "w": w, "steps": STEPS,
            "init": {k: v.detach().clone() for k, v in init.state_dict().items()}}


def _start_ddp(tmp_path, job):
    """The two ranks, started; `job` reaches them pickled (the losses by reference). The
    store's socket is bound here, to 127.0.0.1 and a free port, and handed to rank 0: no other
    process can take the port in between, and nothing listens beyond loopback."""
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    procs = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port, fd = listener.getsockname()[1], listener.fileno()
        for rank in range(WORLD):
            with open(tmp_path / f"err{rank}.txt", "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", _WORKER, str(rank), str(port), str(fd), tmp_path / "job.pkl",
                     tmp_path / f"out{rank}.pkl"], env=_env(), pass_fds=(fd,) if rank == 0 else (),
                    stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _wait_ddp(tmp_path, procs):
    """The ranks' results; a rank that fails stops the other (which could wait for it until
    the store's timeout), and TIMEOUT bounds a hang."""
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    late = any(p.poll() is None for p in procs) and time.monotonic() > deadline
    _stop(procs)
    if late or any(p.returncode != 0 for p in procs):
        err = "\n".join(f"rank {r}: exit {p.returncode}\n{(tmp_path / f'err{r}.txt').read_text()}"
                        for r, p in enumerate(procs))
        pytest.fail(f"the two-process DDP run {f'did not finish in {TIMEOUT} s' if late else 'failed'}:\n{err}")
    return [pickle.loads((tmp_path / f"out{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _diff(a: dict, b: dict):
    """Max absolute difference over all parameters, and that over the largest |weight| of b."""
    d = max(float((a[k] - b[k]).abs().max()) for k in b)
    scale = max(float(v.abs().max()) for v in b.values())
    return d, d / scale


@pytest.fixture(scope="module")
def runs(losses, tmp_path_factory):
    """The DDP workers' results, and the single-process runs (losscc's loss and torch's) here."""
    job = {**_data(), "losses": _losses(losses)}
    tmp = tmp_path_factory.mktemp("ddp")
    procs = _start_ddp(tmp, job)  # the single-process runs below overlap the workers' start
    try:
        single = {"losscc": {}, "torch": {}}
        for name, loss in job["losses"].items():
            target = CASES[name][0]
            y = job["y_class"] if target == "class" else job["y_reg"]
            w = job["w"] if target == "class" else job["w"][:, None]
            single["losscc"][name] = _SHARED["train"](name, loss.torch(), job["init"], job["x"], y, w, STEPS)
            single["torch"][name] = _SHARED["train"](name, _SHARED["torch_loss"](name), job["init"], job["x"], y,
                                                     w, STEPS)
        ranks = _wait_ddp(tmp, procs)
    finally:
        _stop(procs)
    return job, ranks, single


def test_the_losses_reached_the_workers_pickled_and_both_ranks_agree_bitwise(runs, built):
    job, ranks, _ = runs
    # each rank unpickled the very losses made here, loaded from the session's build
    here = {name: (str(built), loss._build["cache_key"], repr(loss)) for name, loss in job["losses"].items()}
    assert ranks[0]["losses"] == ranks[1]["losses"] == here
    print("CPU seconds per rank:", [round(r["cpu_seconds"], 1) for r in ranks])
    for kind in ("losscc", "torch"):
        for name in CASES:
            for k, v in ranks[0][kind][name].items():
                assert torch.equal(v, ranks[1][kind][name][k]), (kind, name, k)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_reaches_the_single_process_weights(runs, name):
    job, ranks, single = runs
    ddp, one, ref = ranks[0]["losscc"][name], single["losscc"][name], single["torch"][name]
    moved = _diff(one, job["init"])[0]
    assert moved > 0.05, f"training hardly moved the weights ({moved}): the comparison would prove little"
    figures = {"ddp vs single": _diff(ddp, one), "single vs torch": _diff(one, ref), "ddp vs torch": _diff(ddp, ref),
               "torch's own ddp vs single": _diff(ranks[0]["torch"][name], ref)}
    print(f"{name}: moved {moved:.3f}; " + "; ".join(f"{k} abs {a:.2e} rel {r:.2e}" for k, (a, r) in figures.items()))
    for what, (_, rel) in figures.items():
        assert rel <= TOL, f"{name}: {what}: {rel:.3e} of the largest weight > {TOL}"


def test_the_workers_sockets_stayed_on_loopback(runs):
    _, ranks, _ = runs
    for rank, result in enumerate(ranks):
        found = result["sockets"]
        if found is None:
            pytest.skip("no /proc/self/net/tcp: the sockets cannot be listed here")
        connected = [s for s in found if s[2] != "LISTEN"]
        assert connected, f"rank {rank}: no TCP connection seen at all: {found}"
        for local, remote, state in found:
            hosts = [local] + ([remote] if state != "LISTEN" else [])
            for host in (ipaddress.ip_address(h.rsplit(":", 1)[0]) for h in hosts):
                host = getattr(host, "ipv4_mapped", None) or host  # ::ffff:127.0.0.1 is 127.0.0.1
                assert host.is_loopback, f"rank {rank}: {local} -> {remote} ({state})"
