"""The `pyhwp` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyhwp", description="Hardware-aware pruning with fast sparse kernels.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="build facts, CPU ISA, threads and the kernel table")
    from pyhwp.hardware.command import add_arguments as profile_arguments

    profile_arguments(sub.add_parser("profile", help="measure this machine: ceilings, bandwidth, power, "
                                     "kernel latency tables and where each sparse pattern beats dense"))
    from pyhwp.bench.suite import add_arguments as bench_arguments

    bench_arguments(sub.add_parser("bench", help="microbenchmarks: pyhwp kernels vs torch, interleaved"))
    from pyhwp.demo import add_arguments as demo_arguments

    demo_arguments(sub.add_parser("demo", help="prune the built-in digits CNN for this machine (trained on first "
                                  "run, cached) and write the report"))
    demo_arguments(sub.add_parser("prune", help="prune a built-in model for a target within an accuracy or "
                                  "latency budget and write the report"), prune=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # to re-run itself (bench --isa)
    if args.command == "info":
        from pyhwp.info import main as info_main

        return info_main()
    if args.command == "profile":
        from pyhwp.hardware.command import main as profile_main

        return profile_main(args)
    if args.command == "bench":
        from pyhwp.bench.suite import main as bench_main

        return bench_main(args)
    if args.command in ("demo", "prune"):
        from pyhwp.demo import main as demo_main

        return demo_main(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
