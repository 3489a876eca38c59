"""Issue 14: start-up, help, error texts, iteration numbering, and the model report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("numba", "dask", "distributed", "pandas", "pyarrow", "matplotlib", "wals_ooc.kernels.solve")


def _modules_after(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_help_and_info_start_without_heavy_libraries(small_store):
    """`--help` loads neither numpy nor zarr; `info STORE` reads the store without numba, dask,
    pandas, pyarrow or matplotlib (what made every command take over a second to start)."""
    helped = _modules_after("from wals_ooc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {"numpy", "zarr", *HEAVY} & helped
    info = _modules_after(f"import contextlib, io\nfrom wals_ooc.cli import main\n"
                          f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                          f"    assert main(['info', {small_store!r}]) == 0\nassert 'top items' in out.getvalue()")
    assert "zarr" in info and not set(HEAVY) & info
    assert not set(HEAVY) & _modules_after("import wals_ooc")


def test_lazy_package_names_resolve():
    import wals_ooc
    import wals_ooc.store

    assert callable(wals_ooc.WALS) and callable(wals_ooc.convert) and callable(wals_ooc.store.open_store)
    assert set(wals_ooc.__all__) <= set(dir(wals_ooc))
    with pytest.raises(AttributeError):
        wals_ooc.no_such_name
