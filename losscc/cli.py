"""Command line: argparse over the stages. Errors print as one line and exit 1, no traceback."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import LossccError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="losscc", description="A loss compiler: YAML math -> fused C kernels.")
    parser.add_argument("--version", action="version", version=f"losscc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="derive, generate and compile specs into an importable module")
    b.add_argument("specs", nargs="+", help="spec files or folders of *.yaml")
    b.add_argument("--out", default="build", help="output folder (default: build)")
    b.add_argument("--name", default="losses", help="module name (default: losses)")
    b.add_argument("--force", action="store_true", help="re-derive and recompile everything, even if nothing changed")
    b.add_argument("-v", "--verbose", action="store_true", help="also print each loss's derivation")
    quiet = b.add_mutually_exclusive_group()
    quiet.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    quiet.add_argument("--json", action="store_true",
                       help="print only a JSON report: each loss's status, kernels and timings")

    c = sub.add_parser("check", help="prove the numbers: examples, finite differences, and accuracy in "
                                     "ulps against the written formula in arbitrary precision")
    c.add_argument("specs", nargs="+", help="spec files or folders of *.yaml")
    c.add_argument("--samples", type=_positive_int, default=400,
                   help="sweep points per variant and dtype (default: 400; the full sweep: 10000)")
    c.add_argument("--seed", type=_natural, default=0, help="random seed of the sweep (default: 0)")
    c.add_argument("--out", default="build", help="where to build the kernels (default: build, "
                                                  "as the package losscc_check)")
    c.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-': stdout only)")

    ls = sub.add_parser("list", help="show the losses of a built module with their parameters")
    ls.add_argument("module", nargs="?", default="build/losses", help="built module folder (default: build/losses)")

    pl = sub.add_parser("plot", help="draw each loss and its gradient against the prediction (the "
                                     "tutorial's curves): one file per loss and an overview sheet")
    pl.add_argument("specs", nargs="+", help="spec files or folders of *.yaml")
    pl.add_argument("--out", default="plots", help="folder for the images (default: plots)")
    pl.add_argument("--build", default="build", help="where to build the kernels (default: build)")
    pl.add_argument("--format", choices=("svg", "png", "pdf"), default="svg", help="(default: svg)")

    ex = sub.add_parser("export", help="the kernels as a self-contained C library: NAME.h and NAME.c")
    ex.add_argument("specs", nargs="+", help="spec files or folders of *.yaml")
    ex.add_argument("--out", default="export", help="output folder (default: export)")
    ex.add_argument("--name", default="losses", help="file names, NAME.h and NAME.c (default: losses)")

    sh = sub.add_parser("show", help="a loss's spec, derived value and derivatives, the stability "
                                     "rewrites that fired, and the generated C of one kernel")
    sh.add_argument("name", help="the loss's name or alias (case-insensitive)")
    sh.add_argument("specs", nargs="*", default=["specs"], help="spec files or folders (default: specs)")
    sh.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                    help="a variant's value (default: the spec's defaults); repeat for several")
    sh.add_argument("--mode", choices=("v", "vg", "vgh"), default="vg",
                    help="the kernel whose C is shown: value, value+gradient, +second derivative (default: vg)")
    sh.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="(default: float64)")
    sh.add_argument("--plain", action="store_true",
                    help="a row loss's plain kernel (run when no optional input is given)")

    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            return _build(args)
        if args.command == "check":
            return _check(args)
        if args.command == "plot":
            from .plot import plot_specs

            plot_specs(args.specs, args.out, args.build, args.format)
            return 0
        if args.command == "export":
            from .export import export

            export(args.specs, args.out, args.name)
            return 0
        if args.command == "show":
            from .show import show

            print(show(args.name, args.specs, args.variant, args.mode, args.dtype, args.plain), end="")
            return 0
        return _list(args)
    except LossccError as exc:
        print(f"losscc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("losscc: interrupted", file=sys.stderr)
        return 130


def _build(args) -> int:
    import json

    from .build import build

    log = (lambda text: None) if args.quiet or args.json else print
    report = build(args.specs, out=args.out, name=args.name, force=args.force, log=log,
                   verbose=args.verbose and log is print)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


_positive_int, _natural = _at_least(1), _at_least(0)


def _check(args) -> int:
    """Exit 0 if every loss passes, 1 if any bound is broken (named on stderr)."""
    from .check import check, summary_table, to_json

    to_stdout = args.json == "-"
    log = (lambda *a: None) if to_stdout else (lambda text: print(text + "\n"))
    results = check(args.specs, samples=args.samples, seed=args.seed, out=args.out, log=log)
    if to_stdout:
        print(to_json(results))
    else:
        print(summary_table(results))
        if args.json:
            with open(args.json, "w") as f:
                f.write(to_json(results) + "\n")
    failed = [r for r in results if not r.ok]
    for r in failed:
        for failure in r.failures:
            print(f"losscc: check failed: {r.name}: {failure}", file=sys.stderr)
    return 1 if failed else 0


def _list(args) -> int:
    from .runtime import load_module

    module = load_module(args.module)
    for name, cls in module.LOSSES.items():
        meta = cls._meta
        params = ", ".join(f"{p['name']}={p['default']:g}" for p in meta["params"])
        variants = ", ".join(f"{v['name']}={'|'.join(map(str, v['values']))}" for v in meta["variants"])
        optional = ", ".join(f"{i['name']}={i['default']:g}" for i in meta["inputs"] if i["default"] is not None)
        optional = f"call-time {optional}" if optional else ""
        aliases = f" ({', '.join(meta['aliases'])})" if meta["aliases"] else ""
        extras = "; ".join(x for x in (params, variants, optional) if x)
        print(f"{name}{aliases}{': ' + extras if extras else ''}")
        print(f"    {meta['summary']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
