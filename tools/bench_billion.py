"""One billion interactions end to end, out of core, stage by stage and resumable.

Stages (each recorded as done, with its figures, in ``<workdir>/state.json``; a killed run
continues with the first stage not done, and re-running a done stage is skipped):

  generate   a realistic log as CSV part files: ``--users`` users with power-law activity (capped
             at ``--max-user-rows`` rows), ``--items`` items with power-law popularity, latent
             taste clusters, rows shuffled within chunks (users interleave as in a time-ordered
             log). Users of the evaluation sample (every k-th user, ``--test-users`` of them) send
             ``--test-fraction`` of their rows to separate ``test-*.csv`` parts (held out: never in
             the training log). A numba kernel draws (one splitmix64 stream per chunk of ~4M rows,
             counts per user Poisson by numpy) and formats the rows; parts are written by ``--jobs``
             processes, each part atomically (temp name, then rename), gzip level 1 through ``pigz``
             (``--compress gzip``, the default: about half the disk of plain CSV; zlib if pigz is
             absent) or plain (``--compress none``). Same settings and seed, same rows.
  convert    ``wals_ooc.convert`` of the training parts under ``--memory-budget``, then of the
             test parts; checks that every generated row was read. With ``--delete-csv`` the
             training parts (this tool's own intermediate files, listed in the state) are then
             deleted to give the disk back.
  train-1..N one training iteration per stage (f=``--factors``, ``--memory-budget``), resumed from
             the model's checkpoint: ``--one`` runs one stage and exits, so each iteration can
             run in its own ``cpu-exclusive`` slot.
  recommend  top-10 for a seeded sample of ``--recommend-users`` users (batches through
             ``WALS.recommend``, already-liked items filtered), or with ``--recommend-all`` for every
             user through ``recommend_all`` (Parquet in the workdir, deleted once measured).
  evaluate   precision/recall/ndcg@10 on the held-out test store (``--eval-fraction`` of its users;
             AUC for ``--auc-fraction`` of those).
  cluster-1  with ``--with-cluster``: one iteration, same seed and settings as train-1, of a model
             of its own (``model-cluster.zarr``) on a ``distributed.LocalCluster`` of 2 worker
             processes of 1 thread, each under ``--memory-budget``; reports the peak RSS of every
             process (the client, which holds the scheduler and the nannies, and each worker), their
             CPU seconds (busy share of the machine: others' load shows), and the time and loss
             beside train-1's.
             ``--delete-cluster-model`` deletes that model once its figures are recorded.

The plans reported with a training stage are ``WALS.plan`` for the same store, budget and
executor. While a stage runs the workdir's free disk is watched; under ``--min-free`` the stage
is killed (it stays pending).

Every stage runs in a fresh child process and reports wall time, rows/s or s/iteration, ns per
nnz per iteration, the child's peak RSS (VmHWM, /proc) and the disk used under the workdir.
Nothing outside the workdir is written; only files this tool created are deleted.

    python tools/bench_billion.py                       # every pending stage, in order
    python tools/bench_billion.py --one                 # the next pending stage only
    python tools/bench_billion.py --status              # what is done, with figures
    nice -n 19 python tools/bench_billion.py --until generate
    /work/bin/cpu-exclusive python tools/bench_billion.py --one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DIR = "/work/data/billion"


# ----------------------------------------------------------------------------- state


def _state_path(workdir: str) -> str:
    return os.path.join(workdir, "state.json")


def load_state(workdir: str) -> dict:
    try:
        with open(_state_path(workdir)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {"stages": {}, "created": []}


def save_state(workdir: str, state: dict) -> None:
    path = _state_path(workdir)
    with open(path + ".tmp", "w") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)


def disk_used(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- generation


def _kernels():
    from numba import njit

    @njit(cache=True, nogil=True)
    def _search(cdf, lo, hi, x):
        """First index i in [lo, hi) with cdf[i] >= x (cdf ascending, last entry of the range 1)."""
        while lo < hi:
            mid = (lo + hi) >> 1
            if cdf[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(cache=True, nogil=True)
    def _draw(cdf, guide, g0, lo, hi, x):
        """Index in [lo, hi] for uniform x by inverse cdf, narrowed by a guide table of G entries."""
        G = guide.shape[1] - 1
        k = int(x * G)
        a = max(lo, guide[g0, k])
        b = min(hi, guide[g0, k + 1] + 1)
        return _search(cdf, a, b, x)

    @njit(cache=True, nogil=True)
    def _digits(out, pos, value):
        if value == 0:
            out[pos] = 48
            return pos + 1
        n = 0
        v = value
        while v > 0:
            n += 1
            v //= 10
        end = pos + n
        v = value
        for k in range(end - 1, pos - 1, -1):
            out[k] = 48 + v % 10
            v //= 10
        return end

    @njit(cache=True, nogil=True)
    def _next(state):
        """splitmix64: the next 64 random bits of ``state`` (a 1-element uint64 array)."""
        state[0] += np.uint64(0x9E3779B97F4A7C15)
        z = state[0]
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @njit(cache=True, nogil=True)
    def _uniform(state):
        return np.float64(_next(state) >> np.uint64(11)) * (1.0 / 9007199254740992.0)

    @njit(cache=True, nogil=True)
    def generate_chunk(seed, u_lo, counts, n_users, scramble_mul, global_cdf, global_guide, member_items,
                       member_start, member_cdf, member_guide, n_clusters, affinity, count_cdf, test_every, test_fraction,
                       train_buf, test_buf):
        """Rows of users [u_lo, u_lo + len(counts)) (``counts[k]`` rows for user u_lo + k) as CSV text:
        (train bytes, test bytes, train rows, test rows). One splitmix64 stream per chunk."""
        state = np.empty(1, np.uint64)
        state[0] = np.uint64(seed)
        total = 0
        for k in range(counts.shape[0]):
            total += counts[k]
        users = np.empty(total, np.int32)  # user - u_lo, one entry a row
        r = 0
        for k in range(counts.shape[0]):
            for _ in range(counts[k]):
                users[r] = k
                r += 1
        for i in range(total - 1, 0, -1):  # Fisher-Yates: interleave users, as in a time-ordered log
            j = int(_uniform(state) * (i + 1))
            t = users[i]
            users[i] = users[j]
            users[j] = t
        n_items = global_cdf.shape[0]
        n_counts = count_cdf.shape[0]
        tpos = 0
        spos = 0
        n_train = 0
        n_test = 0
        for r in range(total):
            u = u_lo + users[r]
            # ids scrambled over the id space (a bijection), so heavy users are anywhere
            user_id = (u * scramble_mul) % n_users
            cluster = (u * 2654435761) % n_clusters
            if _uniform(state) < affinity and member_start[cluster + 1] > member_start[cluster]:
                lo = member_start[cluster]
                hi = member_start[cluster + 1]
                item = member_items[_draw(member_cdf, member_guide, cluster, lo, hi - 1, _uniform(state))]
            else:
                item = _draw(global_cdf, global_guide, 0, 0, n_items - 1, _uniform(state))
            x = _uniform(state)  # geometric counts, by inverse cdf
            count = 1
            while count < n_counts and x > count_cdf[count - 1]:
                count += 1
            to_test = test_every > 0 and u % test_every == 0 and _uniform(state) < test_fraction
            if to_test:
                buf = test_buf
                pos = spos
            else:
                buf = train_buf
                pos = tpos
            pos = _digits(buf, pos, user_id)
            buf[pos] = 44
            pos = _digits(buf, pos + 1, item)
            buf[pos] = 44
            pos = _digits(buf, pos + 1, count)
            buf[pos] = 10
            pos += 1
            if to_test:
                spos = pos
                n_test += 1
            else:
                tpos = pos
                n_train += 1
        return tpos, spos, n_train, n_test

    return generate_chunk


def _power_law(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return weights[rng.permutation(n)]


def _expected_rows(args) -> np.ndarray:
    """Expected rows per user: power law by rank, capped, scaled to ``--rows`` in total."""
    rng = np.random.default_rng(args.seed)
    weights = _power_law(args.users, args.user_exponent, rng)
    expected = weights * (args.rows / weights.sum())
    for _ in range(20):  # cap heavy users, give the excess to the rest
        over = expected > args.max_user_rows
        if not over.any():
            break
        expected[over] = args.max_user_rows
        free = ~over
        expected[free] *= (args.rows - expected[over].sum()) / expected[free].sum()
    return expected


def _item_tables(args):
    rng = np.random.default_rng(args.seed + 1)
    popularity = _power_law(args.items, args.item_exponent, rng)
    cluster = rng.integers(0, args.clusters, args.items)
    global_cdf = np.cumsum(popularity)
    global_cdf /= global_cdf[-1]
    order = np.argsort(cluster, kind="stable")
    member_items = order.astype(np.int64)
    member_start = np.searchsorted(cluster[order], np.arange(args.clusters + 1)).astype(np.int64)
    member_cdf = np.empty(args.items, np.float64)
    for c in range(args.clusters):
        lo, hi = member_start[c], member_start[c + 1]
        if hi > lo:
            cdf = np.cumsum(popularity[member_items[lo:hi]])
            member_cdf[lo:hi] = cdf / cdf[-1]
    grid = np.arange(GUIDE + 1) / GUIDE
    global_guide = np.searchsorted(global_cdf, grid)[None, :].astype(np.int64)
    member_guide = np.zeros((args.clusters, GUIDE + 1), np.int64)
    for c in range(args.clusters):
        lo, hi = member_start[c], member_start[c + 1]
        if hi > lo:
            member_guide[c] = lo + np.searchsorted(member_cdf[lo:hi], grid)
    return global_cdf, global_guide, member_items, member_start, member_cdf, member_guide


GUIDE = 1 << 16  # guide-table entries per cdf (inverse-cdf draws search only a narrow range)


def _scramble_multiplier(n: int) -> int:
    import math

    m = int(n * 0.6180339887) | 1
    while math.gcd(m, n) != 1:
        m += 2
    return m


def expected_rows(args) -> np.ndarray:
    """``_expected_rows``, computed once a run (15 s at 20M users) and kept in the workdir."""
    path = os.path.join(args.workdir, "expected-rows.npy")
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    expected = _expected_rows(args)
    with open(path + ".partial", "wb") as handle:
        np.save(handle, expected)
    os.replace(path + ".partial", path)
    return expected


def part_bounds(args, expected: np.ndarray | None = None) -> list[int]:
    """User boundaries of the parts: about the same expected rows each."""
    expected = expected_rows(args) if expected is None else expected
    cum = np.cumsum(expected)
    cuts = np.searchsorted(cum, np.arange(1, args.parts) * (cum[-1] / args.parts))
    return [0] + [int(c) for c in cuts] + [args.users]


def _count_cdf(stop: float = 0.35, cap: int = 50) -> np.ndarray:
    """P(count <= k), k = 1..cap, of counts geometric with stopping probability ``stop``, capped."""
    cdf = 1.0 - (1.0 - stop) ** np.arange(1, cap + 1, dtype=np.float64)
    cdf[-1] = 1.0
    return cdf


class _Sink:
    """A part file being written: gzip level 1 through ``pigz`` (zlib if pigz is not installed),
    or plain; fed by a thread so that the next chunk is generated while this one is written."""

    def __init__(self, path: str, compress: bool):
        import queue
        import shutil
        import threading

        self.path = path
        self.handle = open(path, "wb")
        self.proc = None
        self.zfile = None
        if compress and shutil.which("pigz"):
            self.proc = subprocess.Popen(["pigz", "-1", "-n", "-p", "1", "-c"], stdin=subprocess.PIPE, stdout=self.handle)
            self.out = self.proc.stdin
        elif compress:
            import gzip

            self.zfile = gzip.GzipFile(fileobj=self.handle, mode="wb", compresslevel=1, mtime=0)
            self.out = self.zfile
        else:
            self.out = self.handle
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            block = self.queue.get()
            if block is None:
                return
            try:
                if self.error is None:
                    self.out.write(block)
            except BaseException as exc:  # reported by close()
                self.error = exc

    def write(self, block) -> None:
        self.queue.put(block)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.proc is not None:
            self.proc.stdin.close()
            if self.proc.wait():
                raise SystemExit(f"pigz failed writing {self.path} (exit {self.proc.returncode})")
        elif self.zfile is not None:
            self.zfile.close()
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def generate_part(args, part: int) -> dict:
    """Write train part ``part`` (and its test rows) atomically; returns its counts."""
    generate_chunk = _kernels()
    started = time.perf_counter()
    expected = expected_rows(args)
    bounds = part_bounds(args, expected)
    tables = _item_tables(args)
    count_cdf = _count_cdf()
    mul = _scramble_multiplier(args.users)
    test_every = max(1, args.users // args.test_users) if args.test_users else 0
    train_path, test_path = part_paths(args.workdir, part, args.compress)
    row_bytes = len(str(args.users - 1)) + len(str(args.items - 1)) + 2 + 3  # two commas, count <= 50, newline
    chunk_rows = 4_000_000
    rows = {"train": 0, "test": 0, "train_bytes": 0, "test_bytes": 0, "text_bytes": 0}
    sinks = [_Sink(train_path + ".partial", args.compress == "gzip"), _Sink(test_path + ".partial", args.compress == "gzip")]
    try:
        for sink in sinks:
            sink.write(HEADER)  # every part has the header: convert reads each file alike
        u = bounds[part]
        stop = bounds[part + 1]
        cum = np.concatenate([[0.0], np.cumsum(expected[u:stop])])
        chunk = 0
        while u < stop:
            hi = u + max(1, int(np.searchsorted(cum, cum[u - bounds[part]] + chunk_rows) - (u - bounds[part])))
            hi = min(hi, stop)
            seed = (args.seed * 1_000_003 + part * 10_007 + chunk) * 0x9E3779B97F4A7C15 % 2**64
            rng = np.random.default_rng(seed)
            counts = np.maximum(rng.poisson(expected[u:hi]), 1).astype(np.int64)  # at least one row a user
            total = int(counts.sum())
            train_buf = np.empty(total * row_bytes, np.uint8)
            test_buf = np.empty(total * row_bytes if test_every else 1, np.uint8)
            tpos, spos, n_train, n_test = generate_chunk(
                np.uint64(seed), u, counts, args.users, mul, *tables, args.clusters, args.affinity, count_cdf, test_every,
                args.test_fraction, train_buf, test_buf)
            sinks[0].write(memoryview(train_buf)[:tpos])
            sinks[1].write(memoryview(test_buf)[:spos])
            rows["train"] += n_train
            rows["test"] += n_test
            rows["text_bytes"] += tpos + spos
            u = hi
            chunk += 1
    finally:
        for sink in sinks:
            sink.close()
    rows["train_bytes"] = os.path.getsize(train_path + ".partial")
    rows["test_bytes"] = os.path.getsize(test_path + ".partial")
    os.replace(train_path + ".partial", train_path)
    os.replace(test_path + ".partial", test_path)
    rows["seconds"] = time.perf_counter() - started
    cpu = os.times()
    rows["cpu_seconds"] = cpu.user + cpu.system + cpu.children_user + cpu.children_system  # with pigz's
    return rows


HEADER = b"user,item,count\n"


def ensure_header(path: str) -> None:
    """Give a part written without the header line (by an earlier version of this tool: only
    part 0 had it) its header: rewritten beside it, then renamed over it."""
    with open(path, "rb") as handle:
        if handle.read(len(HEADER)) == HEADER:
            return
        handle.seek(0)
        with open(path + ".partial", "wb") as out:
            out.write(HEADER)
            while True:
                block = handle.read(64 << 20)
                if not block:
                    break
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    os.replace(path + ".partial", path)


def part_paths(workdir: str, part: int, compress: str = "gzip") -> tuple[str, str]:
    ext = ".csv.gz" if compress == "gzip" else ".csv"
    return (os.path.join(workdir, "csv", f"log-{part:03d}{ext}"), os.path.join(workdir, "csv", f"test-{part:03d}{ext}"))


# ----------------------------------------------------------------------------- child stages


def child_generate(args) -> dict:
    from wals_ooc.memory import peak_rss

    result = generate_part(args, args.part)
    result["peak_rss"] = peak_rss()
    return result


def child_convert(args) -> dict:
    """Convert the training parts (``--which train``) or the held-out parts (``test``); the
    store is this tool's own (listed in the state), so an unfinished earlier one is replaced."""
    import wals_ooc
    from wals_ooc.memory import peak_rss

    index = 0 if args.which == "train" else 1
    paths = [part_paths(args.workdir, p, args.compress)[index] for p in range(args.parts)]
    os.makedirs(os.path.join(args.workdir, "tmp"), exist_ok=True)
    started = time.perf_counter()
    report = wals_ooc.convert(paths, os.path.join(args.workdir, f"{args.which}.zarr"), memory_budget=args.memory_budget,
                              overwrite=True, progress=False, tmp_dir=os.path.join(args.workdir, "tmp"))
    return {"seconds": time.perf_counter() - started, "rows": report.rows_read, "nnz": report.nnz,
            "n_users": report.n_users, "n_items": report.n_items, "duplicates_summed": report.duplicates_summed,
            "peak_rss": peak_rss()}


def plan_figures(plan) -> dict:
    """What a ``TrainingPlan`` (``WALS.plan``) says, as JSON: its text and each side's key numbers."""
    sides = {}
    for side, half in plan.sides.items():
        sides[side] = {"mode": half.mode, "tasks": len(half.tasks), "concurrency": half.concurrency,
                       "task_threads": half.task_threads, "planned_peak": half.peak_bytes,
                       "allowance": half.allowance, "fixed_bytes": half.fixed_bytes, "fixed_passes": half.fixed_passes,
                       "within_budget": half.within_budget}
    return {"text": str(plan), "executor": plan.executor, "budget": plan.budget, "baseline": plan.baseline,
            "within_budget": plan.within_budget, "sides": sides}


def child_train(args) -> dict:
    """``--iteration`` iterations of ``--model-name`` (resumed), threaded or (``--cluster``) on a
    LocalCluster of 2 worker processes of 1 thread, each under ``--memory-budget``. The plans are
    ``WALS.plan`` for the same store, model, budget and client."""
    import wals_ooc
    from wals_ooc.memory import peak_rss

    times: list[float] = []
    client = cluster = None
    if args.cluster:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                               dashboard_address=":0")
        client = Client(cluster)
    store = os.path.join(args.workdir, "train.zarr")
    model_path = os.path.join(args.workdir, args.model_name)
    model = wals_ooc.WALS(factors=args.factors, iterations=args.iteration, random_state=0, threads=args.threads,
                          memory_budget=args.memory_budget)
    plan = plan_figures(model.plan(store, client=client, factors_store=model_path, resume=True))
    started = time.perf_counter()
    model.fit(store, model_path, resume=True, progress=False,
              callback=lambda it, seconds, loss: times.append(seconds), client=client)
    seconds = time.perf_counter() - started
    peaks = {"main": peak_rss()}
    cpu = {"main": _cpu_seconds()}
    if client is not None:
        cpu = {"client (with scheduler and nannies)": cpu["main"]}
        # a LocalCluster's scheduler and nannies live in this process; each worker is a process of its own
        peaks = {"client (with scheduler and nannies)": peaks["main"]}
        peaks.update({f"worker {w}": v for w, v in client.run(peak_rss).items()})
        cpu.update({f"worker {w}": v for w, v in client.run(_cpu_seconds).items()})
        client.close()
        cluster.close()
    history = model.loss_history
    return {"seconds": seconds, "iteration_seconds": times[-1] if times else seconds, "loss": history[-1].get("loss"),
            "history": history[-1], "plan": plan, "plans": [plan["text"]], "peak_rss": max(peaks.values()), "peaks": peaks,
            "cpu_seconds": cpu}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    times = os.times()
    return times.user + times.system


def child_recommend(args) -> dict:
    import wals_ooc
    from wals_ooc.memory import peak_rss

    model = wals_ooc.load(os.path.join(args.workdir, "model.zarr"), os.path.join(args.workdir, "train.zarr"),
                          memory_budget=args.memory_budget, threads=args.threads)
    if args.recommend_all:  # every user through recommend_all (Parquet), the output then deleted
        import shutil

        output = os.path.join(args.workdir, "rec-all")
        started = time.perf_counter()
        model.recommend_all(N=10, output=output, format="parquet", overwrite=True)
        seconds = time.perf_counter() - started
        written = disk_used(output)
        shutil.rmtree(output)
        maps = model.id_maps()
        return {"seconds": seconds, "users": int(maps.n_users), "output_bytes": written, "peak_rss": peak_rss(),
                "mode": "recommend_all"}
    maps = model.id_maps()
    n_users = maps.n_users if hasattr(maps, "n_users") else model.factors_store.n_users
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n_users, size=min(args.recommend_users, n_users), replace=False))
    started = time.perf_counter()
    done = 0
    batch = 20_000
    for lo in range(0, len(rows), batch):
        ids = maps.ids_of("user", rows[lo:lo + batch])
        items, scores = model.recommend(ids, N=10)
        done += len(ids)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "users": done, "peak_rss": peak_rss()}


def child_evaluate(args) -> dict:
    import wals_ooc
    from wals_ooc.memory import peak_rss

    model = wals_ooc.load(os.path.join(args.workdir, "model.zarr"), os.path.join(args.workdir, "train.zarr"),
                          memory_budget=args.memory_budget, threads=args.threads)
    started = time.perf_counter()
    metrics = model.evaluate(os.path.join(args.workdir, "test.zarr"), k=10, user_fraction=args.eval_fraction,
                             auc_fraction=args.auc_fraction)
    return {"seconds": time.perf_counter() - started, "metrics": metrics, "peak_rss": peak_rss()}


CHILDREN = {"generate": child_generate, "convert": child_convert, "train": child_train, "recommend": child_recommend,
            "evaluate": child_evaluate}


# ----------------------------------------------------------------------------- driver


def _common(args) -> list[str]:
    out = []
    for name in ("workdir", "rows", "users", "items", "parts", "seed", "user_exponent", "item_exponent", "clusters",
                 "affinity", "max_user_rows", "test_users", "test_fraction", "compress", "memory_budget", "factors", "threads",
                 "recommend_users", "eval_fraction", "auc_fraction"):
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.recommend_all:
        out.append("--recommend-all")
    return out


def run_child(args, stage: str, extra: list[str]) -> dict:
    """Run a stage in a child process (its own process group, with any worker processes it
    starts). While it runs, the free disk of the workdir's file system is watched: below
    ``--min-free`` the whole group is killed, so a stage never fills a disk others share (what
    the stage wrote stays its own, unfinished, and the stage stays pending)."""
    import shutil
    import signal
    import tempfile

    command = [sys.executable, os.path.abspath(__file__), "--child", stage] + _common(args) + extra
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, text=True, start_new_session=True)
        least = None
        try:
            while proc.poll() is None:
                free = shutil.disk_usage(args.workdir).free
                least = free if least is None else min(least, free)
                if free < args.min_free:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    raise SystemExit(f"stage {stage} stopped: {gib(free)} free on the disk of {args.workdir}, "
                                     f"under --min-free {gib(args.min_free)}")
                time.sleep(1.0)
        except BaseException:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise
        if proc.returncode:
            raise SystemExit(f"stage {stage} {' '.join(extra)} failed (exit {proc.returncode})")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    if least is not None:
        result["least_free_disk"] = least
    return result


def stage_names(args) -> list[str]:
    names = ["generate", "convert"] + [f"train-{i}" for i in range(1, args.iterations + 1)] + ["recommend", "evaluate"]
    return names + (["cluster-1"] if args.with_cluster else [])


def do_generate(args, state) -> dict:
    os.makedirs(os.path.join(args.workdir, "csv"), exist_ok=True)
    cache = os.path.join(args.workdir, "expected-rows.npy")
    if cache not in state["created"]:
        state["created"].append(cache)
        save_state(args.workdir, state)
    expected_rows(args)  # once, before the part processes read it
    parts = state.setdefault("parts", {})
    pending = [p for p in range(args.parts) if str(p) not in parts]
    started = time.perf_counter()
    running: list[tuple[int, subprocess.Popen]] = []
    peak = 0
    while pending or running:
        while pending and len(running) < args.jobs:
            p = pending.pop(0)
            for path in part_paths(args.workdir, p, args.compress):
                if path not in state["created"]:
                    state["created"].append(path)
            save_state(args.workdir, state)
            command = [sys.executable, os.path.abspath(__file__), "--child", "generate", "--part", str(p)] + _common(args)
            running.append((p, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
        p, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode:
            for _, other in running:
                other.wait()
            raise SystemExit(f"generating part {p} failed (exit {proc.returncode})")
        result = json.loads(out.strip().splitlines()[-1])
        parts[str(p)] = result
        peak = max(peak, result["peak_rss"])
        save_state(args.workdir, state)
        print(f"    part {p:3d}: {result['train']:,} + {result['test']:,} test rows in {result['seconds']:.1f} s", flush=True)
    rows = sum(v["train"] for v in parts.values())
    test_rows = sum(v["test"] for v in parts.values())
    bytes_ = sum(v["train_bytes"] + v["test_bytes"] for v in parts.values())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": rows, "test_rows": test_rows, "csv_bytes": bytes_,
            "part_seconds": sum(v["seconds"] for v in parts.values()), "peak_rss": peak,
            "part_cpu_seconds": sum(v.get("cpu_seconds", 0.0) for v in parts.values()),
            "parts_with_cpu_seconds": sum("cpu_seconds" in v for v in parts.values()),
            "note": "wall time of this invocation only; part_seconds sums every part's own time"}


def do_stage(args, state, name: str) -> dict:
    if name == "generate":
        return do_generate(args, state)
    if name == "convert":
        if args.compress == "none":
            for p in range(args.parts):
                for path in part_paths(args.workdir, p, args.compress):
                    ensure_header(path)
        for path in (os.path.join(args.workdir, "train.zarr"), os.path.join(args.workdir, "test.zarr")):
            if path not in state["created"]:
                state["created"].append(path)
        save_state(args.workdir, state)
        converted = state.setdefault("converted", {})
        for which in ("train", "test"):
            if which not in converted:
                got = run_child(args, "convert", ["--which", which])
                expected = sum(v[which] for v in state["parts"].values())
                if got["rows"] != expected:
                    raise SystemExit(f"convert of the {which} parts read {got['rows']:,} rows, generated {expected:,}")
                converted[which] = got
                save_state(args.workdir, state)
        result = dict(converted["train"])
        result.update({"test_seconds": converted["test"]["seconds"], "test_rows": converted["test"]["rows"],
                       "test_nnz": converted["test"]["nnz"],
                       "peak_rss": max(converted["train"]["peak_rss"], converted["test"]["peak_rss"])})
        if args.delete_csv:
            for p in range(args.parts):
                path = part_paths(args.workdir, p, args.compress)[0]
                if path in state["created"] and os.path.exists(path):
                    os.remove(path)
            result["deleted_csv"] = True
        return result
    if name == "cluster-1":  # one iteration of a model of its own, on 2 worker processes of 1 thread
        path = os.path.join(args.workdir, "model-cluster.zarr")
        if path not in state["created"]:
            state["created"].append(path)
            save_state(args.workdir, state)
        result = run_child(args, "train", ["--iteration", "1", "--model-name", "model-cluster.zarr", "--cluster"])
        result["disk"] = disk_used(args.workdir)  # with the cluster's model, before any deletion
        if args.delete_cluster_model:
            import shutil

            shutil.rmtree(path)
            result["deleted_model"] = True
        return result
    if name.startswith("train-"):
        path = os.path.join(args.workdir, "model.zarr")
        if path not in state["created"]:
            state["created"].append(path)
            save_state(args.workdir, state)
        return run_child(args, "train", ["--iteration", name.split("-")[1], "--model-name", "model.zarr"])
    return run_child(args, name, [])


def describe(name: str, result: dict, state: dict) -> str:
    nnz = state["stages"].get("convert", {}).get("nnz")
    line = f"{name:10s} wall {result['seconds']:9.1f} s  peak RSS {gib(result['peak_rss'])}"
    if name == "generate":
        line += (f"  rows {result['rows']:,} (+{result['test_rows']:,} held out)  CSV {gib(result['csv_bytes'])}  "
                 f"{result['rows'] / max(result['part_seconds'], 1e-9):,.0f} rows/s per process")
        if result.get("parts_with_cpu_seconds"):
            k = result["parts_with_cpu_seconds"]
            rows_k = sum(v["train"] + v["test"] for v in state.get("parts", {}).values() if "cpu_seconds" in v)
            line += (f"\n             CPU: {result['part_cpu_seconds']:,.0f} s in {k} parts (generator and pigz), "
                     f"{rows_k / max(result['part_cpu_seconds'], 1e-9):,.0f} rows per CPU-second")
    elif name == "convert":
        line += (f"  rows {result['rows']:,} -> nnz {result['nnz']:,}  {result['rows'] / result['seconds']:,.0f} rows/s"
                 f"  (test: {result['test_rows']:,} rows, {result['test_seconds']:.1f} s)")
    elif name.startswith(("train", "cluster")):
        s = result["iteration_seconds"]
        line += f"  s/iteration {s:.1f}  ns per nnz per iteration {1e9 * s / nnz:.1f}  loss {result['loss']:.8g}"
        threaded = state["stages"].get("train-1")
        if name.startswith("cluster") and threaded:
            t = threaded["iteration_seconds"]
            line += (f"\n             threaded train-1: s/iteration {t:.1f} ({1e9 * t / nnz:.1f} ns per nnz), "
                     f"loss {threaded['loss']:.8g}; cluster / threaded: time {s / t:.3f}x, "
                     f"loss relative difference {(result['loss'] - threaded['loss']) / threaded['loss']:+.2e}")
            h = result.get("history", {})
            if "user_seconds" in h:
                line += (f"\n             half-sweeps: user {h['user_seconds']:.1f} s (threaded {threaded['history']['user_seconds']:.1f}),"
                         f" item {h['item_seconds']:.1f} s (threaded {threaded['history']['item_seconds']:.1f})")
    elif name == "recommend":
        line += f"  {result['users']:,} users, {result['users'] / result['seconds']:,.0f} users/s"
        if result.get("mode") == "recommend_all":
            line += f" (recommend_all, every user: Parquet {gib(result['output_bytes'])}, then deleted)"
    elif name == "evaluate":
        line += "  " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
    if "disk" in result:
        line += f"  disk {gib(result['disk'])}"
    if "least_free_disk" in result:
        line += f" (least free {gib(result['least_free_disk'])})"
    if result.get("deleted_model"):
        line += " (its model then deleted)"
    for plan in result.get("plans", []):
        line += "\n             " + plan.replace("\n", "\n             ")
    if "cpu_seconds" in result and name.startswith("cluster"):
        line += ("\n             CPU seconds per process (whole stage): "
                 + ", ".join(f"{k}: {v:.0f}" for k, v in result["cpu_seconds"].items()))
    if "peaks" in result and len(result["peaks"]) > 1:
        line += "\n             peak RSS per process: " + ", ".join(f"{k}: {gib(v)}" for k, v in result["peaks"].items())
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--rows", type=int, default=1_000_000_000)
    parser.add_argument("--users", type=int, default=20_000_000)
    parser.add_argument("--items", type=int, default=2_000_000)
    parser.add_argument("--parts", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2, help="generation processes at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--user-exponent", type=float, default=0.8)
    parser.add_argument("--item-exponent", type=float, default=0.9)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--affinity", type=float, default=0.8)
    parser.add_argument("--max-user-rows", type=int, default=20_000)
    parser.add_argument("--test-users", type=int, default=1_000_000)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--compress", choices=("gzip", "none"), default="gzip",
                        help="CSV parts gzip level 1 (pigz, else zlib; about half the disk) or plain")
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recommend-users", type=int, default=1_000_000)
    parser.add_argument("--recommend-all", action="store_true",
                        help="recommend stage: top-10 of every user through recommend_all (Parquet, then deleted)")
    parser.add_argument("--eval-fraction", type=float, default=1.0)
    parser.add_argument("--auc-fraction", type=float, default=1.0,
                        help="share of the evaluated users whose AUC is computed exactly (it ranks the whole catalogue)")
    parser.add_argument("--delete-csv", action="store_true", help="delete the training CSV parts after a verified convert")
    parser.add_argument("--with-cluster", action="store_true",
                        help="add a stage: one iteration on a LocalCluster of 2 processes x 1 thread (budget per worker)")
    parser.add_argument("--delete-cluster-model", action="store_true",
                        help="delete the cluster stage's model (several GB) once its figures are recorded")
    parser.add_argument("--min-free", type=float, default=2 * 2**30,
                        help="bytes: a stage is killed when the workdir's disk has less free (default 2 GiB)")
    parser.add_argument("--one", action="store_true", help="run the next pending stage only")
    parser.add_argument("--until", default=None, help="stop after this stage")
    parser.add_argument("--status", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--iteration", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model-name", default="model.zarr", help=argparse.SUPPRESS)
    parser.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--which", default="train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)), flush=True)
        return
    os.makedirs(args.workdir, exist_ok=True)
    state = load_state(args.workdir)
    settings = {k: v for k, v in vars(args).items() if k in ("rows", "users", "items", "parts", "seed", "user_exponent",
                                                             "item_exponent", "clusters", "affinity", "max_user_rows",
                                                             "test_users", "test_fraction", "compress")}
    if state.get("settings", settings) != settings:
        raise SystemExit(f"{args.workdir} holds a run of other settings {state['settings']}; use another --workdir")
    state["settings"] = settings
    save_state(args.workdir, state)
    for name in stage_names(args):
        done = state["stages"].get(name)
        if done is not None:
            print("done      " + describe(name, done, state), flush=True)
            if args.until == name:
                break
            continue
        if args.status:
            print(f"pending    {name}")
            continue
        print(f"running    {name} ...", flush=True)
        result = do_stage(args, state, name)
        result.setdefault("disk", disk_used(args.workdir))
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        state["stages"][name] = result
        save_state(args.workdir, state)
        print("finished  " + describe(name, result, state), flush=True)
        if args.one or args.until == name:
            break


if __name__ == "__main__":
    main()
