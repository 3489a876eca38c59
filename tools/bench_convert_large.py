"""Convert one large CSV, plain and gzip, under a memory budget; check the two stores are equal.

    # inputs (not timed; run under nice): the first --rows data rows of some CSV parts, one
    # header line, as DIR/rows-N.csv, then DIR/rows-N.csv.gz (pigz when installed, else gzip)
    nice -n 19 python tools/bench_convert_large.py --workdir DIR --make PART.csv [PART.csv ...]
    # timed: each input converted in a fresh process under --memory-budget, then the two stores
    # compared array by array, chunk by chunk (values and attributes, store_id aside)
    /work/bin/cpu-exclusive python tools/bench_convert_large.py --workdir DIR --run
    python tools/bench_convert_large.py --workdir DIR --clean       # delete the inputs and stores

Prints, per input: its size, wall time, rows/s, peak RSS of the converting process (VmHWM), the
store's disk size and the least free disk seen while it ran. Only files this tool made in
``--workdir`` are written or deleted; the parts are only read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench_billion import disk_used, gib  # the tool beside this one (tools/ is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))


def inputs(args) -> tuple[str, str]:
    plain = os.path.join(args.workdir, f"rows-{args.rows}.csv")
    return plain, plain + ".gz"


def make(args) -> None:
    """The first ``--rows`` data rows of the parts (each part's header line skipped but the
    first), written to a temporary name and renamed; then its gzip beside it, the same way."""
    plain, gz = inputs(args)
    os.makedirs(args.workdir, exist_ok=True)
    started = time.perf_counter()
    if not os.path.exists(plain):
        left = args.rows
        with open(plain + ".partial", "wb") as out:
            for k, part in enumerate(args.make):
                with open(part, "rb") as handle:
                    header = handle.readline()
                    if k == 0:
                        out.write(header)
                    while left > 0:
                        block = handle.read(64 << 20)
                        if not block:
                            break
                        block += handle.readline()  # whole lines only
                        lines = block.count(b"\n")
                        if lines > left:
                            cut = -1
                            for _ in range(left):
                                cut = block.index(b"\n", cut + 1)
                            block, lines = block[: cut + 1], left
                        out.write(block)
                        left -= lines
                if left == 0:
                    break
            out.flush()
            os.fsync(out.fileno())
        if left:
            os.remove(plain + ".partial")
            raise SystemExit(f"the parts hold {args.rows - left:,} data rows, fewer than --rows {args.rows:,}")
        os.replace(plain + ".partial", plain)
        print(f"{plain}: {args.rows:,} rows, {gib(os.path.getsize(plain))} ({time.perf_counter() - started:.0f} s)", flush=True)
    if not os.path.exists(gz):
        started = time.perf_counter()
        tool = (["pigz", "-p", "2"] if shutil.which("pigz") else ["gzip"]) + [f"-{args.gzip_level}"]
        with open(plain, "rb") as source, open(gz + ".partial", "wb") as out:
            subprocess.run(tool + ["-c"], stdin=source, stdout=out, check=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(gz + ".partial", gz)
        print(f"{gz}: {gib(os.path.getsize(gz))} ({' '.join(tool)}, {time.perf_counter() - started:.0f} s)", flush=True)


def child_convert(args) -> dict:
    import wals_ooc
    from wals_ooc.memory import peak_rss

    started = time.perf_counter()
    report = wals_ooc.convert(args.child_input, args.child_store, memory_budget=args.memory_budget, overwrite=True,
                              progress=False)
    return {"seconds": time.perf_counter() - started, "rows": report.rows_read, "nnz": report.nnz,
            "n_users": report.n_users, "n_items": report.n_items, "peak_rss": peak_rss(),
            "cpu_seconds": os.times().user + os.times().system}


def run_child(args, source: str, store: str) -> dict:
    """Convert in a fresh process; watch the free disk (killed under ``--min-free``)."""
    import signal

    command = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--memory-budget",
               args.memory_budget, "--child-input", source, "--child-store", store]
    least = shutil.disk_usage(args.workdir).free
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, text=True, start_new_session=True)
        try:
            while proc.poll() is None:
                least = min(least, shutil.disk_usage(args.workdir).free)
                if least < args.min_free:
                    raise SystemExit(f"stopped: {gib(least)} free on the disk of {args.workdir}")
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode:
            raise SystemExit(f"convert of {source} failed (exit {proc.returncode})")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    result["least_free"] = least
    result["store_disk"] = disk_used(store)
    result["input_bytes"] = os.path.getsize(source)
    return result


def compare(a: str, b: str) -> list[str]:
    """Differences between two stores: the same nodes, array metadata, attributes (store_id and
    times aside) and values, read chunk by chunk."""
    import zarr

    ignored = {"store_id", "sources"}  # a new id per store; the input paths and sizes
    problems: list[str] = []
    checked = [0, 0]

    def walk(x, y, path: str) -> None:
        ax = {k: v for k, v in x.attrs.asdict().items() if k not in ignored}
        ay = {k: v for k, v in y.attrs.asdict().items() if k not in ignored}
        if ax != ay:
            keys = sorted(k for k in set(ax) | set(ay) if ax.get(k) != ay.get(k))
            problems.append(f"{path or '/'}: attributes differ: {keys}")
        if isinstance(x, zarr.Group):
            nx, ny = sorted(x.keys()), sorted(y.keys())
            if nx != ny:
                problems.append(f"{path or '/'}: members differ: {nx} vs {ny}")
            for name in nx:
                if name in ny:
                    walk(x[name], y[name], f"{path}/{name}")
            return
        if (x.shape, x.dtype, x.chunks) != (y.shape, y.dtype, y.chunks):
            problems.append(f"{path}: shape/dtype/chunks {(x.shape, x.dtype, x.chunks)} vs {(y.shape, y.dtype, y.chunks)}")
            return
        step = x.chunks[0] * max(1, (64 << 20) // max(1, x.chunks[0] * x.dtype.itemsize * int(np.prod(x.shape[1:]) or 1)))
        for lo in range(0, x.shape[0], step) if x.shape else [0]:
            u = x[lo : lo + step] if x.shape else x[...]
            v = y[lo : lo + step] if y.shape else y[...]
            if not np.array_equal(u, v):
                problems.append(f"{path}: values differ in rows {lo}-{lo + step}")
                break
            checked[1] += u.nbytes
        checked[0] += 1

    walk(zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r"), "")
    print(f"compared {checked[0]} arrays, {gib(checked[1])} of values", flush=True)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rows", type=int, default=300_000_000)
    parser.add_argument("--memory-budget", default="1GiB")
    parser.add_argument("--min-free", type=float, default=2 * 2**30, help="bytes: stop a convert under this free disk")
    parser.add_argument("--make", nargs="+", metavar="PART", help="make the inputs from these CSV parts")
    parser.add_argument("--gzip-level", type=int, default=6, help="--make: gzip's compression level (1 fastest)")
    parser.add_argument("--run", action="store_true", help="convert both inputs and compare the stores")
    parser.add_argument("--keep-stores", action="store_true", help="--run: keep the stores (default: deleted after, unless they differ)")
    parser.add_argument("--clean", action="store_true", help="delete this tool's inputs and stores in --workdir")
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    parser.add_argument("--child-store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_input:
        print(json.dumps(child_convert(args)), flush=True)
        return
    plain, gz = inputs(args)
    stores = {"plain": os.path.join(args.workdir, "plain.zarr"), "gzip": os.path.join(args.workdir, "gzip.zarr")}
    if args.make:
        make(args)
    if args.run:
        results = {}
        for label, source in (("plain", plain), ("gzip", gz)):
            result = run_child(args, source, stores[label])
            results[label] = result
            print(f"{label:6s} {os.path.basename(source)} ({gib(result['input_bytes'])}): {result['rows']:,} rows -> "
                  f"{result['nnz']:,} nnz ({result['n_users']:,} x {result['n_items']:,}) in {result['seconds']:.1f} s, "
                  f"{result['rows'] / result['seconds']:,.0f} rows/s, peak RSS {gib(result['peak_rss'])} "
                  f"(budget {args.memory_budget}), CPU {result.get('cpu_seconds', float('nan')):.0f} s, store {gib(result['store_disk'])}, least free disk {gib(result['least_free'])}",
                  flush=True)
        problems = compare(stores["plain"], stores["gzip"])
        print("stores identical" if not problems else "STORES DIFFER:\n  " + "\n  ".join(problems), flush=True)
        with open(os.path.join(args.workdir, "results.json"), "w") as handle:
            json.dump({"results": results, "identical": not problems, "problems": problems}, handle, indent=1)
        if not args.keep_stores and not problems:  # stores that differ are kept, to be looked at
            for path in stores.values():
                shutil.rmtree(path)
        if problems:
            raise SystemExit(1)
    if args.clean:
        for path in (plain, gz, plain + ".partial", gz + ".partial", *stores.values()):
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    main()
