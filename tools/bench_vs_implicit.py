"""wals-ooc against implicit's CPU ALS: same matrix, factors, iterations, regularization, solver
and threads, side by side in one run.

Each trainer runs in its own fresh process (so peak RSS is its own), alternating, ``--repeats``
times. Printed per factor count: median seconds per iteration (the first iteration of each run
is reported apart: it includes Numba's cache load and implicit's set-up), the ratio
wals-ooc / implicit, the final training objective of each (both scored by the same streamed
objective, wals_ooc.train.objective), and peak RSS. The Numba compile/cache-load time of
wals-ooc is measured on a tiny warm-up fit before the timed one.

    python tools/bench_vs_implicit.py                       # 16M nnz, lastfm-360k shape, f=64
    python tools/bench_vs_implicit.py --factors 32 64 128 --repeats 3
    python tools/bench_vs_implicit.py --scale 0.1           # a 10x smaller matrix, quick look
    python tools/bench_vs_implicit.py --solver ialspp --block-size 32 --factors 256 --iterations 3 --implicit-iterations 5
    python tools/bench_vs_implicit.py --solver ialspp --block-size 8 16 32 64 --factors 256   # one implicit run, 4 wals-ooc runs

With ``--solver ialspp`` implicit runs its CG (``--cg-steps``) beside wals-ooc's iALS++, and the
tool also reports the time wals-ooc takes to reach implicit's final loss (its cumulative
iteration times up to the first iteration whose training loss is at or below implicit's final
loss), against implicit's total time for its ``--implicit-iterations``. Several ``--block-size``
values are each run (and summarised) against the same implicit runs.

Confidence is Hu et al.'s c = 1 + alpha * r for both (wals-ooc is told confidence="linear",
alpha0=1, nu=0 explicitly: its defaults are the log form): implicit is given the matrix
1 + alpha * r with its own alpha = 1, which is how it builds that confidence.

Both start from the same initial factors (wals-ooc's, random_state=0; ``--implicit-init`` lets
implicit draw its own): at f=128 on the 16M store the draw alone moved the 5-iteration loss by
0.2% (tools/RESULTS.md, issue 11 round 21), more than the solvers differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "wals-bench")


def ensure_store(path: str, scale: float, seed: int = 42) -> None:
    """Generate the lastfm-360k-shaped store (23.5M rows x ``scale``) unless it is already there
    and complete (an incomplete one is regenerated)."""
    from wals_ooc.store import StoreError, open_store
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    try:
        open_store(path)
        return
    except (FileNotFoundError, StoreError):
        pass
    spec = SyntheticSpec(n_users=int(360_000 * scale), n_items=int(160_000 * scale), rows=int(23_500_000 * scale), seed=seed)
    started = time.perf_counter()
    report = write_synthetic_store(spec, path, overwrite=True, progress=False, memory_budget="4GB")
    print(f"generated {path}: {report.n_users:,} x {report.n_items:,}, nnz {report.nnz:,} "
          f"in {time.perf_counter() - started:.0f}s", flush=True)


def _objective(args) -> dict:
    """The objective both peers minimise (and are scored by): Hu et al.'s, c = 1 + alpha * r."""
    return dict(factors=args.factors, regularization=args.regularization, alpha=args.alpha, alpha0=1.0,
                confidence="linear", nu=0.0)


def child_wals(args) -> dict:
    import wals_ooc
    from wals_ooc.memory import peak_rss
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store
    from wals_ooc.train.objective import objective

    settings = dict(_objective(args), solver=args.solver, cg_steps=args.cg_steps, block_size=args.block_size,
                    block_sweeps=args.block_sweeps, first_sweeps=args.first_sweeps, eigenbasis=args.eigenbasis, random_state=0,
                    threads=args.threads)
    if args.cg_preconditioner:
        settings["cg_preconditioner"] = args.cg_preconditioner
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: Numba compile (first ever) or cache load
        small = os.path.join(tmp, "warm.zarr")
        write_synthetic_store(SyntheticSpec(n_users=300, n_items=200, rows=3000, seed=1), small, progress=False)
        started = time.perf_counter()
        wals_ooc.WALS(iterations=1, **settings).fit(small, os.path.join(tmp, "m.zarr"), progress=False)
        warmup = time.perf_counter() - started
    times: list[float] = []
    model = wals_ooc.WALS(iterations=args.iterations, memory_budget=args.memory_budget, **settings)
    model.fit(args.store, os.path.join(args.workdir, "wals-model.zarr"), resume=False, progress=False,
              callback=lambda it, seconds, loss: times.append(seconds))
    peak = peak_rss()
    store = wals_ooc.open_store(args.store)
    loss = objective(store, model.user_factors, model.item_factors, model.config)
    return {"times": times, "warmup": warmup, "loss": loss, "peak_rss": peak,
            "losses": [entry["loss"] for entry in model.loss_history]}


def child_implicit(args) -> dict:
    import numpy as np
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    import wals_ooc
    from wals_ooc.memory import peak_rss
    from wals_ooc.train.objective import objective

    store = wals_ooc.open_store(args.store)
    shard = store.rows("user", 0, store.n_users)
    matrix = sp.csr_matrix((1 + args.alpha * shard.values, shard.indices, shard.indptr), shape=store.shape)
    del shard
    model = AlternatingLeastSquares(factors=args.factors, regularization=args.regularization, alpha=1.0,
                                    iterations=args.implicit_iterations or args.iterations, use_cg=args.solver != "cholesky",
                                    num_threads=args.threads, random_state=0, calculate_training_loss=False)
    model.cg_steps = args.cg_steps  # an attribute, not a constructor argument, in implicit 0.7
    if not args.implicit_init:  # wals-ooc's initial factors (random_state 0), so only the solvers differ
        model.user_factors, model.item_factors = (_initial_factors(store, side, args.factors) for side in ("user", "item"))
    times: list[float] = []
    with threadpool_limits(1, "blas"):  # implicit's own advice; its threads are num_threads
        model.fit(matrix, show_progress=False, callback=lambda it, seconds, loss: times.append(seconds))
    peak = peak_rss()
    config = wals_ooc.WALSConfig(**_objective(args))
    loss = objective(store, np.asarray(model.user_factors), np.asarray(model.item_factors), config)
    return {"times": times, "warmup": 0.0, "loss": loss, "peak_rss": peak}


def _initial_factors(store, side: str, factors: int):
    """The factors wals-ooc's trainer starts from with random_state=0 (its defaults' scale and dtype)."""
    import numpy as np

    from wals_ooc.config import WALSConfig
    from wals_ooc.train.half_sweep import initial_rows

    config = WALSConfig()
    n, block = store.n_rows(side), store.row_block
    return np.concatenate([initial_rows(side, lo, min(n, lo + block), factors, 0, block, config.init_scale, config.dtype)
                           for lo in range(0, n, block)])


def run_child(peer: str, args, factors: int, block_size: int) -> dict:
    command = [sys.executable, __file__, "--child", peer, "--store", args.store, "--workdir", args.workdir,
               "--factors", str(factors), "--iterations", str(args.iterations), "--threads", str(args.threads),
               "--solver", args.solver, "--cg-steps", str(args.cg_steps), "--regularization", str(args.regularization),
               "--alpha", str(args.alpha), "--memory-budget", str(args.memory_budget), "--block-size", str(block_size),
               "--implicit-iterations", str(args.implicit_iterations or 0)]
    command += ["--first-sweeps", str(args.first_sweeps)] if args.first_sweeps is not None else []
    command += [] if args.eigenbasis else ["--no-eigenbasis"]
    command += ["--block-sweeps", str(args.block_sweeps)] if args.block_sweeps is not None else []
    command += ["--implicit-init"] if args.implicit_init else []
    command += ["--cg-preconditioner", args.cg_preconditioner] if args.cg_preconditioner else []
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{peer} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="interaction store to train on (default: generate one in --workdir)")
    parser.add_argument("--workdir", default=DEFAULT_DIR)
    parser.add_argument("--scale", type=float, default=1.0, help="size of the generated matrix relative to 16M nnz")
    parser.add_argument("--factors", type=int, nargs="+", default=[64])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--solver", choices=["cg", "cholesky", "ialspp"], default="cg",
                        help="wals-ooc's solver; implicit runs CG for cg and ialspp, Cholesky for cholesky")
    parser.add_argument("--cg-steps", type=int, default=3)
    parser.add_argument("--cg-preconditioner", choices=["jacobi", "none"], default=None,
                        help="wals-ooc's CG preconditioner (default: wals-ooc's, jacobi; implicit's CG has none)")
    parser.add_argument("--block-size", type=int, nargs="+", default=[32],
                        help="ialspp's block size(s): each is run against the same implicit runs")
    parser.add_argument("--block-sweeps", type=int, default=None, help="ialspp's sweeps per half-sweep (default: wals-ooc's, by f)")
    parser.add_argument("--first-sweeps", type=int, default=None,
                        help="ialspp's sweeps per half-sweep in the first iteration (default: wals-ooc's, by f)")
    parser.add_argument("--eigenbasis", action=argparse.BooleanOptionalAction, default=True,
                        help="ialspp: solve in the eigenbasis of the fixed side's Gram (wals-ooc's default)")
    parser.add_argument("--implicit-iterations", type=int, default=0, help="implicit's iterations (default: --iterations)")
    parser.add_argument("--implicit-init", action="store_true",
                        help="let implicit draw its own initial factors (default: both start from wals-ooc's)")
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--memory-budget", default="4GB", help="wals-ooc's budget (implicit has none)")
    parser.add_argument("--child", choices=["wals", "implicit"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.factors = args.factors[0]
        args.block_size = args.block_size[0]
        result = (child_wals if args.child == "wals" else child_implicit)(args)
        print(json.dumps(result))
        return

    os.makedirs(args.workdir, exist_ok=True)
    if args.store is None:
        args.store = os.path.join(args.workdir, f"lastfm-shape-{args.scale:g}.zarr")
        ensure_store(args.store, args.scale)
    implicit_iterations = args.implicit_iterations or args.iterations
    print(f"store {args.store}; {args.iterations} iterations (implicit {implicit_iterations}) x {args.repeats} repeats, "
          f"{args.threads} threads, wals-ooc solver {args.solver}"
          + {"cg": f" ({args.cg_steps} CG steps)", "cholesky": "",
             "ialspp": f" (block size {' '.join(map(str, args.block_size))}, {args.block_sweeps or 'by f'} sweep(s), {args.first_sweeps or 'by f'} in the first iteration, {'' if args.eigenbasis else 'not '}in the eigenbasis)"}[args.solver]
          + f", implicit {'Cholesky' if args.solver == 'cholesky' else f'CG {args.cg_steps} steps'}", flush=True)
    try:
        import pyspark  # noqa: F401
        print("pyspark is installed but the Spark column is not implemented in this tool yet")
    except ImportError:
        print("pyspark not installed: no Spark column")

    from wals_ooc.memory import format_bytes

    block_sizes = args.block_size if args.solver == "ialspp" else args.block_size[:1]
    for factors in args.factors:
        implicit_runs: list[dict] = []
        wals_runs: dict[int, list[dict]] = {b: [] for b in block_sizes}
        for repeat in range(args.repeats):
            for peer, block_size in [("wals", b) for b in block_sizes] + [("implicit", block_sizes[0])]:
                result = run_child(peer, args, factors, block_size)
                (wals_runs[block_size] if peer == "wals" else implicit_runs).append(result)
                label = f"{peer} b={block_size}" if peer == "wals" and args.solver == "ialspp" else peer
                print(f"  f={factors} run {repeat + 1} {label:8s} s/iteration {[round(t, 2) for t in result['times']]}"
                      f" loss {result['loss']:.6g} peak RSS {format_bytes(result['peak_rss'])}", flush=True)
        for block_size in block_sizes:
            title = f"f={factors}" + (f", block size {block_size}" if args.solver == "ialspp" else "")
            summarise(title, {"wals": wals_runs[block_size], "implicit": implicit_runs}, args, implicit_iterations)


def summarise(title: str, runs: dict[str, list[dict]], args, implicit_iterations: int) -> None:
    """Print the medians, ratios and time to implicit's final loss of one wals-ooc setting."""
    from wals_ooc.memory import format_bytes

    summary = {}
    for peer, results in runs.items():
        steady = [t for r in results for t in r["times"][1:]]
        summary[peer] = {
            "median_s_per_iteration": statistics.median(steady),
            "median_first_iteration_s": statistics.median(r["times"][0] for r in results),
            "final_loss": statistics.median(r["loss"] for r in results),
            "peak_rss": max(r["peak_rss"] for r in results),
            "warmup_s": statistics.median(r["warmup"] for r in results),
        }
    ratio = summary["wals"]["median_s_per_iteration"] / summary["implicit"]["median_s_per_iteration"]
    loss_ratio = summary["wals"]["final_loss"] / summary["implicit"]["final_loss"]
    print(f"\n{title}: median seconds per iteration (iterations 2..{args.iterations}, {args.repeats} runs)")
    for peer, row in summary.items():
        print(f"  {peer:8s} {row['median_s_per_iteration']:8.3f} s   first iteration {row['median_first_iteration_s']:.2f} s"
              f"   final loss {row['final_loss']:.6g}   peak RSS {format_bytes(row['peak_rss'])}"
              + (f"   numba warm-up fit {row['warmup_s']:.2f} s" if peer == "wals" else ""))
    print(f"  ratio wals-ooc / implicit: time {ratio:.3f}x, final loss {loss_ratio:.4f}x", flush=True)
    # time to implicit's final loss: wals-ooc's cumulative iteration times (first included;
    # the numba warm-up is apart) to its first iteration at or below it, per run
    reached = []
    for wals_run, implicit_run in zip(runs["wals"], runs["implicit"]):
        cumulative = [sum(wals_run["times"][: i + 1]) for i in range(len(wals_run["times"]))]
        hit = [i for i, loss in enumerate(wals_run["losses"]) if loss <= implicit_run["loss"]]
        reached.append((cumulative[hit[0]] if hit else None, hit[0] + 1 if hit else None, sum(implicit_run["times"])))
    implicit_total = statistics.median(r[2] for r in reached)
    if all(r[0] is not None for r in reached):
        to_target = statistics.median(r[0] for r in reached)
        print(f"  time to implicit's {implicit_iterations}-iteration loss: wals-ooc {to_target:.2f} s (iteration "
              f"{statistics.median(r[1] for r in reached):g}) vs implicit {implicit_total:.2f} s: "
              f"ratio {to_target / implicit_total:.3f}x", flush=True)
    else:
        print(f"  time to implicit's {implicit_iterations}-iteration loss: not reached by wals-ooc in {args.iterations} "
              f"iterations (implicit {implicit_total:.2f} s); wals-ooc losses per iteration "
              f"{[round(loss / runs['implicit'][0]['loss'], 5) for loss in runs['wals'][0]['losses']]} x implicit's", flush=True)
    print(flush=True)

if __name__ == "__main__":
    main()
