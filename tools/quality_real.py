"""Tuned wals-ooc against tuned implicit on real data, same search budget, same evaluator.

Data (from ../shared/data, converted once into --workdir):
  lastfm   Last.fm HetRec 2k play counts; test: a random 20% of each user's artists (seed 1)
  ml100k   MovieLens 100K, every rating an interaction (value 1); test: each user's latest rating

For each seed, a validation split is carved from the training store (Last.fm: random 20% with
that seed; MovieLens: the latest remaining rating), and both libraries are tuned on it with the
same search: Optuna's TPE sampler (same seed, multivariate, the same start-up trials: by default
wals_ooc.tune's, the first trial and one random, --startup-trials to change it for both), the
same median pruner fed every 3 iterations, the same number of trials, 15 iterations each, and the
same first trial (each library's own defaults).

  wals-ooc  ``wals_ooc.tune`` over confidence (linear, log), alpha, alpha0, nu, regularization, factors
  implicit  ``implicit.cpu.als.AlternatingLeastSquares`` over factors, regularization and alpha (what
            it has), on the same scales: alpha as weight / mean value with weight log-uniform in
            [0.1, 300], regularization log-uniform in [1e-3, 1e3], factors log-uniform in [16, 128]

Then each library's best settings train a final model on the whole training store (train +
validation), and both final models are scored on the test store by one evaluator, wals-ooc's
(``wals_ooc.evaluate``: implicit's factors are written into a factor store for it): ndcg@10,
recall@10 and precision@10 (hits / 10). wals-ooc with its defaults and no tuning is scored too.
Everything is the mean over the seeds. How far the tuned/tuned ndcg ratio can be trusted is shown
by a paired bootstrap over the test users (both libraries' per-user ndcg@10, averaged over the
seeds, resampled together): with one held-out rating for each of MovieLens's 943 users the 95%
interval is about +-7% wide.

Each trial is scored on the mean of --validation-folds folds for both libraries (default
wals_ooc.tune's: 3 for MovieLens's leave-last-out, where fold j holds out each user's (j+1)-th
latest rating and trains on the ratings before it; 1 for Last.fm's random carve). Pruning is
judged on fold 0, so a pruned trial costs the same with any number of folds.

--ml100k-validation last_fraction carves each user's latest 20% of training ratings instead of
the latest one (a less noisy validation; the test split is unchanged; the same for both).

    python tools/quality_real.py                       # both data sets, 40 trials, seeds 0 1 2
    python tools/quality_real.py --datasets ml100k --trials 10 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "data")
K = 10
SHOWN = ("ndcg", "recall", "precision")
FACTORS = (16, 128)
ITERATIONS = 15
EVAL_EVERY = 3


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _readable(location: str) -> bool:
    """A finished store this wals-ooc reads (one of an older format is written again)."""
    import wals_ooc
    from wals_ooc.errors import WalsError

    try:
        wals_ooc.open_store(location)
        return True
    except (WalsError, OSError):
        return False


def prepare(name: str, workdir: str):
    """Convert and split a data set once; returns (train path, test path, validation method)."""
    import wals_ooc

    full = os.path.join(workdir, f"{name}.zarr")
    train, test = os.path.join(workdir, f"{name}-train.zarr"), os.path.join(workdir, f"{name}-test.zarr")
    done = all(_readable(p) for p in (full, train, test))
    if name == "lastfm":
        source = os.path.join(SHARED, "hetrec2011-lastfm-2k", "user_artists.dat")
        convert = dict(user_col="userID", item_col="artistID", value_col="weight", delimiter="\t")
        split = dict(method="random", test_fraction=0.2, seed=1)
        validation = "random"
    else:
        source = os.path.join(SHARED, "ml-100k", "u.data")
        convert = dict(user_col=0, item_col=1, value_col=None, order_col=3, delimiter="\t", header=False)
        split = dict(method="leave_last_out", seed=1)
        validation = "leave_last_out"
    if not os.path.exists(source):
        sys.exit(f"{source} is missing: the real data sets live in ../shared/data")
    if not done:
        wals_ooc.convert([source], full, overwrite=True, progress=False, **convert)
        wals_ooc.split(full, train, test, overwrite=True, progress=False, **split)
    return train, test, validation


def carve_validation(train: str, method: str, seed: int, workdir: str, name: str, fraction: float = 0.2):
    import wals_ooc

    tag = "" if (method, fraction) in (("leave_last_out", 0.2), ("random", 0.2)) else f"-{method}{fraction:g}"
    part, validation = (os.path.join(workdir, f"{name}-s{seed}{tag}-{p}.zarr") for p in ("part", "validation"))
    if not all(_readable(p) for p in (part, validation)):
        wals_ooc.split(train, part, validation, method=method, test_fraction=fraction, seed=seed, overwrite=True,
                       progress=False)
    return part, validation


def to_csr(store):
    """A small store as scipy CSR (the tool's data fit in memory; implicit needs it so)."""
    import scipy.sparse as sp

    shard = store.rows("user", 0, store.n_users)
    return sp.csr_matrix((shard.values, shard.indices, shard.indptr), shape=store.shape)


# ---------------------------------------------------------------------------------------------
# scoring implicit's factors with wals-ooc's evaluator
# ---------------------------------------------------------------------------------------------


def factor_store(location: str, users: np.ndarray, items: np.ndarray, store, settings: dict):
    """implicit's factors in a wals-ooc factor store of ``store``, so one evaluator scores both."""
    from wals_ooc.config import WALSConfig
    from wals_ooc.store.lifecycle import output_store
    from wals_ooc.train.factors import MODEL_FORMAT_VERSION, MODEL_KIND, Checkpoint, FactorStore

    config = WALSConfig(factors=users.shape[1], regularization=settings["regularization"], alpha=settings["alpha"],
                        confidence="linear", iterations=ITERATIONS, random_state=0)
    with output_store(location, MODEL_KIND, version=MODEL_FORMAT_VERSION, overwrite=True,
                      inputs=[store.location]) as out:
        model = FactorStore.create(out.group, out.location, config, store, seed=0)
        model.slot("user", 0)[:] = users.astype(np.float32)  # the tool's small data: whole arrays are fine
        model.slot("item", 0)[:] = items.astype(np.float32)
        model.commit(Checkpoint(step=2 * ITERATIONS, slots={"user": 0, "item": 0}), complete=True,
                     iterations_done=ITERATIONS)
    return FactorStore.open(location)


def test_in_train_numbering(train_store, test_store):
    """The test store as CSR in the training store's row and column numbering (matched by original
    id; pairs of users or items the training store lacks dropped, as the evaluator drops them)."""
    import scipy.sparse as sp

    test = to_csr(test_store).tocoo()
    users = train_store.index_of("user", test_store.ids_of("user", np.arange(test_store.n_users), as_arrow=True),
                                 missing="mark")
    items = train_store.index_of("item", test_store.ids_of("item", np.arange(test_store.n_items), as_arrow=True),
                                 missing="mark")
    keep = (users[test.row] >= 0) & (items[test.col] >= 0)
    return sp.csr_matrix((test.data[keep], (users[test.row[keep]], items[test.col[keep]])), shape=train_store.shape)


def per_user_ndcg(user_factors, item_factors, train_csr, test_csr) -> np.ndarray:
    """ndcg@K of every test user (rows of test_csr with entries, ascending), training items
    excluded: the evaluator's figure per user, so its mean is the evaluator's ndcg (checked)."""
    users = np.flatnonzero(np.diff(test_csr.indptr))
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    out = np.zeros(len(users))
    for lo in range(0, len(users), 256):
        rows = users[lo : lo + 256]
        scores = np.asarray(user_factors[rows], np.float64) @ np.asarray(item_factors, np.float64).T
        seen = train_csr[rows]
        scores[np.repeat(np.arange(len(rows)), np.diff(seen.indptr)), seen.indices] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        for j, u in enumerate(rows):
            held = test_csr.indices[test_csr.indptr[u] : test_csr.indptr[u + 1]]
            hits = np.isin(top[j], held)
            out[lo + j] = float(discounts[hits].sum() / discounts[: min(K, len(held))].sum())
    return out


def paired_ratio_interval(ours: list[np.ndarray], theirs: list[np.ndarray], draws: int = 2000, seed: int = 0):
    """95% interval of mean(ours) / mean(theirs) over the seeds, resampling test users with
    replacement (the same users for both and for every seed: a paired bootstrap)."""
    ours, theirs = np.mean(ours, axis=0), np.mean(theirs, axis=0)
    picks = np.random.default_rng(seed).integers(0, len(ours), (draws, len(ours)))
    ratios = ours[picks].mean(axis=1) / theirs[picks].mean(axis=1)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def score(model_store, train_store, test_store) -> dict:
    from wals_ooc.evaluate.metrics import evaluate

    metrics = evaluate(model_store, train_store, test_store, k=K, threads=2, auc=False)
    return {m: float(metrics[f"{m}@{K}"]) for m in SHOWN}


def implicit_model(settings: dict, seed: int):
    from implicit.cpu.als import AlternatingLeastSquares

    return AlternatingLeastSquares(factors=int(settings["factors"]), regularization=settings["regularization"],
                                   alpha=settings["alpha"], iterations=ITERATIONS, use_cg=True, num_threads=2,
                                   random_state=seed, calculate_training_loss=False)


def tune_implicit(folds: list, trials: int, seed: int, scratch: str, startup: int | None = None) -> tuple[dict, float, float]:
    """The same TPE search and pruner as wals_ooc.tune, over implicit's own settings, on the same
    validation folds (the (train, validation) stores wals_ooc.tune carved): pruning judged on fold
    0, a finished trial scored on the mean over the folds."""
    import optuna
    from threadpoolctl import threadpool_limits

    import wals_ooc

    stores = [(wals_ooc.open_store(part), wals_ooc.open_store(validation)) for part, validation in folds]
    matrices = [to_csr(part) for part, _ in stores]
    train_store, validation_store = stores[0]
    user_items = matrices[0]
    mean_value = float(user_items.data.mean())
    location = os.path.join(scratch, "implicit-trial.zarr")

    def settings_of(trial) -> dict:
        weight = trial.suggest_float("weight", 0.1, 300.0, log=True)
        return {"factors": trial.suggest_int("factors", *FACTORS, log=True),
                "regularization": trial.suggest_float("reg", 1e-3, 1e3, log=True), "alpha": weight / mean_value}

    def validation_score(model, fold: int = 0) -> float:
        part, validation = stores[fold]
        store = factor_store(location, model.user_factors, model.item_factors, part,
                             {"regularization": model.regularization, "alpha": model.alpha})
        return score(store, part, validation)["ndcg"]

    def objective(trial) -> float:
        settings = settings_of(trial)
        model = implicit_model(settings, seed)

        def after_iteration(iteration, elapsed, loss):
            done = iteration + 1
            if done % EVAL_EVERY == 0 and done < ITERATIONS:
                trial.report(validation_score(model), done)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        model.fit(user_items, show_progress=False, callback=after_iteration)
        scores = [validation_score(model)]
        for fold in range(1, len(stores)):
            model = implicit_model(settings, seed)
            model.fit(matrices[fold], show_progress=False)
            scores.append(validation_score(model, fold))
        return float(sum(scores) / len(scores))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from wals_ooc.tuning.search import default_startup_trials, sampler_of

    study = optuna.create_study(
        direction="maximize",
        sampler=sampler_of(seed, default_startup_trials(trials) if startup is None else startup),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, trials // 8)), n_warmup_steps=EVAL_EVERY + 1),
    )
    # implicit's defaults first, as wals_ooc.tune starts from wals-ooc's
    study.enqueue_trial({"factors": 100, "reg": 0.01, "weight": 1.0 * mean_value})
    started = time.perf_counter()
    with threadpool_limits(1, "blas"):
        study.optimize(objective, n_trials=trials)
    seconds = time.perf_counter() - started
    best = study.best_trial
    weight = best.params["weight"]
    return ({"factors": best.params["factors"], "regularization": best.params["reg"], "alpha": weight / mean_value},
            best.value, seconds)


# ---------------------------------------------------------------------------------------------
# one data set, one seed
# ---------------------------------------------------------------------------------------------


def run_seed(name: str, train: str, test: str, method: str, seed: int, trials: int, workdir: str,
             fraction: float = 0.2, folds: int | None = None, startup: int | None = None) -> dict:
    import wals_ooc
    from threadpoolctl import threadpool_limits

    train_store, test_store = wals_ooc.open_store(train), wals_ooc.open_store(test)
    scratch = tempfile.mkdtemp(prefix=f"{name}-s{seed}-", dir=workdir)
    out: dict = {"seed": seed}

    # wals_ooc.tune carves the validation fold(s) from train (seeded); implicit is tuned on the same stores
    started = time.perf_counter()
    result = wals_ooc.tune(
        train, None, n_trials=trials, space={"factors": FACTORS}, base={"iterations": ITERATIONS},
        validation_method=method, validation_fraction=fraction, validation_folds=folds, startup_trials=startup,
        model=os.path.join(scratch, "wals-final.zarr"), final=True, seed=seed, resume=False, threads=2,
        progress=False, keep_best=False,
    )
    out["wals_search_seconds"] = time.perf_counter() - started
    out["folds"] = len(result.folds)
    out["wals_best"] = result.best_params
    out["wals_validation"] = result.best_value
    out["wals_trials"] = result.counts()
    final = wals_ooc.load(result.final_model, threads=2)
    out["wals"] = score(final.factors_store, train_store, test_store)
    train_csr, test_csr = to_csr(train_store), test_in_train_numbering(train_store, test_store)
    out["wals_per_user"] = per_user_ndcg(final.factors_store.current("user")[:], final.factors_store.current("item")[:],
                                         train_csr, test_csr)

    defaults = wals_ooc.WALS(random_state=seed, threads=2)
    defaults.fit(train_store, os.path.join(scratch, "wals-defaults.zarr"), resume=False, progress=False)
    out["wals_defaults"] = score(defaults.factors_store, train_store, test_store)

    best, value, seconds = tune_implicit(result.folds, trials, seed, scratch, startup)
    out["implicit_search_seconds"] = seconds
    out["implicit_best"] = best
    out["implicit_validation"] = value
    user_items = to_csr(train_store)
    with threadpool_limits(1, "blas"):
        for key, settings in (("implicit", best), ("implicit_defaults", {"factors": 100, "regularization": 0.01, "alpha": 1.0})):
            model = implicit_model(settings, seed)
            model.fit(user_items, show_progress=False)
            store = factor_store(os.path.join(scratch, f"{key}.zarr"), model.user_factors, model.item_factors,
                                 train_store, settings)
            out[key] = score(store, train_store, test_store)
            if key == "implicit":
                out["implicit_per_user"] = per_user_ndcg(model.user_factors, model.item_factors, train_csr, test_csr)
    for key in ("wals", "implicit"):  # the per-user figures are the evaluator's, or the interval means nothing
        if abs(out[f"{key}_per_user"].mean() - out[key]["ndcg"]) > 1e-4:
            sys.exit(f"{name} seed {seed}: per-user ndcg of {key} averages {out[f'{key}_per_user'].mean():.6f}, "
                     f"the evaluator says {out[key]['ndcg']:.6f}")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return out


def mean_of(runs: list[dict], key: str) -> dict:
    return {m: float(np.mean([r[key][m] for r in runs])) for m in SHOWN}


def report(name: str, runs: list[dict]) -> None:
    print(f"\n{name}: mean of {len(runs)} seed(s), test split, wals-ooc's evaluator, K={K}; "
          f"validation folds per trial: {runs[0].get('folds', 1)}")
    rows = [("wals-ooc tuned", "wals"), ("implicit tuned", "implicit"), ("wals-ooc defaults", "wals_defaults"),
            ("implicit defaults", "implicit_defaults")]
    means = {key: mean_of(runs, key) for _, key in rows}
    print("  " + " " * 18 + "".join(f"{m + '@10':>14s}" for m in SHOWN))
    for label, key in rows:
        print(f"  {label:18s}" + "".join(f"{means[key][m]:14.4f}" for m in SHOWN))
    print(f"  {'ratio tuned wals-ooc / tuned implicit':40s}" + "".join(f"{means['wals'][m] / means['implicit'][m]:8.3f}x" for m in SHOWN))
    print(f"  {'ratio wals-ooc defaults / tuned':40s}" + "".join(f"{means['wals_defaults'][m] / means['wals'][m]:8.3f}x" for m in SHOWN))
    per_seed = ", ".join(f"seed {r['seed']}: {r['wals']['ndcg'] / r['implicit']['ndcg']:.3f}x" for r in runs)
    print(f"  ndcg ratio tuned/tuned per seed: {per_seed}")
    low, high = paired_ratio_interval([r["wals_per_user"] for r in runs], [r["implicit_per_user"] for r in runs])
    print(f"  ndcg ratio tuned/tuned, 95% interval over test users (paired bootstrap): [{low:.3f}, {high:.3f}]")
    print(f"  search seconds (mean): wals-ooc {np.mean([r['wals_search_seconds'] for r in runs]):.1f} "
          f"(incl. final model), implicit {np.mean([r['implicit_search_seconds'] for r in runs]):.1f}")
    for r in runs:
        print(f"  seed {r['seed']} wals-ooc best {json.dumps(_rounded(r['wals_best']))} "
              f"validation {r['wals_validation']:.4f} trials {r['wals_trials']}")
        print(f"  seed {r['seed']} implicit best {json.dumps(_rounded(r['implicit_best']))} validation {r['implicit_validation']:.4f}")


def _rounded(settings: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in settings.items()}


def warm_numba_cache() -> None:
    """Compile wals-ooc's kernels into numba's on-disk cache in a separate process first, so this
    process loads them from it. Freshly compiled fastmath kernels and the same kernels loaded from
    the cache differ in the last bits (numba optimises the two paths differently), so a run on a
    cold cache (the first after a kernel changed) would otherwise not repeat bit for bit."""
    import subprocess

    subprocess.run([sys.executable, "-c", "from wals_ooc.kernels.warm import warm_training_kernels as t, "
                    "warm_serving_kernels as s; t('float32'); s()"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=("lastfm", "ml100k"), default=["lastfm", "ml100k"])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wals-quality-real"))
    parser.add_argument("--json", default=None, help="also write every run's figures to this file")
    parser.add_argument("--ml100k-validation", choices=("leave_last_out", "last_fraction"), default="leave_last_out",
                        help="how MovieLens's validation split is carved from train (for both libraries): each "
                             "user's latest rating, or each user's latest --validation-fraction of ratings")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of each user's training entries held out for validation (random, last_fraction)")
    parser.add_argument("--validation-folds", type=int, default=None,
                        help="validation folds a trial is scored on, for both libraries (default: wals_ooc.tune's: "
                             "3 for leave_last_out, 1 for random)")
    parser.add_argument("--startup-trials", type=int, default=None,
                        help="random start-up trials of TPE, for both libraries (default: wals_ooc.tune's)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    warm_numba_cache()
    everything = {}
    for name in args.datasets:
        train, test, method = prepare(name, args.workdir)
        if name == "ml100k":
            method = args.ml100k_validation
        print(f"{name}: validation carved from train by {method}"
              + ("" if method == "leave_last_out" else f" (fraction {args.validation_fraction:g})"), file=sys.stderr)
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(name, train, test, method, seed, args.trials, args.workdir, args.validation_fraction,
                                 args.validation_folds, args.startup_trials))
            print(f"{name} seed {seed}: wals-ooc {runs[-1]['wals']}, implicit {runs[-1]['implicit']}", file=sys.stderr, flush=True)
        everything[name] = runs
        report(name, runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1, default=lambda a: a.tolist())


if __name__ == "__main__":
    main()
