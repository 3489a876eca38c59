"""The ``wals-ooc`` command line: thin wrappers that parse arguments and call the API."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Iterator

from .errors import SettingError, StoreError

# Imports of numpy, numba, dask, zarr and the rest of wals_ooc happen inside the commands that
# need them: `wals-ooc --help` and `wals-ooc info STORE` start in a fraction of a second.


def _budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-budget", default=None, help="cap on peak RSS, e.g. 4GB (default: half the RAM)")


def _interactions_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interactions", default=None, metavar="PATH",
                        help="the interaction store the model was trained on, if it has moved (checked by its id; "
                             "default: where it was when the model was trained)")


def _progress(args) -> bool | None:
    return False if getattr(args, "quiet", False) else None


def _ids(store, side: str, values: list[str]) -> list:
    """Ids from the command line as the model's id maps spell them (integers as int, text as
    given); an unknown one raises UnknownIdError naming it."""
    return [_plain(v) for v in store.ids_of(side, store.index_of(side, values))]


@contextlib.contextmanager
def _client(args) -> Iterator[Any]:
    """A distributed Client from --scheduler or --workers, or None for the threaded scheduler
    (made by ``execute.connect``: the executor module is the one that knows clients)."""
    from .execute import connect

    with connect(getattr(args, "scheduler", None), getattr(args, "workers", None),
                 getattr(args, "threads_per_worker", 1)) as client:
        if client is not None and not getattr(args, "scheduler", None):
            print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
        yield client


def cmd_convert(args) -> int:
    from .store.writer import convert

    value_col = None if args.no_value else args.value_col
    report = convert(
        args.inputs, args.store, user_col=args.user_col, item_col=args.item_col, value_col=value_col,
        order_col=args.order_col,
        delimiter=args.delimiter.encode().decode("unicode_escape"), header=not args.no_header, id_type=args.id_type,
        on_bad_lines=args.on_bad_lines, memory_budget=args.memory_budget, shard_nnz=args.shard_nnz,
        row_block=args.row_block, tmp_dir=args.tmp_dir, overwrite=args.overwrite, progress=_progress(args),
        item_names=args.item_names, user_names=args.user_names, names_options=_names_options(args),
    )
    print(report.summary())
    for example in report.bad_rows.examples:
        print(f"  skipped: {example}")
    return 0


def _names_options(args) -> dict:
    """How names files are read (``names.NamesSpec``), from the --names-* options."""
    return {"id_col": args.names_id_col, "name_col": args.names_name_col, "delimiter": _unescape(args.names_delimiter),
            "encoding": args.names_encoding, "quote": args.names_quote, "header": not args.names_no_header}


def _unescape(text: str) -> str:
    return text.encode().decode("unicode_escape")


def cmd_names(args) -> int:
    from .store.names import add_names

    for summary in add_names(args.store, items=args.items, users=args.users, memory_budget=args.memory_budget,
                             **_names_options(args)):
        print(summary.summary())
    return 0


def _named(entry: dict, name) -> dict:
    """A JSON record with its display name, when it has one."""
    if name is not None:
        entry["name"] = name
    return entry


def cmd_info(args) -> int:
    from .store import peek

    lines: list[str] = []
    try:
        try:  # a local store is read without zarr (starts in a fraction of a second)
            return _info(args.store, args.top, lines.append, peek.open_group)
        except peek.Unsupported:  # something only zarr reads (a remote URL, another codec): read it with zarr
            lines.clear()
            from .store.format import open_group  # not store.lifecycle: info writes nothing, and starts faster

            return _info(args.store, args.top, lines.append, open_group)
    finally:  # what was found before an error is shown too
        if lines:
            print("\n".join(lines))


def _info(location: str, top: int, say, open_group) -> int:
    """What an interaction store holds, line by line to ``say`` (other kinds: what they are)."""
    from .store.reader import InteractionStore

    group = open_group(location)  # a path that is not a store: says what it is instead
    attrs = group.attrs
    kind = attrs.get("kind")
    if kind == "wals-ooc/model":
        return _model_info(location)
    if kind != "wals-ooc/interactions":
        say(f"store       {location}")
        say(f"kind        {kind} (format version {attrs.get('format_version')}, "
            f"{'complete' if attrs.get('complete') else 'incomplete'})")
        return 0
    store = InteractionStore(location, group=group)
    say(f"store       {store.location}")
    say(f"shape       {store.n_users} users x {store.n_items} items")
    say(f"nnz         {store.nnz}  (density {store.density:.3g})")
    kinds = store.id_kinds
    say(f"id kind     users {kinds['user']}, items {kinds['item']}")
    tops = {}
    for side in ("user", "item"):
        tops[side], nnz = _top_rows(store, side, top)
        say(f"{side} shards {store.n_shards(side)} (entries per shard min {min(nnz)}, max {max(nnz)}), row block {store.row_block}")
    name_maps = {side: store.name_map(side) if store.has_names(side) else None for side in ("user", "item")}
    for side in ("user", "item"):
        rows = [row for row, _ in tops[side]]
        ids = store.ids_of(side, rows)
        name_map = name_maps[side]
        names = name_map.names_of(rows) if name_map is not None else None
        shown = [f"{ident} {names[k]!r}" if names is not None and names[k] is not None else f"{ident}"
                 for k, ident in enumerate(ids.tolist())]
        listed = ", ".join(f"{label} ({count})" for label, (_, count) in zip(shown, tops[side]))
        say(f"top {side}s  {listed}")
    for side, name_map in name_maps.items():
        if name_map is not None:
            say(f"{side} names  {name_map.named} of {store.n_rows(side)} {side}s named")
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
        if not binding.get("location"):
            raise StoreError("the model records no interaction store")
        store = open_store(str(binding["location"]))
        check_interactions_match(model, store, resuming=False)
        found = "found, same store"
    except Exception as exc:  # the model is still described; say why the data is not usable
        found = f"NOT usable: {exc}"
    print(f"interactions {binding.get('location')} (store_id {binding.get('store_id')}, nnz {binding.get('nnz')}): {found}")
    history = model.loss_history
    if history:
        last = history[-1]
        loss = "n/a" if last.get("loss") is None else f"{last['loss']:.6g}"
        print(f"loss         {loss} after iteration {last['iteration']}")
    return 0


def _top_rows(store, side: str, top: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(the rows with the most entries and their counts, the entries of each shard), streaming
    the row pointers shard by shard."""
    import numpy as np

    best_rows = np.zeros(0, np.int64)
    best_counts = np.zeros(0, np.int64)
    shard_nnz = []
    for lo, hi in store.shard_ranges(side):
        counts = store.row_counts(side, lo, hi)
        shard_nnz.append(int(counts.sum()))
        rows = np.arange(lo, hi)
        best_rows = np.concatenate([best_rows, rows])
        best_counts = np.concatenate([best_counts, counts])
        keep = np.argsort(-best_counts, kind="stable")[:top]
        best_rows, best_counts = best_rows[keep], best_counts[keep]
    return list(zip(best_rows.tolist(), best_counts.tolist())), shard_nnz


def cmd_generate(args) -> int:
    from .memory import format_bytes
    from .synthetic import SyntheticSpec, write_csv, write_synthetic_store

    spec = SyntheticSpec(n_users=args.users, n_items=args.items, rows=args.rows, seed=args.seed,
                         clusters=args.clusters, item_exponent=args.item_exponent, affinity=args.affinity,
                         latent_dims=args.latent_dims, sharpness=args.sharpness)
    if args.output.endswith(".zarr"):
        print(write_synthetic_store(spec, args.output, overwrite=args.overwrite, memory_budget=args.memory_budget,
                                    progress=_progress(args)).summary())
    else:
        rows = write_csv(spec, args.output, compress=args.output.endswith(".gz"), overwrite=args.overwrite)
        print(f"wrote {rows} rows to {args.output} ({format_bytes(os.path.getsize(args.output))})")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """The WALS settings, defaults from ``WALSConfig`` (the one place they are set)."""
    if isinstance(p, _Unused):  # a command not being run: nothing to import or build
        return
    from .config import WALSConfig

    d = WALSConfig()
    p.add_argument("--factors", type=int, default=d.factors, help="latent factors per user and item")
    p.add_argument("--iterations", type=int, default=d.iterations, help="alternating iterations (one user and one item half-sweep each)")
    p.add_argument("--regularization", type=float, default=d.regularization, help="L2 weight on the factors (lambda)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of an observed value")
    p.add_argument("--alpha0", type=float, default=d.alpha0, help="weight of unobserved pairs")
    p.add_argument("--confidence", choices=("linear", "log", "constant"), default=d.confidence,
                   help="confidence c = alpha0 + alpha * g(value), g: value, log(1 + value / eps) or 1")
    p.add_argument("--eps", type=float, default=d.eps, help="scale of the log confidence")
    p.add_argument("--nu", type=float, default=d.nu, help="frequency-scaled regularization exponent")
    p.add_argument("--solver", choices=("cg", "cholesky", "ialspp"), default=d.solver,
                   help="conjugate gradient (fast, approximate), exact Cholesky row solves, or iALS++ block coordinate "
                        "descent (fast at high --factors)")
    p.add_argument("--cg-steps", type=int, default=d.cg_steps, help="conjugate-gradient steps per row solve")
    p.add_argument("--block-size", type=int, default=d.block_size, help="ialspp: coordinates solved together")
    p.add_argument("--block-sweeps", type=int, default=d.block_sweeps,
                   help="ialspp: passes over the blocks per half-sweep (default: in the eigenbasis 2 below --factors 512, 1 from 512 on, else 3 and 2; "
                        "only the first pass factors each block's system)")
    p.add_argument("--first-sweeps", type=int, default=d.first_sweeps,
                   help="ialspp: passes over the blocks in the first iteration's half-sweeps (at least --block-sweeps; default: 1 from --factors 512 on in the eigenbasis, else 2)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="factor precision")
    p.add_argument("--half-gathers", action=argparse.BooleanOptionalAction, default=d.half_gathers,
                   help="cg: gather the fixed rows from a float16 copy (float32 arithmetic; faster, losses within float32 rounding); --no-half-gathers keeps float32 gathers")
    p.add_argument("--eigenbasis", action=argparse.BooleanOptionalAction, default=d.eigenbasis,
                   help="ialspp: solve in the eigenbasis of the fixed side's Gram (fewer passes reach the same loss); --no-eigenbasis solves in the factors' own basis")
    p.add_argument("--cg-preconditioner", choices=("jacobi", "none"), default=d.cg_preconditioner,
                   help="cg: precondition the steps by each row's diagonal (jacobi: a lower loss for the same steps) "
                        "or not (none: plain CG, as implicit)")


def _model_settings(args) -> dict:
    return dict(factors=args.factors, regularization=args.regularization, alpha=args.alpha, alpha0=args.alpha0,
                confidence=args.confidence, eps=args.eps, nu=args.nu, iterations=args.iterations, solver=args.solver,
                cg_steps=args.cg_steps, block_size=args.block_size, block_sweeps=args.block_sweeps,
                first_sweeps=args.first_sweeps, dtype=args.dtype, half_gathers=args.half_gathers,
                eigenbasis=args.eigenbasis, cg_preconditioner=args.cg_preconditioner)


def cmd_train(args) -> int:
    from .memory import peak_rss
    from .model import WALS

    model = WALS(**_model_settings(args), random_state=args.seed, memory_budget=args.memory_budget, threads=args.threads,
                 compute_loss=not args.no_loss)
    if args.dry_run:  # the plans only: nothing is run or written
        with _client(args) as client:
            print(model.plan(args.store, client=client, factors_store=args.model, resume=not args.no_resume))
        return 0
    started = time.perf_counter()

    def report(iteration, seconds, loss):
        if args.quiet:
            return
        shown = "n/a" if loss is None else f"{loss:.6g}"
        print(f"iteration {iteration}/{args.iterations}: {seconds:.2f}s loss {shown}", file=sys.stderr)

    with _client(args) as client:
        model.fit(args.store, factors_store=args.model, client=client, resume=not args.no_resume, callback=report,
                  progress=_progress(args))
    elapsed = time.perf_counter() - started
    history = model.loss_history
    assert model.factors_store is not None  # fit sets it (or raises)
    print(json.dumps({
        "model": model.factors_store.location, "iterations": len(history), "seconds": round(elapsed, 3),
        "final_loss": history[-1]["loss"] if history else None, "peak_rss": peak_rss(),
    }))
    return 0


TUNE_FIXABLE = {"confidence": "confidence", "alpha": "weight", "regularization": "reg", "alpha0": "alpha0", "nu": "nu"}


def cmd_tune(args) -> int:
    from .tuning import SearchSpace, tune

    space: dict[str, Any] = {name: None for setting, name in TUNE_FIXABLE.items() if setting in (args.fix or [])}
    if "confidence" not in space:
        space["confidence"] = tuple(args.confidence_forms)
    for name, lo, hi in args.range or []:
        space[name] = (lo, hi)
    if args.search_factors:
        space["factors"] = tuple(args.search_factors)
    if args.search_iterations:
        space["iterations"] = tuple(args.search_iterations)
    final = args.final_store or args.final

    def report(record):
        if args.quiet:
            return
        value = "-" if record.value is None else f"{record.value:.4f}"
        print(f"trial {record.number} {record.state}: {args.metric}@{args.k} {value} after {record.iterations_done} "
              f"iterations, {record.seconds or 0:.1f}s", file=sys.stderr)

    with _client(args) as client:
        result = tune(
            args.store, args.validation, n_trials=args.trials, metric=args.metric, k=args.k, space=SearchSpace.of(space),
            base={**_model_settings(args), "random_state": args.seed}, model=args.model, study=args.study,
            study_name=args.study_name, workdir=args.workdir, validation_fraction=args.validation_fraction,
            validation_method=args.validation_method, validation_folds=args.validation_folds, final=final, merged_store=args.merged_store,
            keep_best=not args.no_keep_best, prune=not args.no_prune, eval_every=args.eval_every,
            startup_trials=args.startup_trials, user_fraction=args.user_fraction, seed=args.seed, timeout=args.timeout, resume=not args.no_resume,
            client=client, threads=args.threads, memory_budget=args.memory_budget, progress=_progress(args),
            callback=report,
        )
    print(result.table())
    best = result.best_params
    flags = " ".join(f"--{k.replace('_', '-')} {v:.6g}" if isinstance(v, float) else f"--{k} {v}" for k, v in best.items())
    print(f"best: trial {result.best_trial}, {result.metric} {result.best_value:.4f} on the validation store")
    print(f"  wals-ooc train STORE {flags}")
    print(json.dumps({"best_params": best, "best_value": result.best_value, "metric": result.metric,
                      "trials": result.counts(), "study": result.study, "best_model": result.best_model,
                      "final_model": result.final_model, "seconds": round(result.seconds, 2)}))
    return 0


def cmd_recommend(args) -> int:
    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget, threads=args.threads)
    index = _index_choice(args, model, "item", "inner_product")
    if args.all:
        with _client(args) as client:
            out = model.recommend_all(N=args.n, output=args.output, filter_already_liked=not args.no_filter,
                                      format=args.format, client=client, overwrite=args.overwrite, index=index)
        where = "" if args.output else " (the default place: give --output PATH to choose it)"
        print(f"wrote top-{args.n} recommendations of {model.id_maps().n_users} users to {out}{where}")
        return 0
    if not args.users:
        raise SettingError("give --users ID... or --all")
    users = _ids(model.id_maps(), "user", args.users)
    ids, scores, names = model.recommend(users, N=args.n, filter_already_liked=not args.no_filter, index=index,
                                         names=True)
    user_names = model.names_of(users, side="user")
    for user, user_name, row_ids, row_scores, row_names in zip(users, user_names, ids, scores, names):
        listed = [_named({"item": _plain(i), "score": round(float(s), 6)}, n)
                  for i, s, n in zip(row_ids.compressed(), row_scores.compressed(), row_names.compressed())]
        print(json.dumps(_named({"user": user}, user_name) | {"items": listed}, ensure_ascii=False))
    return 0


def cmd_similar(args) -> int:
    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget, threads=args.threads)
    side = "user" if args.users or args.user_name else "item"
    if args.item_name or args.user_name:  # exact name, else ignoring case; ambiguous: listed
        ids_in = [_plain(model.id_of_name(name, side)) for name in (args.item_name or args.user_name)]
    else:
        ids_in = _ids(model.id_maps(), side, args.users or args.items)
    method = model.similar_users if side == "user" else model.similar_items
    ids, scores, names = method(ids_in, N=args.n, filter_self=args.filter_self,
                                index=_index_choice(args, model, side, "cosine"), names=True)
    for query, query_name, row_ids, row_scores, row_names in zip(ids_in, model.names_of(ids_in, side), ids, scores,
                                                                   names):
        similar = [_named({side: _plain(i), "score": round(float(s), 6)}, n)
                   for i, s, n in zip(row_ids.compressed(), row_scores.compressed(), row_names.compressed())]
        print(json.dumps(_named({side: query}, query_name) | {"similar": similar}, ensure_ascii=False))
    return 0


def _index_choice(args, model, side: str, metric: str):
    """--index [PATH] (with --ef-search/--nprobe) as the ``index`` argument of a serving call."""
    if args.index is None:
        if args.ef_search is not None or args.nprobe is not None:
            raise SettingError("--ef-search and --nprobe tune an approximate index: give --index too")
        return None
    if args.ef_search is None and args.nprobe is None:
        return args.index
    from .index import resolve_index

    return resolve_index(args.index, model.factors_store, side, metric, model.memory_budget, ef_search=args.ef_search,
                         nprobe=args.nprobe)


def cmd_export(args) -> int:
    from .model import load

    model = load(args.model, memory_budget=args.memory_budget)
    out = model.export(args.output, format=args.format, overwrite=args.overwrite)
    print(f"wrote the factors of {args.model} with their ids to {out} ({args.format})")
    return 0


def cmd_index(args) -> int:
    from .model import load

    model = load(args.model, memory_budget=args.memory_budget, threads=args.threads)
    started = time.perf_counter()
    built = model.build_index(side=args.side, metric=args.metric, location=args.output, kind=args.kind,
                              hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=128 if args.ef_search is None else args.ef_search,
                              nlist=args.nlist, nprobe=32 if args.nprobe is None else args.nprobe, max_fetch=args.max_fetch,
                              mips=args.mips, overwrite=args.overwrite, candidates=args.candidates)
    print(f"built {built.describe()} in {time.perf_counter() - started:.1f}s")
    return 0


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


def cmd_report(args) -> int:
    from .model import load

    model = load(args.model, interactions=args.interactions, memory_budget=args.memory_budget, threads=args.threads)
    with _client(args) as client:
        out = model.report(args.output, test=args.test, overwrite=args.overwrite, k_max=args.k_max, n=args.n,
                           sample_users=args.sample_users, show_users=args.show_users,
                           user_fraction=args.user_fraction, seed=args.seed, client=client)
    print(f"wrote {out}")
    return 0


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
        metrics = model.evaluate(args.test, k=args.k, user_fraction=args.user_fraction, seed=args.seed, client=client,
                                 auc=not args.no_auc, auc_fraction=args.auc_fraction)
    print(json.dumps(metrics))
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default: "(default: X)" is appended unless the text already
    says what the default is, or the option is an on/off flag (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or not action.option_strings \
                or action.default == argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return f"{text} (default: %(default)s)"


class _Unused:
    """Stands in for the parser of a command that is not being run: its options are not built
    (argparse takes milliseconds per command, a noticeable share of a fast command's start)."""

    def add_argument(self, *args, **kwargs):
        return None

    def add_mutually_exclusive_group(self, **kwargs):
        return self

    def set_defaults(self, **kwargs):
        return None


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with only the options of command ``only`` built."""
    parser = argparse.ArgumentParser(prog="wals-ooc", formatter_class=_HelpFormatter,
                                     description="Out-of-core implicit ALS: convert, train, recommend, evaluate, report.")
    _verbose_arg(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _verbose_arg(common)  # -v also after the command
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-iteration lines")

    def command(name: str, help: str):
        if only is not None and name != only:
            sub.add_parser(name, help=help, add_help=False)
            return _Unused()
        return sub.add_parser(name, parents=[common], help=help, description=help, formatter_class=_HelpFormatter)

    p = command("convert", "CSV/Parquet (user, item, value) rows -> interaction store")
    p.add_argument("inputs", nargs="+", help="input files (.csv, .csv.gz, .tsv, .dat, .parquet)")
    p.add_argument("store", help="output store (a directory, or an fsspec URL)")
    p.add_argument("--user-col", default=0, help="user column: name or 0-based position")
    p.add_argument("--item-col", default=1, help="item column: name or 0-based position")
    p.add_argument("--value-col", default=2, help="value column (play count, rating...): name or 0-based position")
    p.add_argument("--order-col", default=None,
                   help="numeric column ordering rows in time (timestamp); enables split --method leave_last_out "
                        "(default: none)")
    p.add_argument("--no-value", action="store_true", help="no value column: each row counts 1")
    p.add_argument("--delimiter", default=",", help="field delimiter (\\t for tab)")
    p.add_argument("--no-header", action="store_true", help="the files have no header line")
    p.add_argument("--id-type", choices=("auto", "int", "str"), default="auto",
                   help="auto: a column's ids are integers when every one of them is written as one (no leading "
                        "zeros, sign or spaces), else text, so 007 and 7 stay two ids; int: parse as integers "
                        "(007 and 7 are one id); str: always text")
    p.add_argument("--on-bad-lines", choices=("error", "skip"), default="error",
                   help="error: stop at the first bad row naming file, line and field; skip: count and drop")
    p.add_argument("--shard-nnz", type=int, default=None, help="entries per shard (default: from the memory budget)")
    p.add_argument("--row-block", type=int, default=4096, help="shard bounds align to this many rows")
    p.add_argument("--tmp-dir", default=None, help="where spill files go (default: beside the store)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (once the new one is complete)")
    p.add_argument("--item-names", default=None, metavar="FILE",
                   help="display names of the items: a file of id and name columns (see --names-*; default: none)")
    p.add_argument("--user-names", default=None, metavar="FILE", help="display names of the users (default: none)")
    _names_args(p, "--names-")
    _budget_arg(p)
    p.set_defaults(func=cmd_convert)

    p = command("names", "store display names of items (or users) in a store already converted, or a model")
    p.description = ("Read names files (an id column and a name column) and store a display name per id, "
                     "shown by recommend, similar, info, recommend --all and export; similar --item-name looks "
                     "items up by them. Replaces earlier names of that side in one step.")
    p.add_argument("store", help="an interaction store (or a model: its own copy of the ids)")
    p.add_argument("--items", default=None, metavar="FILE", help="names file of the items (default: none)")
    p.add_argument("--users", default=None, metavar="FILE", help="names file of the users (default: none)")
    _names_args(p, "--")
    _budget_arg(p)
    p.set_defaults(func=cmd_names)

    p = command("info", "shape, nnz, shards, density and the top users/items of a store; settings and progress of a model")
    p.add_argument("store", help="an interaction store or a model")
    p.add_argument("--top", type=int, default=5, help="how many of the most active users and items to list")
    p.set_defaults(func=cmd_info)

    p = command("generate", "synthetic power-law log: CSV (.csv/.csv.gz) or a store (.zarr)")
    p.add_argument("output", help="a .csv, .csv.gz or .zarr path")
    p.add_argument("--users", type=int, default=10_000, help="number of users")
    p.add_argument("--items", type=int, default=5_000, help="number of items")
    p.add_argument("--rows", type=int, default=200_000, help="number of interaction rows (duplicates are summed)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--clusters", type=int, default=20, help="taste clusters")
    p.add_argument("--item-exponent", type=float, default=0.9, help="power-law exponent of item popularity by rank")
    p.add_argument("--affinity", type=float, default=0.8, help="share of a user's rows drawn from its own taste")
    p.add_argument("--latent-dims", type=int, default=0,
                   help="0: each user in one cluster; else users and clusters are points in a taste space of this "
                        "dimension and users draw from the clusters near them (see --sharpness)")
    p.add_argument("--sharpness", type=float, default=10.0, help="with --latent-dims: how strongly users prefer "
                   "the clusters nearest their taste")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (once the new one is complete)")
    _budget_arg(p)
    p.set_defaults(func=cmd_generate)

    def cluster_args(q):
        q.add_argument("--threads", type=int, default=None, help="local task threads (default: all cores)")
        q.add_argument("--scheduler", default=None,
                       help="address of a dask-distributed scheduler, e.g. tcp://host:8786 (default: run locally)")
        q.add_argument("--workers", type=int, default=None,
                       help="start a LocalCluster of this many worker processes (default: threads in this process)")
        q.add_argument("--threads-per-worker", type=int, default=1, help="threads of each --workers process")

    p = command("train", "fit WALS on a store; resumes from the last checkpoint")
    p.add_argument("store", help="the interaction store to train on")
    p.add_argument("--model", default=None, help="factor store to write (default: <store>-model.zarr, or <store>-model-<factors>f-<tag>.zarr when that "
                        "holds a model of other settings)")
    _model_args(p)
    p.add_argument("--seed", type=int, default=None, help="seed of the initial factors (default: random)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the model store exists")
    p.add_argument("--no-loss", action="store_true", help="skip the per-iteration loss")
    p.add_argument("--dry-run", action="store_true",
                   help="print the half-sweep plans (tasks, resident or blocked, expected peak against the budget) "
                        "and exit without training or writing anything")
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_train)

    p = command("tune", "search the settings that score best on a validation store (Optuna, resumable)")
    p.description = ("Search WALS settings with Optuna's TPE sampler, stopping weak trials early; the "
                     "study is kept in SQLite (default <model>.tune.db) and resumes where it stopped.")
    p.add_argument("store", help="training store")
    p.add_argument("--validation", default=None,
                   help="validation store (e.g. from `wals-ooc split`); without it one is carved from the training store (default: carved)")
    p.add_argument("--validation-fraction", type=float, default=0.2, help="share carved for validation (default 0.2)")
    p.add_argument("--validation-method", choices=("random", "leave_one_out", "leave_last_out", "last_fraction"),
                   default="random", help="how validation is carved (default random)")
    p.add_argument("--validation-folds", type=int, default=None,
                   help="score each trial on the mean of this many carved validation folds (leave_last_out: each "
                        "user's latest, 2nd latest... entry; random: reseeded carves; default 3 for leave_last_out "
                        "and leave_one_out, else 1)")
    p.add_argument("--trials", type=int, default=40, help="the search's total number of trials (default 40)")
    p.add_argument("--metric", choices=("ndcg", "precision", "recall", "map", "auc"), default="ndcg",
                   help="what is maximised (default ndcg)")
    p.add_argument("-k", type=int, default=10, help="cut-off of the metric (default 10)")
    p.add_argument("--model", default=None, help="the final model (default <store>-model.zarr); the study goes beside it")
    p.add_argument("--study", default=None, help="SQLite file of the study (default <model>.tune.db)")
    p.add_argument("--study-name", default=None, help="study name inside the file (default wals-ooc)")
    p.add_argument("--workdir", default=None, help="where trial models go (default <model>.tune/)")
    p.add_argument("--final", action="store_true",
                   help="train --model with the best settings on train + validation (merged out of core)")
    p.add_argument("--final-store", default=None, help="train --model with the best settings on this store instead (default: none)")
    p.add_argument("--merged-store", default=None, help="where --final writes train + validation "
                                                          "(default <train>+<validation>.zarr)")
    _model_args(p)
    p.add_argument("--fix", nargs="+", choices=sorted(TUNE_FIXABLE), default=None,
                   help="settings not searched: they keep the values given (or their defaults)")
    p.add_argument("--confidence-forms", nargs="+", choices=("linear", "log", "constant"), default=["linear", "log"],
                   help="confidence forms searched (default linear log)")
    p.add_argument("--range", nargs=3, action="append", metavar=("NAME", "LOW", "HIGH"), type=str, default=None,
                   help="search range of weight, reg, alpha0 or nu (see README: Tuning); repeatable (default: the built-in ranges)")
    p.add_argument("--search-factors", nargs=2, type=int, metavar=("LOW", "HIGH"), default=None,
                   help="also search factors in this range (default: fixed --factors)")
    p.add_argument("--search-iterations", nargs=2, type=int, metavar=("LOW", "HIGH"), default=None,
                   help="also search iterations in this range (default: fixed --iterations)")
    p.add_argument("--startup-trials", type=int, default=None,
                   help="trials drawn at random before TPE models the scores, the first (default) settings "
                        "included (default: see README, Tuning)")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument("--eval-every", type=int, default=3, help="score trials every N iterations for pruning (default 3)")
    p.add_argument("--user-fraction", type=float, default=None, help="score a share of the validation users (default: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the factors and a carved split (default 0)")
    p.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds (default: no limit)")
    p.add_argument("--no-resume", action="store_true", help="start the study over (its earlier trials are removed)")
    p.add_argument("--no-keep-best", action="store_true", help="remove the best trial's model too")
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_tune)

    p = command("recommend", "top-N items for some users, or for all of them into a file")
    p.add_argument("model", help="a trained model (factor store)")
    p.add_argument("--users", nargs="*", default=None, metavar="ID", help="user ids to recommend for (default: none; give --users or --all)")
    p.add_argument("--all", action="store_true", help="every user, streamed to --output")
    p.add_argument("--output", default=None, help="where --all writes (default: <model>-top<N>.zarr, or "
                                                  "<model>-top<N> for parquet)")
    p.add_argument("--format", choices=("zarr", "parquet"), default="zarr", help="format of --all's output")
    p.add_argument("-n", type=int, default=10, help="recommendations per user")
    p.add_argument("--no-filter", action="store_true", help="keep already-liked items")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (once the new one is complete)")
    _index_args(p, "an index over the item factors (inner product)")
    _interactions_arg(p)
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_recommend)

    p = command("similar", "most similar items (or users) by cosine of factors")
    p.add_argument("model", help="a trained model (factor store)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--items", nargs="+", metavar="ID", help="item ids to find similar items for")
    group.add_argument("--users", nargs="+", metavar="ID", help="user ids to find similar users for")
    group.add_argument("--item-name", nargs="+", metavar="NAME",
                       help="item names to find similar items for: exact, else ignoring case (see `wals-ooc names`)")
    group.add_argument("--user-name", nargs="+", metavar="NAME", help="user names to find similar users for")
    p.add_argument("-n", type=int, default=10, help="similar items (or users) per query")
    p.add_argument("--filter-self", action="store_true", help="leave each query out of its own answer")
    _index_args(p, "a cosine index over the item (or user) factors")
    p.add_argument("--threads", type=int, default=None, help="local task threads (default: all cores)")
    _interactions_arg(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_similar)

    p = command("export", "factors with their original ids: parquet, npz or implicit's .npz")
    p.add_argument("model", help="a trained model (factor store)")
    p.add_argument("output", help="a directory (parquet) or NAME.npz (npz, implicit)")
    p.add_argument("--format", choices=("parquet", "npz", "implicit"), default="parquet",
                   help="parquet (one file per side), npz, or the .npz implicit's AlternatingLeastSquares.load reads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (once the new one is complete)")
    _budget_arg(p)
    p.set_defaults(func=cmd_export)

    p = command("index", "approximate-nearest-neighbour index (faiss) of a model's factors")
    p.add_argument("model", help="a trained model (factor store)")
    p.add_argument("--side", choices=("item", "user"), default="item", help="whose factors the index holds")
    p.add_argument("--metric", choices=("inner_product", "cosine"), default=None,
                   help="inner_product (recommend; default for items) or cosine (similar; default for users)")
    p.add_argument("--output", default=None, help="where to save it (default: MODEL-SIDE-METRIC.ann beside the model)")
    p.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw", help="graph (hnsw) or k-means cells (ivf)")
    p.add_argument("--hnsw-m", type=int, default=32, help="graph neighbours per node (hnsw)")
    p.add_argument("--ef-construction", type=int, default=80, help="candidate list while building (hnsw)")
    p.add_argument("--ef-search", type=int, default=None, help="candidate list while searching (hnsw; default 128)")
    p.add_argument("--nlist", type=int, default=None, help="k-means cells (ivf; default 4 sqrt(rows))")
    p.add_argument("--nprobe", type=int, default=None, help="cells searched per query (ivf; default 32)")
    p.add_argument("--max-fetch", type=int, default=1024,
                   help="most candidates fetched per query to make up for filtered items")
    p.add_argument("--candidates", type=int, default=None,
                   help="fewest candidates fetched per query and re-scored exactly, so near-ties rank as in the "
                        "exact answer (default: 64 for cosine, none for inner product; 0: none)")
    p.add_argument("--mips", choices=("native", "l2"), default="native",
                   help="inner_product: search it natively, or as L2 over rows augmented to a common norm "
                        "(measured worse than native with HNSW on every catalogue tried; see the README)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index (once the new one is complete)")
    p.add_argument("--threads", type=int, default=None, help="build threads (default: all cores)")
    _budget_arg(p)
    p.set_defaults(func=cmd_index)

    p = command("split", "per-user train/test split of a store")
    p.add_argument("store", help="the interaction store to split")
    p.add_argument("train", help="output store of the training entries")
    p.add_argument("test", help="output store of the held-out entries")
    p.add_argument("--method", choices=("random", "leave_one_out", "leave_last_out", "last_fraction"), default="random",
                   help="random share / one random entry / the latest entry / the latest share of each user "
                        "(the last two need a store converted with --order-col)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of each user's entries held out")
    p.add_argument("--min-train", type=int, default=1, help="entries each user keeps in training at least")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (once the new ones are complete)")
    _budget_arg(p)
    p.set_defaults(func=cmd_split)

    p = command("evaluate", "precision, recall, ndcg, MAP at k and AUC on a test store")
    p.add_argument("model", help="a trained model (factor store)")
    p.add_argument("test", help="the held-out store of a split (the model trained on its train side)")
    p.add_argument("-k", type=int, default=10, help="length of the recommendation list measured")
    p.add_argument("--user-fraction", type=float, default=None,
                   help="evaluate a seeded random share of the test users (default: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of --user-fraction's and --auc-fraction's samples")
    p.add_argument("--auc-fraction", type=float, default=None,
                   help="compute AUC (exactly) for a seeded random share of the evaluated users only, the costliest "
                        "metric at catalogue scale; the output's auc_users counts them (default: all of them)")
    p.add_argument("--no-auc", action="store_true", help="leave AUC out (top-K metrics only)")
    _interactions_arg(p)
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = command("report", "an HTML page to look at a model: loss, time, metrics at k, popularity, users")
    p.add_argument("model", help="a trained model (factor store)")
    p.add_argument("-o", "--output", required=True, help="the HTML file to write, e.g. report.html")
    p.add_argument("--test", default=None, help="held-out store for metrics at k = 1..--k-max (default: no metrics)")
    p.add_argument("--k-max", type=int, default=50, help="metrics at every k from 1 to this")
    p.add_argument("-n", type=int, default=10, help="recommendations per user shown and measured")
    p.add_argument("--sample-users", type=int, default=1000,
                   help="users whose recommendations measure popularity and coverage")
    p.add_argument("--show-users", type=int, default=4, help="users shown with their history and recommendations")
    p.add_argument("--user-fraction", type=float, default=None,
                   help="evaluate a seeded random share of the test users (default: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user samples")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _interactions_arg(p)
    cluster_args(p)
    _budget_arg(p)
    p.set_defaults(func=cmd_report)
    return parser


def _names_args(parser: argparse.ArgumentParser, prefix: str) -> None:
    """How names files are read: --names-id-col ... on convert, --id-col ... on names."""
    def dest(name: str) -> str | None:  # the same destinations for both spellings
        return f"names_{name}" if prefix == "--" else None

    parser.add_argument(f"{prefix}id-col", dest=dest("id_col"), metavar="COL", default="0",
                        help="id column of the names files: header name or 0-based position")
    parser.add_argument(f"{prefix}name-col", dest=dest("name_col"), metavar="COL", default="1",
                        help="name column of the names files: header name or 0-based position")
    parser.add_argument(f"{prefix}delimiter", dest=dest("delimiter"), metavar="CHAR", default="auto",
                        help="field delimiter of the names files (\\t for tab); auto: tab, comma, semicolon or "
                             "pipe, whichever the first line has most of")
    parser.add_argument(f"{prefix}encoding", dest=dest("encoding"), metavar="CODEC", default="utf-8",
                        help="text encoding of the names files (e.g. latin-1 for MovieLens' u.item)")
    parser.add_argument(f"{prefix}quote", dest=dest("quote"), metavar="CHAR", default="auto",
                        help="quote character, or none to read quotes as text; auto: none for tab-separated "
                             "files (Last.fm's artists.dat), '\"' otherwise")
    parser.add_argument(f"{prefix}no-header", dest=dest("no_header"), action="store_true",
                        help="the names files have no header line")


def _index_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--index", nargs="?", const=True, default=None, metavar="PATH",
                        help=f"answer approximately from {what} built by `wals-ooc index` (default: the one beside "
                             "the model); filtering stays exact")
    parser.add_argument("--ef-search", type=int, default=None, help="with --index (hnsw): search candidate list (default: the index's own, 128)")
    parser.add_argument("--nprobe", type=int, default=None, help="with --index (ivf): cells searched (default: the index's own, 32)")


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

    from .errors import StorageError, WalsError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv) or "")  # no command named: the commands' options are not needed
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
        return 1 if isinstance(exc, StorageError) else 2  # the storage failed, not the user
    except (ValueError, KeyError) as exc:  # argument checks of the API that predate errors.py
        if verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prefix} {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`wals-ooc info X | head`): stop quietly, as other tools do
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 141
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
