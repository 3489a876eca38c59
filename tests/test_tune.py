"""The settings search on real stores, real SQLite and real schedulers: it finds a better setting,
survives a kill -9 and resumes with its finished trials, stays under the memory budget, cleans up
its trial stores, refuses what is not its own, and the command line prints the table."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import wals_ooc
from wals_ooc import WALS, open_store
from wals_ooc.errors import DataMismatchError, PathError, StoreLockedError
from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store
from wals_ooc.tuning.study import StudyPlace, locked_workdir

from .conftest import run_python

TINY = {"factors": 8, "iterations": 4}


@pytest.fixture(scope="module")
def split_stores(tmp_path_factory):
    """A clustered 300 x 200 store split into train and validation (20% of each user)."""
    root = tmp_path_factory.mktemp("tune")
    full = str(root / "full.zarr")
    write_synthetic_store(SyntheticSpec(n_users=300, n_items=200, rows=6000, clusters=6, seed=5), full,
                          row_block=64, progress=False)
    train, validation = str(root / "train.zarr"), str(root / "validation.zarr")
    wals_ooc.split(full, train, validation, test_fraction=0.2, seed=3, progress=False)
    return full, train, validation


def _entries(store) -> dict:
    store = open_store(store) if isinstance(store, str) else store
    shard = store.rows("user", 0, store.n_users)
    users, items = store.ids("user"), store.ids("item")
    rows = np.repeat(np.arange(store.n_users), np.diff(shard.indptr))
    return {(users[r], items[c]): float(v) for r, c, v in zip(rows, shard.indices, shard.values)}


def _validation_ndcg(train, validation, location, **settings) -> float:
    model = WALS(**{**TINY, "random_state": 0, **settings}, threads=2)
    model.fit(train, location, resume=False, progress=False)
    return model.evaluate(validation, k=10)["ndcg@10"]


def test_search_finds_a_known_better_setting_and_keeps_only_the_best_trial_store(split_stores, tmp_path):
    """Base settings with a crushing penalty score far below a sane one; the search finds a sane one."""
    _, train, validation = split_stores
    bad = dict(regularization=300.0, alpha=1.0, confidence="linear", alpha0=1.0, nu=0.0)
    bad_score = _validation_ndcg(train, validation, tmp_path / "bad.zarr", **bad)
    good_score = _validation_ndcg(train, validation, tmp_path / "good.zarr", **{**bad, "regularization": 0.1})
    assert good_score > 1.5 * bad_score  # the problem has a known better setting

    seen = []
    result = wals_ooc.tune(train, validation, n_trials=8, base={**TINY, **bad}, space={"confidence": None, "nu": None},
                           model=tmp_path / "m.zarr", threads=2, progress=False, callback=seen.append)
    assert [r.number for r in seen] == list(range(8))
    first = result.trials[0]
    assert first.settings["regularization"] == pytest.approx(300.0)  # the base settings are tried first
    assert first.value == pytest.approx(bad_score, abs=1e-9)
    assert result.best_value >= 0.95 * good_score
    assert result.best_params["regularization"] < 30
    assert result.best_params["confidence"] == "linear" and result.best_params["nu"] == 0.0  # not searched
    # the study is a real SQLite file beside the model; only the best trial's model is kept
    assert result.study == str(tmp_path / "m.tune.db")
    with sqlite3.connect(result.study) as conn:
        assert conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 8
    assert sorted(os.listdir(tmp_path / "m.tune")) == [".lock", f"trial-{result.best_trial:05d}.zarr", "tune.json"]
    best = wals_ooc.load(result.best_model)
    assert best.evaluate(validation, k=10)["ndcg@10"] == pytest.approx(result.best_value, abs=1e-9)
    assert "*" in result.table().splitlines()[result.best_trial + 1]
    # asking again for the same budget runs nothing and gives the same answer
    again = wals_ooc.tune(train, validation, n_trials=8, base={**TINY, **bad}, space={"confidence": None, "nu": None},
                          model=tmp_path / "m.zarr", threads=2, progress=False)
    assert again.best_trial == result.best_trial and len(again.trials) == 8


def test_killed_search_resumes_with_its_finished_trials(split_stores, tmp_path):
    """SIGKILL a child process in the middle of trial 3; the resumed search keeps trials 0-2 as they
    were, runs trial 3's point again, and ends with the budget's number of finished trials."""
    _, train, validation = split_stores
    model = tmp_path / "m.zarr"
    args = dict(n_trials=5, base=TINY, model=str(model), threads=1, progress=False, prune=False)
    code = textwrap.dedent(f"""
        import wals_ooc
        wals_ooc.tune({train!r}, {validation!r}, **{args!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    running = tmp_path / "m.tune" / "trial-00003.zarr"
    deadline = time.monotonic() + 120
    while not (running / "user").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert child.poll() is None, child.stderr.read().decode()
    child.send_signal(signal.SIGKILL)
    child.wait()

    import optuna

    study = optuna.load_study(study_name="wals-ooc", storage=f"sqlite:///{tmp_path / 'm.tune.db'}")
    before = {t.number: (t.state.name, t.value, t.params) for t in study.get_trials()}
    assert [before[n][0] for n in range(3)] == ["COMPLETE"] * 3 and before[3][0] == "RUNNING"

    result = wals_ooc.tune(train, validation, **args)
    states = {r.number: r for r in result.trials}
    for n in range(3):  # finished trials are kept as they were
        assert (states[n].state.upper(), states[n].value) == before[n][:2]
    assert states[3].state == "failed"
    retry = [r for r in result.trials if r.retry_of == 3]
    assert len(retry) == 1 and retry[0].state == "complete"
    retried = study.get_trials()[retry[0].number]
    assert retried.params == before[3][2]  # the cut-off point is trained again
    assert sum(r.state in ("complete", "pruned") for r in result.trials) == 5
    # the killed trial's half-made store, its lock file and any unfinished build are gone
    assert sorted(n for n in os.listdir(tmp_path / "m.tune") if "trial-" in n) == [
        f"trial-{result.best_trial:05d}.zarr"]
    assert result.best_model == str(tmp_path / "m.tune" / f"trial-{result.best_trial:05d}.zarr")
    assert wals_ooc.load(result.best_model).evaluate(validation, k=10)["ndcg@10"] == pytest.approx(result.best_value)


def test_search_stays_under_the_memory_budget_and_prunes(split_stores, tmp_path):
    """A whole search (training, scoring, pruning, a merged store and the final model) in a fresh
    process whose budget is its start-up size plus 160 MB: peak RSS stays under it."""
    _, train, validation = split_stores
    code = textwrap.dedent(f"""
        import json, wals_ooc
        from wals_ooc.memory import MemoryBudget, current_rss, peak_rss
        from wals_ooc.kernels.warm import warm_training_kernels, warm_serving_kernels
        import optuna
        warm_training_kernels(); warm_serving_kernels(); MemoryBudget.start(None)
        budget = current_rss() + 160 * 2**20
        result = wals_ooc.tune({train!r}, {validation!r}, n_trials=8, base={{"factors": 8, "iterations": 6}},
                               model={str(tmp_path / "final.zarr")!r}, final=True, memory_budget=budget,
                               threads=2, progress=False, eval_every=2)
        print(json.dumps({{"budget": budget, "peak": peak_rss(), "counts": result.counts(),
                          "final": result.final_model, "merged": result.final_store}}))
    """)
    done = run_python(code, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["peak"] <= report["budget"], report
    assert report["counts"].get("pruned", 0) >= 1, report  # the pruner stopped weak trials
    assert sum(report["counts"].values()) == 8
    # the final model was trained on train + validation, merged out of core
    merged = open_store(report["merged"])
    assert _entries(merged) == {**_entries(train), **_entries(validation)}
    assert wals_ooc.load(report["final"]).interactions.location == report["merged"]

    too_small = run_python(textwrap.dedent(f"""
        import wals_ooc
        from wals_ooc.errors import MemoryBudgetError
        try:
            wals_ooc.tune({train!r}, {validation!r}, n_trials=2, model={str(tmp_path / "small.zarr")!r},
                          memory_budget="100MB", progress=False)
        except MemoryBudgetError as exc:
            print("refused:", exc)
    """))
    assert "refused: memory budget" in too_small.stdout, too_small.stderr


def test_search_with_a_distributed_client(split_stores, tmp_path, cluster):
    _, train, validation = split_stores
    result = wals_ooc.tune(train, validation, n_trials=2, base=TINY, model=tmp_path / "m.zarr", client=cluster,
                           progress=False)
    local = wals_ooc.tune(train, validation, n_trials=2, base=TINY, model=tmp_path / "l.zarr", threads=2,
                          progress=False)
    assert [r.value for r in result.trials] == pytest.approx([r.value for r in local.trials], abs=1e-6)


def test_carved_validation_and_final_model_on_the_whole_store(split_stores, tmp_path):
    full, _, _ = split_stores
    result = wals_ooc.tune(full, n_trials=2, base=TINY, model=tmp_path / "m.zarr", final=True, threads=2,
                           progress=False, prune=False)
    carved = [open_store(str(tmp_path / "m.tune" / name)) for name in ("train.zarr", "validation.zarr")]
    assert {**_entries(carved[0]), **_entries(carved[1])} == _entries(full)
    assert result.final_store == full
    final = wals_ooc.load(result.final_model)
    assert final.config.alpha == pytest.approx(result.best_params["alpha"])
    assert len(final.loss_history) == TINY["iterations"]


def test_refuses_what_is_not_its_own(split_stores, tmp_path):
    _, train, validation = split_stores
    other_db = tmp_path / "notes.db"
    with sqlite3.connect(other_db) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = other_db.read_bytes()
    with pytest.raises(PathError, match="something else"):
        wals_ooc.tune(train, validation, n_trials=1, base=TINY, study=other_db, progress=False)
    assert other_db.read_bytes() == before
    foreign = tmp_path / "mine.tune"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not yours")
    with pytest.raises(PathError, match="not a wals-ooc tuning directory"):
        wals_ooc.tune(train, validation, n_trials=1, base=TINY, model=tmp_path / "mine.zarr", progress=False)
    assert (foreign / "keep.txt").read_text() == "not yours"

    wals_ooc.tune(train, validation, n_trials=1, base=TINY, model=tmp_path / "m.zarr", threads=2, progress=False)
    with pytest.raises(DataMismatchError, match="other validation data"):  # same study, other data
        wals_ooc.tune(train, train, n_trials=2, base=TINY, model=tmp_path / "m.zarr", progress=False)
    place = StudyPlace.beside(str(tmp_path / "m.zarr"))
    with open(os.path.join(place.workdir, "tune.json")) as f:
        recorded = json.load(f)
    with locked_workdir(place, recorded):  # as if another search held the study
        with pytest.raises(StoreLockedError):
            wals_ooc.tune(train, validation, n_trials=2, base=TINY, model=tmp_path / "m.zarr", progress=False)
    # the outputs of the end are checked before the search: nothing is run, nothing written
    (tmp_path / "report.txt").write_text("mine")
    with pytest.raises(PathError, match="is a file, not a wals-ooc store"):
        wals_ooc.tune(train, validation, n_trials=1, base=TINY, model=tmp_path / "report.txt", final=True,
                      progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(PathError, match="merged store .* is a directory that is not a wals-ooc store"):
        wals_ooc.tune(train, validation, n_trials=1, base=TINY, model=tmp_path / "n.zarr", final=True,
                      merged_store=tmp_path / "notes", progress=False)
    with pytest.raises(PathError, match="inside the store"):
        wals_ooc.tune(train, validation, n_trials=1, base=TINY, model=os.path.join(train, "m.zarr"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("report", "n.", "notes")) and p.name != "notes.db") == [
        "notes", "report.txt"]
    assert os.listdir(tmp_path / "notes") == ["a.txt"] and not os.path.exists(os.path.join(train, "m.tune"))
    # a final model path holding another model is never overwritten
    WALS(**TINY, random_state=1).fit(train, tmp_path / "taken.zarr", progress=False)
    with pytest.raises(PathError, match="other settings or data"):
        wals_ooc.tune(train, validation, n_trials=1, base={**TINY, "regularization": 5.0}, model=tmp_path / "taken.zarr",
                      final=train, progress=False)


def test_cli_prints_the_table_and_the_best_settings(split_stores, tmp_path):
    _, train, validation = split_stores
    command = [sys.executable, "-m", "wals_ooc.cli", "tune", train, "--validation", validation, "--trials", "3",
               "--factors", "8", "--iterations", "4", "--model", str(tmp_path / "m.zarr"), "--threads", "2",
               "--fix", "nu", "--range", "reg", "0.01", "10"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["trial", "state", "ndcg@10"]
    assert [line.split()[0].rstrip("*") for line in lines[1:4]] == ["0", "1", "2"]
    assert all(line.split()[1] in ("complete", "pruned") for line in lines[1:4])
    assert "trial 2 " in done.stderr  # progress, one line per trial
    summary = json.loads(lines[-1])
    assert sum(summary["trials"].values()) == 3 and set(summary["trials"]) <= {"complete", "pruned"}
    assert summary["best_params"]["nu"] == 0.0  # fixed
    assert any(line.strip().startswith("wals-ooc train STORE --confidence") for line in lines)
    # a typo in a range is one clear line, not a traceback
    bad = subprocess.run(command[:-4] + ["--range", "alpha", "1", "2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("wals-ooc tune: error: unknown search settings ['alpha']")


def test_merge_of_disjoint_stores_equals_their_union_and_keeps_order(tmp_path):
    csv = tmp_path / "log.csv"
    rng = np.random.default_rng(0)
    rows = [f"u{u:02d},i{i:02d},{c},{t}" for u, i, c, t in zip(rng.integers(0, 30, 400), rng.integers(0, 40, 400),
                                                               rng.integers(1, 5, 400), rng.permutation(400))]
    csv.write_text("user,item,count,time\n" + "\n".join(rows) + "\n")
    full = tmp_path / "full.zarr"
    wals_ooc.convert([csv], full, user_col="user", item_col="item", value_col="count", order_col="time", progress=False)
    wals_ooc.split(full, tmp_path / "a.zarr", tmp_path / "b.zarr", method="leave_last_out", progress=False)
    merged = tmp_path / "merged.zarr"
    wals_ooc.merge([tmp_path / "a.zarr", tmp_path / "b.zarr"], merged, progress=False)
    got, want = open_store(str(merged)), open_store(str(full))
    assert _entries(got) == _entries(want) and got.has_order
    assert np.array_equal(got.rows("user", 0, got.n_users, with_order=True).order,
                          want.rows("user", 0, want.n_users, with_order=True).order)


def test_a_model_trained_again_at_the_same_path_is_scored_afresh(split_stores, tmp_path):
    """The serving cache of item factors must not hand out the previous model's factors."""
    _, train, validation = split_stores
    location = tmp_path / "same.zarr"
    first = _validation_ndcg(train, validation, location, regularization=0.1)
    second = _validation_ndcg(train, validation, location, regularization=300.0)
    fresh = _validation_ndcg(train, validation, tmp_path / "other.zarr", regularization=300.0)
    assert second == pytest.approx(fresh, abs=1e-12) and second != pytest.approx(first, abs=1e-6)


def test_leave_last_out_folds_roll_back_one_entry_each_and_a_seeded_search_repeats_exactly(tmp_path):
    """With a carved leave-last-out validation a trial is scored on the mean of three folds (fold j
    holds out each user's (j+1)-th latest entry, trained on the entries before it); the folds'
    models are dropped; the same seed gives the same trials to the last bit."""
    import optuna

    from wals_ooc.errors import SettingError

    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 30, 900), rng.integers(0, 50, 900)
    pairs = sorted({(int(u), int(i)) for u, i in zip(users, items)})
    times = rng.permutation(len(pairs))
    csv = tmp_path / "log.csv"
    csv.write_text("user,item,time\n" + "".join(f"u{u:02d},i{i:02d},{t}\n" for (u, i), t in zip(pairs, times)))
    full = str(tmp_path / "full.zarr")
    wals_ooc.convert([csv], full, user_col="user", item_col="item", value_col=None, order_col="time", progress=False)
    runs = [wals_ooc.tune(full, n_trials=2, base=TINY, validation_method="leave_last_out", model=tmp_path / f"m{n}.zarr",
                          threads=2, progress=False, prune=False, seed=1) for n in (0, 1)]
    result = runs[0]
    assert len(result.folds) == 3
    by_user: dict = {}
    for (u, i), t in zip(pairs, times):
        by_user.setdefault(f"u{u:02d}", []).append((t, f"i{i:02d}"))
    for j, (part, validation) in enumerate(result.folds):
        held = {(u, i) for (u, i) in _entries(validation)}
        assert held == {(u, sorted(seen)[-1 - j][1]) for u, seen in by_user.items()}
        assert set(_entries(part)) == {(u, i) for u, seen in by_user.items() for _, i in sorted(seen)[: -1 - j]}
    study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{result.study}")
    for trial in study.trials:
        assert len(trial.user_attrs["fold_scores"]) == 3
        assert trial.value == pytest.approx(np.mean(trial.user_attrs["fold_scores"]), rel=1e-12)
    assert not [n for n in os.listdir(result.workdir) if "fold" in n]
    assert [(r.value, r.settings) for r in runs[1].trials] == [(r.value, r.settings) for r in result.trials]
    with pytest.raises(SettingError, match="validation_folds"):
        wals_ooc.tune(full, full, validation_folds=2, model=tmp_path / "x.zarr", progress=False)
    for startup in (-1, 1.5, True):
        with pytest.raises(SettingError, match="startup_trials"):
            wals_ooc.tune(full, full, startup_trials=startup, model=tmp_path / "x.zarr", progress=False)
    assert not os.path.exists(tmp_path / "x.tune.db")
