"""The ``wals-ooc`` command line: thin wrappers that parse arguments and call the API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time

from .errors import SettingError

# Imports of numpy, numba, dask, zarr and the rest of wals_ooc happen inside the commands that
# need them: `wals-ooc --help` and `wals-ooc info STORE` start in a fraction of a second.


def _budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-budget", default=None, help="cap on peak RSS, e.g. 4GB (default: half the RAM)")


def _interactions_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", default=None, metavar="PATH",
                        help="the interaction store the model was trained on, if it has moved (checked by its id)")


def _progress(args) -> bool | None:
    return False if getattr(args, "quiet", False) else None


def _ids(values: list[str]):
    """Ids from the command line: integers when they all parse, else strings."""
    try:
        return [int(v) for v in values]
    except ValueError:
        return values


@contextlib.contextmanager
def _client(args):
    """A distributed Client from --scheduler or --workers, or None for the threaded scheduler."""
    if getattr(args, "scheduler", None):
        from distributed import Client

        with Client(args.scheduler) as client:
            yield client
    elif getattr(args, "workers", None):
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads_per_worker, processes=True) as cluster, Client(cluster) as client:
            print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
            yield client
    else:
        yield None


def cmd_convert(args) -> int:
    from .store.writer import convert

    value_col = None if args.no_value else args.value_col
    report = convert(
        args.inputs, args.store, user_col=args.user_col, item_col=args.item_col, value_col=value_col,
        order_col=args.order_col,
        delimiter=args.delimiter.encode().decode("unicode_escape"), header=not args.no_header, id_type=args.id_type,
        on_bad_lines=args.on_bad_lines, memory_budget=args.memory_budget, shard_nnz=args.shard_nnz,
        row_block=args.row_block, tmp_dir=args.tmp_dir, overwrite=args.overwrite, progress=_progress(args),
    )
    print(report.summary())
    for example in report.bad_rows.examples:
        print(f"  skipped: {example}")
    return 0


def cmd_info(args) -> int:
    from .errors import PathError, StoreNotFoundError
    from .store.lifecycle import inspect_target
    from .store.reader import open_store

    state = inspect_target(args.store)
    if state.what in ("absent", "empty"):
        raise StoreNotFoundError(f"{args.store}: no such store")
    if state.what != "store":
        raise PathError(f"{args.store} is not a wals-ooc store")
    if state.kind == "wals-ooc/model":
        return _model_info(args.store)
    if state.kind != "wals-ooc/interactions":
        print(f"store       {args.store}")
        print(f"kind        {state.kind} (format version {state.attrs.get('format_version')}, "
              f"{'complete' if state.attrs.get('complete') else 'incomplete'})")
        return 0
    store = open_store(args.store)
    print(f"store       {store.location}")
    print(f"shape       {store.n_users} users x {store.n_items} items")
    print(f"nnz         {store.nnz}  (density {store.density:.3g})")
    print(f"id kind     {store.id_kind}")
    for side in ("user", "item"):
        nnz = store.shard_nnz(side)
        print(f"{side} shards {store.n_shards(side)} (entries per shard min {min(nnz)}, max {max(nnz)}), row block {store.row_block}")
    for side in ("user", "item"):
        counts = _top_rows(store, side, args.top)
        ids = store.ids(side)
        listed = ", ".join(f"{ids[row]} ({count})" for row, count in counts)
        print(f"top {side}s  {listed}")
    return 0


def _model_info(location: str) -> int:
    """What a model store holds: settings, training progress, and the data it is bound to."""
    from .store.reader import open_store
    from .train.factors import FactorStore, check_interactions_match

    model = FactorStore.open(location)
    attrs = model.group.attrs
    config = model.config
    print(f"model        {location}")
    print(f"status       {model.status()}")
    print(f"shape        {attrs['n_users']} users x {attrs['n_items']} items, {config.factors} factors ({config.dtype})")
    print("config       " + " ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    binding = model.binding
    try:
        store = open_store(binding.get("location"))
        check_interactions_match(model, store, resuming=False)
        found = "found, same store"
    except Exception as exc:  # the model is still described; say why the data is not usable
        found = f"NOT usable: {exc}"
    print(f"interactions {binding.get('location')} (store_id {binding.get('store_id')}, nnz {binding.get('nnz')}): {found}")
    history = model.loss_history
    if history:
        last = history[-1]
        loss = "n/a" if last.get("loss") is None else f"{last['loss']:.6g}"
        print(f"loss         {loss} after iteration {last['iteration'] + 1}")
    return 0


def _top_rows(store, side: str, top: int) -> list[tuple[int, int]]:
    """The rows with the most entries, streaming the row pointers shard by shard."""
    import numpy as np

    best_rows = np.zeros(0, np.int64)
    best_counts = np.zeros(0, np.int64)
    for lo, hi in store.shard_ranges(side):
        counts = store.row_counts(side, lo, hi)
        rows = np.arange(lo, hi)
        best_rows = np.concatenate([best_rows, rows])
        best_counts = np.concatenate([best_counts, counts])
        keep = np.argsort(-best_counts, kind="stable")[:top]
        best_rows, best_counts = best_rows[keep], best_counts[keep]
    return list(zip(best_rows.tolist(), best_counts.tolist()))


def cmd_generate(args) -> int:
    from .memory import format_bytes
    from .synthetic import SyntheticSpec, write_csv, write_synthetic_store

    spec = SyntheticSpec(n_users=args.users, n_items=args.items, rows=args.rows, seed=args.seed)
    if args.output.endswith(".zarr"):
        print(write_synthetic_store(spec, args.output, overwrite=args.overwrite, memory_budget=args.memory_budget,
                                    progress=_progress(args)).summary())
    else:
        rows = write_csv(spec, args.output, compress=args.output.endswith(".gz"), overwrite=args.overwrite)
        print(f"wrote {rows} rows to {args.output} ({format_bytes(os.path.getsize(args.output))})")
    return 0


def cmd_train(args) -> int:
    from .memory import peak_rss
    from .model import WALS

    model = WALS(
        factors=args.factors, regularization=args.regularization, alpha=args.alpha, alpha0=args.alpha0,
        confidence=args.confidence, nu=args.nu, iterations=args.iterations, solver=args.solver, cg_steps=args.cg_steps,
        dtype=args.dtype, random_state=args.seed, memory_budget=args.memory_budget, threads=args.threads,
        compute_loss=not args.no_loss,
    )
    started = time.perf_counter()

    def report(iteration, seconds, loss):
        if args.quiet:
            return
        shown = "n/a" if loss is None else f"{loss:.6g}"
        print(f"iteration {iteration + 1}: {seconds:.2f}s loss {shown}", file=sys.stderr)

    with _client(args) as client:
        model.fit(args.store, factors_store=args.model, client=client, resume=not args.no_resume, callback=report,
                  progress=_progress(args))
    elapsed = time.perf_counter() - started
    history = model.loss_history
    print(json.dumps({
        "model": model.factors_store.location, "iterations": len(history), "seconds": round(elapsed, 3),
        "final_loss": history[-1]["loss"] if history else None, "peak_rss": peak_rss(),
    }))
    return 0


def cmd_recommend(args) -> int:
    import numpy as np

    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget, threads=args.threads)
    if args.all:
        with _client(args) as client:
            out = model.recommend_all(N=args.n, output=args.output, filter_already_liked=not args.no_filter,
                                      format=args.format, client=client, overwrite=args.overwrite)
        print(f"wrote top-{args.n} recommendations of {model.factors_store.group.attrs['n_users']} users to {out}")
        return 0
    if not args.users:
        raise SettingError("give --users ID... or --all")
    users = _ids(args.users)
    ids, scores = model.recommend(users, N=args.n, filter_already_liked=not args.no_filter)
    for user, row_ids, row_scores in zip(users, ids, scores):
        listed = [{"item": _plain(i), "score": round(float(s), 6)} for i, s in zip(row_ids, row_scores) if s > -np.inf]
        print(json.dumps({"user": user, "items": listed}))
    return 0


def cmd_similar(args) -> int:
    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget)
    side = "user" if args.users else "item"
    ids_in = _ids(args.users or args.items)
    method = model.similar_users if side == "user" else model.similar_items
    ids, scores = method(ids_in, N=args.n, filter_self=args.filter_self)
    for query, row_ids, row_scores in zip(ids_in, ids, scores):
        print(json.dumps({side: query, "similar": [{side: _plain(i), "score": round(float(s), 6)} for i, s in zip(row_ids, row_scores)]}))
    return 0


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


def cmd_split(args) -> int:
    from .evaluate.split import split

    report = split(args.store, args.train, args.test, method=args.method, test_fraction=args.test_fraction,
                   min_train=args.min_train, seed=args.seed, overwrite=args.overwrite, memory_budget=args.memory_budget,
                   progress=_progress(args))
    print(f"train: {report.train.nnz} entries -> {args.train}\ntest:  {report.test.nnz} entries -> {args.test}")
    return 0


def cmd_evaluate(args) -> int:
    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget, threads=args.threads)
    with _client(args) as client:
        metrics = model.evaluate(args.test, k=args.k, user_fraction=args.user_fraction, seed=args.seed, client=client)
    print(json.dumps(metrics))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wals-ooc", description="Out-of-core implicit ALS: convert, train, recommend, evaluate.")
    _verbose_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _verbose_arg(common)  # -v also after the command

    p = sub.add_parser("convert", parents=[common], help="CSV/Parquet (user, item, value) rows -> interaction store")
    p.add_argument("inputs", nargs="+", help="input files (.csv, .csv.gz, .tsv, .parquet)")
    p.add_argument("store", help="output store (a directory, or an fsspec URL)")
    p.add_argument("--user-col", default="0", help="user column name or 0-based position (default 0)")
    p.add_argument("--item-col", default="1", help="item column name or position (default 1)")
    p.add_argument("--value-col", default="2", help="value column name or position (default 2)")
    p.add_argument("--order-col", default=None,
                   help="numeric column ordering rows in time (timestamp); enables split --method leave_last_out")
    p.add_argument("--no-value", action="store_true", help="no value column: each row counts 1")
    p.add_argument("--delimiter", default=",", help="field delimiter (\\t for tab)")
    p.add_argument("--no-header", action="store_true", help="the files have no header line")
    p.add_argument("--id-type", choices=("auto", "int", "str"), default="auto")
    p.add_argument("--on-bad-lines", choices=("error", "skip"), default="error",
                   help="error: stop at the first bad row naming file, line and field; skip: count and drop")
    p.add_argument("--shard-nnz", type=int, default=None, help="entries per shard (default from the budget)")
    p.add_argument("--row-block", type=int, default=4096, help="shard bounds align to this many rows")
    p.add_argument("--tmp-dir", default=None, help="where spill files go (default: beside the store)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    _budget_arg(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", parents=[common], help="shape, nnz, shards, density and the top users/items of a store")
    p.add_argument("store")
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", parents=[common], help="synthetic power-law log: CSV (.csv/.csv.gz) or a store (.zarr)")
    p.add_argument("output")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    _budget_arg(p)
    p.set_defaults(func=cmd_generate)

    def cluster_args(q):
        q.add_argument("--threads", type=int, default=None, help="local task threads (default: all cores)")
        q.add_argument("--scheduler", default=None, help="address of a dask-distributed scheduler, e.g. tcp://host:8786")
        q.add_argument("--workers", type=int, default=None, help="start a LocalCluster of this many worker processes")
        q.add_argument("--threads-per-worker", type=int, default=1)

    p = sub.add_parser("train", parents=[common], help="fit WALS on a store; resumes from the last checkpoint")
    p.add_argument("store")
    p.add_argument("--model", default=None, help="factor store (default: <store>-model.zarr)")
    p.add_argument("--factors", type=int, default=64)
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--regularization", type=float, default=0.01)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--alpha0", type=float, default=1.0, help="weight of unobserved pairs")
    p.add_argument("--confidence", choices=("linear", "log", "constant"), default="linear")
    p.add_argument("--nu", type=float, default=0.0, help="frequency-scaled regularization exponent")
    p.add_argument("--solver", choices=("cg", "cholesky"), default="cg")
    p.add_argument("--cg-steps", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="start over even if the model store exists")
    p.add_argument("--no-loss", action="store_true", help="skip the per-iteration loss")
    p.add_argument("-q", "--quiet", action="store_true")
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recommend", parents=[common], help="top-N items for some users, or for all of them into a file")
    p.add_argument("model")
    p.add_argument("--users", nargs="*", default=None)
    p.add_argument("--all", action="store_true", help="every user, streamed to --output")
    p.add_argument("--output", default=None)
    p.add_argument("--format", choices=("zarr", "parquet"), default="zarr")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--no-filter", action="store_true", help="keep already-liked items")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (once the new one is complete)")
    _interactions_arg(p)
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("similar", parents=[common], help="most similar items (or users) by cosine of factors")
    p.add_argument("model")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--items", nargs="+")
    group.add_argument("--users", nargs="+")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--filter-self", action="store_true")
    _interactions_arg(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("split", parents=[common], help="per-user train/test split of a store")
    p.add_argument("store")
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--method", choices=("random", "leave_one_out", "leave_last_out", "last_fraction"), default="random",
                   help="random share / one random entry / the latest entry / the latest share of each user "
                        "(the last two need a store converted with --order-col)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--min-train", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    _budget_arg(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("evaluate", parents=[common], help="precision, recall, ndcg, MAP at k and AUC on a test store")
    p.add_argument("model")
    p.add_argument("test")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--user-fraction", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    _interactions_arg(p)
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def _verbose_arg(parser: argparse.ArgumentParser, top: bool = False) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="log plans and progress details; show tracebacks")


def _show_warning(command: str):
    """Warnings of wals-ooc as one line each: ``wals-ooc CMD: warning: ...``."""
    import warnings

    from .errors import WalsWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, WalsWarning):
            print(f"wals-ooc {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user-caused failure prints one line, ``wals-ooc CMD: error: ...``,
    and exits 2 (1 for a failure of the system, 130 when interrupted); ``-v`` shows tracebacks."""
    import warnings

    from .errors import WalsError

    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    warnings.showwarning = _show_warning(args.command)
    prefix = f"wals-ooc {args.command}: error:"
    try:
        return args.func(args)
    except WalsError as exc:
        if verbose:
            raise
        print(f"{prefix} {exc.cli_message()}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as exc:  # argument checks of the API that predate errors.py
        if verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prefix} {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if verbose:
            raise
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prefix} {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wals-ooc {args.command}: interrupted (existing stores are unchanged)", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in wals-ooc: one line by default, the traceback with -v
        if verbose:
            raise
        print(f"{prefix} internal error: {type(exc).__name__}: {exc} (run with -v for the traceback, and please "
              "report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
