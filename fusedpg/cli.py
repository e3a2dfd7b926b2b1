"""The ``fusedpg`` console entry point: ``fusedpg verify`` and ``fusedpg bench``."""
from __future__ import annotations

import sys

_HELP = """usage: fusedpg COMMAND [options]   (fusedpg COMMAND --help: that command's options)

commands:
  verify   check every op and its gradients against a float64 reference on this machine (exit status 1 on a
           mismatch)
  bench    time and peak memory of fusedpg's ops against eager PyTorch and peer libraries; writes its rows, table
           and plots to --out (default here: {out})

options:
  -h, --help  this help
  --version   fusedpg's version"""


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fusedpg")
    except metadata.PackageNotFoundError:
        import fusedpg

        return getattr(fusedpg, "__version__", "unknown")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from .bench import default_out

        print(_HELP.format(out=default_out()), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"fusedpg {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "verify":
            from .verification.runner import main as verify_main

            return verify_main(rest)
        if command == "bench":
            from .bench import main as bench_main

            return bench_main(rest)
    except SystemExit as done:  # argparse's --help and usage errors: a return code, like every other outcome
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    print(f"fusedpg: unknown command {command!r} (expected verify or bench; fusedpg --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
