"""Start-up time of the ``wals-ooc`` command: wall seconds of fresh processes, medians of repeats.

Measures ``wals-ooc --help``, ``wals-ooc info STORE`` (a small store, made once with
``wals-ooc generate`` unless given) and, as the floor, ``python -c pass`` and ``python -c
"import numpy"``. The target of issue 14 is <= 0.4 s for ``--help`` and ``info``.

    python tools/bench_startup.py                  # 15 repeats each
    python tools/bench_startup.py --repeats 30 --store /work/data/shared/some.zarr
    python tools/bench_startup.py --every-help     # also `wals-ooc COMMAND --help` of every command
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="runs of each command (default: %(default)s)")
    parser.add_argument("--store", default=None, help="interaction store for `info` (default: a small generated one)")
    parser.add_argument("--detail", action="store_true",
                        help="also time the imports alone (numpy + zarr, and what `info` imports) to see the floor")
    parser.add_argument("--every-help", action="store_true", help="also time `wals-ooc COMMAND --help` of every command")
    args = parser.parse_args()

    cli = shutil.which("wals-ooc") or "wals-ooc"
    workdir = None
    store = args.store
    if store is None:
        workdir = tempfile.mkdtemp(prefix="wals-startup-")
        store = os.path.join(workdir, "small.zarr")
        subprocess.run([cli, "generate", store, "--users", "500", "--items", "300", "--rows", "5000", "-q"],
                       check=True, stdout=subprocess.DEVNULL)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import numpy'": [sys.executable, "-c", "import numpy"],
        "wals-ooc --help": [cli, "--help"],
        "wals-ooc info STORE": [cli, "info", store],
    }
    if args.every_help:
        from wals_ooc.cli import build_parser

        parsers = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
        for name in parsers.choices:
            commands[f"wals-ooc {name} --help"] = [cli, name, "--help"]
    if args.detail:
        commands["python -c 'import numpy, zarr'"] = [sys.executable, "-c", "import numpy, zarr"]
        commands["python -c 'import numpy, numcodecs'"] = [sys.executable, "-c", "import numpy, numcodecs"]
        commands["info's imports only"] = [sys.executable, "-c", "import wals_ooc.cli, wals_ooc.store.peek, "
                                           "wals_ooc.store.reader, wals_ooc.store.names, numcodecs.blosc, google_crc32c"]
    try:
        for argv in commands.values():  # warm the file cache (and numba's cache index) once
            timed(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved, so a disturbance hits every command alike
            for name, argv in commands.items():
                times[name].append(timed(argv))
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    width = max(34, *(len(name) for name in times))
    print(f"{'command':{width}s} {'median s':>9s} {'min s':>7s} {'max s':>7s}   ({args.repeats} runs each)")
    for name, values in times.items():
        print(f"{name:{width}s} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")


if __name__ == "__main__":
    main()
