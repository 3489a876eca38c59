"""Id map lookups at scale: 1M lookups in a map of 100M UUID ids, under a memory budget.

Builds (once, out of core, with wals-ooc's own writer: ``DistinctIds`` + ``write_id_map``) the id
map of ``--ids`` random UUIDs, then in a fresh process under a budget of its warmed baseline +
``--allowance``, ``--repeats`` times: ``ids_of`` of ``--queries`` random rows (row -> id) and
``index_of`` of those ids, shuffled, plus 10% unknown UUIDs (id -> row, every answer checked).
Then the same for 1 and 1,000 random rows (what a recommend call or a small batch costs: only the
chunks they fall in are read). Prints the medians and lookups/s, and the process's peak RSS
against its budget.

``--peer-ids N`` also times the in-memory way at a size that fits (pyarrow ``index_in`` over N
ids held in RAM, the same number of queries), measured in the same run for a ratio.

    python tools/bench_ids.py                                  # 100M ids, 1M lookups
    python tools/bench_ids.py --ids 10000000 --peer-ids 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_DIR = os.environ.get("WALS_BENCH_IDS_DIR", "/work/data/ids")
BATCH = 1 << 20
_HEX = None


def uuids(seed, n: int):
    """n random UUID-formatted ids (36 ASCII characters) as an Arrow large_string array."""
    import numpy as np
    import pyarrow as pa

    global _HEX
    if _HEX is None:
        _HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
    raw = np.random.default_rng(seed).integers(0, 256, (n, 16), dtype=np.uint8)
    digits = np.empty((n, 32), np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 15]
    text = np.full((n, 36), ord("-"), np.uint8)
    for lo, hi, at in ((0, 8, 0), (8, 12, 9), (12, 16, 14), (16, 20, 19), (20, 32, 24)):
        text[:, at : at + hi - lo] = digits[:, lo:hi]
    offsets = np.arange(0, 36 * n + 1, 36, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.ravel()))


def _map_path(args) -> str:
    return os.path.join(args.workdir, f"uuid-map-{args.ids}.zarr")


def child_build(args) -> dict:
    import zarr

    from wals_ooc.memory import MemoryBudget, current_rss, peak_rss, to_bytes, warm_libraries
    from wals_ooc.store.ids import DistinctIds, write_id_map

    warm_libraries()
    budget = MemoryBudget.start(current_rss() + to_bytes(args.build_allowance))
    path = _map_path(args)
    started = time.perf_counter()
    spill = os.path.join(args.workdir, "build-spill")
    os.makedirs(spill, exist_ok=True)
    distinct = DistinctIds("str", spill, budget.allowance // 2, "uuid")
    for k, start in enumerate(range(0, args.ids, BATCH)):
        distinct.add(uuids([args.seed, k], min(BATCH, args.ids - start)))
    group = zarr.open_group(path, mode="w")
    n = write_id_map(group, "ids", distinct)
    group.attrs["complete"] = True
    seconds = time.perf_counter() - started
    return {"n": n, "seconds": seconds, "peak_rss": peak_rss(), "budget": budget.total}


def child_lookup(args) -> dict:
    import numpy as np
    import pyarrow as pa

    from wals_ooc.memory import current_rss, peak_rss, to_bytes, warm_libraries
    from wals_ooc.store.format import open_group
    from wals_ooc.store.ids import IdIndex

    warm_libraries()
    from wals_ooc.kernels.warm import warm_serving_kernels

    warm_serving_kernels()
    budget = current_rss() + to_bytes(args.allowance)
    # opened as wals-ooc opens its stores: every chunk read is checked against its crc32c
    index = IdIndex(open_group(_map_path(args), "r")["ids"], _map_path(args))
    rng = np.random.default_rng(args.seed + 1)
    n_absent = args.queries // 10
    n_present = args.queries - n_absent
    absent = uuids([args.seed, 10**9], n_absent)
    to_id, to_row = [], []
    for repeat in range(args.repeats):
        rows = rng.integers(0, index.n, n_present)
        started = time.perf_counter()
        present = index.ids_of(rows, as_arrow=True)  # row -> id, any order
        to_id.append(time.perf_counter() - started)
        order = rng.permutation(args.queries)
        queries = pa.concat_arrays([present, absent])
        del present
        queries = queries.take(pa.array(order))
        expected = np.concatenate([rows, np.full(n_absent, -1)])[order]
        del rows, order
        started = time.perf_counter()
        found = index.index_of(queries, missing="mark")  # id -> row, verified by bytes
        to_row.append(time.perf_counter() - started)
        if not np.array_equal(found, expected):
            raise SystemExit(f"wrong rows: {(found != expected).sum()} of {len(found)}")
        del queries, found, expected
    sparse = {}
    for size in (1, 1000):  # a recommend call, a small batch: only the chunks they need are read
        times = []
        for _ in range(args.repeats):
            rows = rng.integers(0, index.n, size)
            started = time.perf_counter()
            found = index.index_of(index.ids_of(rows, as_arrow=True))
            times.append(time.perf_counter() - started)
            assert np.array_equal(found, rows)
        sparse[str(size)] = times
    return {"index_of": to_row, "ids_of": to_id, "sparse": sparse, "peak_rss": peak_rss(), "budget": budget, "n": index.n}


def child_peer(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from wals_ooc.memory import peak_rss

    parts = [uuids([args.seed, k], min(BATCH, args.peer_ids - start)) for k, start in enumerate(range(0, args.peer_ids, BATCH))]
    held = pa.concat_arrays(parts)
    del parts
    rng = np.random.default_rng(args.seed + 2)
    times = []
    for _ in range(args.repeats):
        n_absent = args.queries // 10
        present = held.take(pa.array(rng.integers(0, len(held), args.queries - n_absent)))
        queries = pa.concat_arrays([present, uuids([args.seed, 10**9], n_absent)])
        started = time.perf_counter()
        found = pc.index_in(queries, value_set=held)  # builds the hash table of the held ids, then probes
        times.append(time.perf_counter() - started)
        assert found.null_count == n_absent
    return {"index_in": times, "peak_rss": peak_rss(), "n": len(held)}


def _run(args, kind: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--ids", str(args.ids), "--queries", str(args.queries),
               "--repeats", str(args.repeats), "--workdir", args.workdir, "--allowance", args.allowance,
               "--build-allowance", args.build_allowance, "--seed", str(args.seed), "--peer-ids", str(args.peer_ids)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=100_000_000)
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allowance", default="256MiB", help="lookup budget above the warmed baseline")
    parser.add_argument("--build-allowance", default="2GiB", help="budget of the one-off build above its baseline")
    parser.add_argument("--peer-ids", type=int, default=0, help="also time pyarrow index_in over this many ids in RAM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--child", choices=["build", "lookup", "peer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"build": child_build, "lookup": child_lookup, "peer": child_peer}[args.child](args)))
        return

    import zarr

    from wals_ooc.memory import format_bytes

    os.makedirs(args.workdir, exist_ok=True)
    path = _map_path(args)
    from wals_ooc.store.format import has_checksum

    try:
        group = zarr.open_group(path, mode="r")
        built = bool(group.attrs.get("complete")) and has_checksum(group["ids/key"])
    except Exception:  # absent, half-written, or from before checksums: build it
        built = False
    if not built:
        print(f"building the id map of {args.ids:,} UUIDs in {path} ...", flush=True)
        result = _run(args, "build")
        print(f"  built {result['n']:,} ids in {result['seconds']:.0f} s, peak RSS {format_bytes(result['peak_rss'])} "
              f"(budget {format_bytes(result['budget'])})", flush=True)
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    print(f"map {path}: {args.ids:,} UUID ids, {format_bytes(disk)} on disk; {args.queries:,} queries "
          f"(10% unknown), {args.repeats} repeats", flush=True)
    result = _run(args, "lookup")
    to_row, to_id = statistics.median(result["index_of"]), statistics.median(result["ids_of"])
    print(f"  index_of (id -> row): median {to_row:.2f} s ({args.queries / to_row:,.0f} lookups/s; runs "
          + ", ".join(f"{t:.2f}" for t in result["index_of"]) + ")")
    print(f"  ids_of   (row -> id): median {to_id:.2f} s ({(args.queries - args.queries // 10) / to_id:,.0f} rows/s; runs "
          + ", ".join(f"{t:.2f}" for t in result["ids_of"]) + ")")
    for size, times in result["sparse"].items():
        print(f"  {int(size):,} random row(s) -> id -> row: median {statistics.median(times) * 1000:.1f} ms")
    within = "within" if result["peak_rss"] <= result["budget"] else "OVER"
    print(f"  peak RSS {format_bytes(result['peak_rss'])}, {within} the budget {format_bytes(result['budget'])} "
          f"(warmed baseline + {args.allowance})")
    if args.peer_ids:
        peer = _run(args, "peer")
        median = statistics.median(peer["index_in"])
        print(f"  in-memory peer: pyarrow index_in over {peer['n']:,} ids held in RAM: median {median:.2f} s "
              f"({args.queries / median:,.0f} lookups/s), peak RSS {format_bytes(peer['peak_rss'])}; "
              f"ratio wals-ooc / peer time {to_row / median:.2f}")


if __name__ == "__main__":
    main()
