"""Shared fixtures: real stores on disk (tmp_path), small synthetic data, a real LocalCluster."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import pytest

from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def run_python(code: str, timeout: float = 300, env: dict | None = None):
    """Run code in a fresh interpreter (for peak-RSS and kill -9 tests); returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A 400 x 250 synthetic store with several shards per side (row_block 32)."""
    path = str(tmp_path_factory.mktemp("stores") / "small.zarr")
    write_synthetic_store(SyntheticSpec(n_users=400, n_items=250, rows=6000, clusters=6, seed=11), path,
                          row_block=32, shard_nnz=800, progress=False)
    return path


@pytest.fixture(scope="session")
def cluster():
    """A distributed LocalCluster with 2 worker processes of 1 thread each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as local, Client(local) as client:
        yield client


def store_to_scipy(store, side: str = "user"):
    """The whole matrix of a (small) store as scipy CSR: for tests only."""
    import scipy.sparse as sp

    rows = store.rows(side, 0, store.n_rows(side))
    shape = store.shape if side == "user" else store.shape[::-1]
    return sp.csr_matrix((rows.values, rows.indices, rows.indptr), shape=shape)


def assert_close_rel(actual, expected, rel):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.linalg.norm(expected)
    assert np.linalg.norm(actual - expected) <= rel * scale, (np.linalg.norm(actual - expected) / scale)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A real S3 server (moto) on 127.0.0.1 holding an empty ``bucket``; yields the storage options
    (fsspec/s3fs) that reach it, and stops the server afterwards."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=bucket)
        yield {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    finally:
        server.stop()
