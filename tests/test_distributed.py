"""Training on a real distributed.LocalCluster of worker processes: same result as the threaded
scheduler, a worker killed mid half-sweep is survived, stores on S3 (moto on loopback), and
the driver killed at 20 random points always resumes to the checkpointed factors."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from wals_ooc import WALSConfig, open_store
from wals_ooc.train import FactorStore, train

from .conftest import moto_s3


def _factors(model: FactorStore):
    return model.current("user")[:], model.current("item")[:]


def test_local_cluster_of_processes_equals_threaded(small_store, tmp_path, cluster):
    for solver in ("cg", "cholesky"):
        config = WALSConfig(factors=8, iterations=3, random_state=4, solver=solver)
        store = open_store(small_store)
        local = train(store, str(tmp_path / f"local-{solver}.zarr"), config, progress=False, threads=2)
        remote = train(store, str(tmp_path / f"remote-{solver}.zarr"), config, progress=False, client=cluster)
        for a, b in zip(_factors(local), _factors(remote)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        assert [e["loss"] for e in local.loss_history] == pytest.approx([e["loss"] for e in remote.loss_history], rel=1e-6)


def _die_on_nth_solve(n: int) -> None:
    """Installed on a worker: its n-th shard solve kills the worker process (SIGKILL)."""
    import wals_ooc.train.half_sweep as half_sweep

    real = half_sweep.solve_task
    calls = [0]

    def solve_or_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    half_sweep.solve_task = solve_or_die


def test_worker_killed_mid_half_sweep_is_survived(small_store, tmp_path):
    from distributed import Client, LocalCluster

    config = WALSConfig(factors=8, iterations=3, random_state=4)
    store = open_store(small_store)
    reference = train(store, str(tmp_path / "ref.zarr"), config, progress=False, threads=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, \
            Client(local) as client:
        victims = client.run(lambda: os.getpid())
        client.run(_die_on_nth_solve, 4)  # both workers die in the first user half-sweep
        model = train(store, str(tmp_path / "m.zarr"), config, progress=False, client=client)
        survivors = client.run(lambda: os.getpid())
        assert not set(victims.values()) & set(survivors.values()), "the workers were not killed"
    for a, b in zip(_factors(reference), _factors(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_store_and_model_on_s3_through_moto(tmp_path, cluster):
    """Convert a CSV into s3://, train on the cluster with the factors in s3://, serve from it."""
    import wals_ooc

    with moto_s3("wals-bucket") as options:
        csv = tmp_path / "plays.csv"
        rng = np.random.default_rng(0)
        rows = [f"{u},{i},{c}" for u, i, c in zip(rng.integers(0, 120, 3000), rng.integers(0, 60, 3000), rng.integers(1, 5, 3000))]
        csv.write_text("user,item,count\n" + "\n".join(rows) + "\n")
        wals_ooc.convert(str(csv), "s3://wals-bucket/plays.zarr", memory_budget="4GB", progress=False, storage_options=options,
                         row_block=16)
        model = wals_ooc.WALS(factors=4, iterations=2, random_state=0)
        model.fit("s3://wals-bucket/plays.zarr", "s3://wals-bucket/model.zarr", client=cluster, progress=False,
                  storage_options=options)
        local = wals_ooc.WALS(factors=4, iterations=2, random_state=0)
        wals_ooc.convert(str(csv), str(tmp_path / "plays.zarr"), progress=False, row_block=16)
        local.fit(str(tmp_path / "plays.zarr"), str(tmp_path / "model.zarr"), progress=False)
        np.testing.assert_allclose(model.user_factors[:], local.user_factors[:], rtol=1e-5, atol=1e-7)
        loaded = wals_ooc.load("s3://wals-bucket/model.zarr", storage_options=options)
        ids, _ = loaded.recommend([0, 1], N=3)
        assert ids.shape == (2, 3)


DRIVER = """
import sys, threading, os, signal, time
from wals_ooc import WALSConfig, open_store
from wals_ooc.train import train
delay = float(sys.argv[3])
if delay > 0:
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
config = WALSConfig(factors=6, iterations=10, random_state=8)
started = time.perf_counter()
train(open_store(sys.argv[1]), sys.argv[2], config, progress=False, threads=2, resume=True)
print(time.perf_counter() - started)
"""


def test_driver_killed_at_20_random_points_always_resumes_to_checkpointed_factors(small_store, tmp_path):
    """Each kill leaves a checkpoint whose factors equal the uninterrupted run's at that step;
    resuming after the last kill ends equal to the uninterrupted run."""
    config = WALSConfig(factors=6, iterations=10, random_state=8)
    store = open_store(small_store)
    per_iteration = []  # (X_k, Y_k) after each uninterrupted iteration, from the callback
    location = str(tmp_path / "straight.zarr")

    def remember(iteration, seconds, loss):
        model = FactorStore.open(location)
        per_iteration.append(_factors(model))

    straight = train(store, location, config, progress=False, threads=2, callback=remember)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    resumed = str(tmp_path / "killed.zarr")
    # How long the driver itself takes from its imports to the end, on this machine under its
    # current load (kernels loaded from the cache, the store opened, ten iterations): kill times
    # are drawn over that span, so the kills land during training even on a busy machine.
    timed = subprocess.run([sys.executable, str(script), small_store, str(tmp_path / "timed.zarr"), "0"],
                           capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0, timed.stderr
    span = float(timed.stdout.strip().splitlines()[-1])
    rng = random.Random(2026)
    seen_steps = []
    kills = attempts = 0
    while kills < 20:
        attempts += 1
        assert attempts < 60, f"only {kills} kills landed in {attempts} runs"
        if FactorStore.exists(resumed) and FactorStore.open(resumed).complete:
            shutil.rmtree(resumed)  # finished: start a fresh run so every kill interrupts training
        # one kill in each twentieth of the span (timed from after the imports, as span is), so the
        # kills spread over the run however the load changes its pace
        delay = max(0.05, span * (kills + rng.random()) / 20)
        done = subprocess.run([sys.executable, str(script), small_store, resumed, str(delay)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode in (0, -9), done.stderr
        kills += done.returncode == -9
        if not FactorStore.exists(resumed):
            continue
        model = FactorStore.open(resumed)
        checkpoint = model.checkpoint
        if checkpoint is None:
            continue
        seen_steps.append(checkpoint.step)
        if checkpoint.step == 0:
            continue
        X, Y = _factors(model)
        users_done, items_done = (checkpoint.step + 1) // 2, checkpoint.step // 2  # half-sweeps completed
        np.testing.assert_array_equal(X, per_iteration[users_done - 1][0])
        if items_done:
            np.testing.assert_array_equal(Y, per_iteration[items_done - 1][1])
    done = subprocess.run([sys.executable, str(script), small_store, resumed, "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    final = FactorStore.open(resumed)
    for a, b in zip(_factors(straight), _factors(final)):
        np.testing.assert_array_equal(a, b)
    # the kills landed at several different points of training (on a loaded machine a run's pace
    # varies too much from the timed one's for more to be certain)
    assert len(set(seen_steps) - {0}) >= 3, seen_steps
