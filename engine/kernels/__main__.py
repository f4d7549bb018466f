"""`python -m pdserve.engine.kernels`: build (or find cached) and load the CPU kernels, so that engine
processes only load them. `make install` runs this. Exit status 1 where they cannot be built here (the
engine then uses its torch path)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pdserve.engine.kernels import KernelBuildError, build, default_build_root, load
from pdserve.engine.platform import cpu_description


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.engine.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--build-root", type=Path, default=None, help=f"default: {default_build_root()}")
    ap.add_argument("--compiler", default="c++")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        lib, seconds = build(args.build_root, compiler=args.compiler)
        load(args.build_root, compiler=args.compiler)
    except KernelBuildError as e:
        print(f"pdserve kernels: not built, the engine will use its torch path: {e}", file=sys.stderr)
        return 1
    how = f"built in {seconds:.1f} s" if seconds else "cached"
    print(f"pdserve kernels: {lib} ({how}); {cpu_description()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
