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
    """`--help` loads neither numpy nor zarr; `info STORE` reads the store without zarr, numba,
    dask, pandas, pyarrow or matplotlib (what made every command take over a second to start)."""
    helped = _modules_after("from wals_ooc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {"numpy", "zarr", *HEAVY} & helped
    info = _modules_after(f"import contextlib, io\nfrom wals_ooc.cli import main\n"
                          f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                          f"    assert main(['info', {small_store!r}]) == 0\nassert 'top items' in out.getvalue()")
    assert not {"zarr", *HEAVY} & info  # a local store is read without zarr (store.peek)
    for command in ("train", "tune"):  # the settings' defaults load no kernels
        helped = _modules_after(f"from wals_ooc.cli import main\ntry:\n    main([{command!r}, '--help'])\n"
                                "except SystemExit:\n    pass")
        assert not {"zarr", *HEAVY} & helped, command
    from wals_ooc.config import CONFIDENCES
    from wals_ooc.kernels.solve import CONFIDENCE_KINDS

    assert set(CONFIDENCES) == set(CONFIDENCE_KINDS)
    assert not set(HEAVY) & _modules_after("import wals_ooc")


def test_lazy_package_names_resolve():
    import wals_ooc
    import wals_ooc.store

    assert callable(wals_ooc.WALS) and callable(wals_ooc.convert) and callable(wals_ooc.store.open_store)
    assert set(wals_ooc.__all__) <= set(dir(wals_ooc))
    with pytest.raises(AttributeError):
        wals_ooc.no_such_name


# -- help and error texts ------------------------------------------------------------------------
def run(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    from wals_ooc.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from wals_ooc.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"convert", "info", "train", "recommend", "similar", "split", "evaluate", "report"} <= set(commands)
    for name, sub in commands.items():
        text = sub.format_help()
        flags = {a.option_strings[0] for a in sub._actions if a.option_strings}
        one_required = {a for g in sub._mutually_exclusive_groups if g.required for a in g._group_actions}
        assert {"-q", "-v"} <= flags, name  # quiet and verbose on every command
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help text"
            if action.option_strings and not isinstance(action, argparse._StoreTrueAction) and \
                    action not in one_required and not action.required:
                shown = sub._get_formatter()._get_help_string(action)
                assert "default" in shown, f"{name} {action.option_strings[0]} does not show its default"
        assert "(default:" in text
    train_help = commands["train"].format_help()
    assert "--factors FACTORS" in train_help and "(default: 64)" in train_help and "(default: 15)" in train_help


def test_errors_name_flags_and_say_what_a_path_is(tmp_path, capsys, small_store):
    csv = tmp_path / "plays.csv"
    csv.write_text("user,item,plays\nu1,i1,3\n")
    tsv = tmp_path / "plays.dat"
    tsv.write_text("user\titem\tplays\n1\t2\t3\n")
    for command in (("train", csv), ("info", csv), ("recommend", csv, "--users", "u1")):
        code, _, err = run(capsys, *command)
        assert code == 2 and err.strip() == (f"wals-ooc {command[0]}: error: {csv} is not a wals-ooc store (it looks "
                                             f"like a CSV file: convert it first with `wals-ooc convert {csv} STORE`)")
    code, _, err = run(capsys, "info", tsv)
    assert code == 2 and f"tab-separated file: convert it first with `wals-ooc convert {tsv} STORE --delimiter '\\t'`" in err
    from wals_ooc import WALS, StoreError

    with pytest.raises(StoreError, match=r"wals_ooc.convert\("):  # the API names the API
        WALS(iterations=1).fit(str(csv))

    model = tmp_path / "m.zarr"
    assert run(capsys, "train", small_store, "--model", model, "--factors", "4", "--iterations", "1", "-q")[0] == 0
    code, _, err = run(capsys, "train", small_store, "--model", model, "--factors", "5", "--iterations", "1", "-q")
    assert code == 2 and "--no-resume" in err and "resume=False" not in err
    code, out_text, _ = run(capsys, "recommend", model, "--all", "-n", "2", "-q")
    assert code == 0 and f"to {model}-top2.zarr (the default place: give --output PATH" in out_text
    code, _, err = run(capsys, "recommend", model, "--all", "--output", f"{model}-top2.zarr", "-n", "2", "-q")
    assert code == 2 and "--overwrite" in err and "overwrite=True" not in err


def test_iterations_count_from_one_everywhere(tmp_path, capsys, small_store):
    from wals_ooc import WALS

    seen = []
    model = WALS(factors=3, iterations=2, random_state=0).fit(
        small_store, str(tmp_path / "a.zarr"), progress=False, callback=lambda it, s, loss: seen.append(it))
    assert seen == [1, 2] == [h["iteration"] for h in model.loss_history]
    code, _, err = run(capsys, "train", small_store, "--model", tmp_path / "b.zarr", "--factors", "3",
                       "--iterations", "2")
    assert code == 0 and [line.split(":")[0] for line in err.splitlines() if line.startswith("iteration ")] == \
        ["iteration 1/2", "iteration 2/2"]
    code, out, _ = run(capsys, "info", tmp_path / "b.zarr")
    assert "after iteration 2" in out


# -- the report ----------------------------------------------------------------------------------
class _Panels:
    """Panels (<section class="panel" id=...>) of a report page and the images in each."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.images: dict[str, list[bytes]] = {}
        self.text: dict[str, str] = {}
        self.external: list[str] = []
        panels = self

        class Parser(HTMLParser):
            current = None

            def handle_starttag(self, tag, attrs):
                attrs = dict(attrs)
                if tag == "section" and "panel" in (attrs.get("class") or ""):
                    self.current = attrs["id"]
                    panels.images[self.current], panels.text[self.current] = [], ""
                if tag == "img":
                    import base64

                    src = attrs.get("src", "")
                    assert src.startswith("data:image/png;base64,"), src[:40]
                    panels.images[self.current].append(base64.b64decode(src.split(",", 1)[1]))
                if tag in ("link", "script") or (tag == "img" and attrs.get("src", "").startswith("http")):
                    panels.external.append(tag)

            def handle_data(self, data):
                if self.current:
                    panels.text[self.current] += data

        Parser().feed(text)


def _non_trivial_png(data: bytes) -> bool:
    """A real PNG of a plot: decodes, a fair size, and not one flat colour."""
    import io

    import matplotlib.image
    import numpy as np

    assert data.startswith(b"\x89PNG")
    pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
    return pixels.shape[0] > 200 and pixels.shape[1] > 400 and float(np.std(pixels[..., :3])) > 0.02


@pytest.fixture(scope="module")
def trained_split(tmp_path_factory, small_store):
    import wals_ooc

    root = tmp_path_factory.mktemp("report")
    train, test = str(root / "train.zarr"), str(root / "test.zarr")
    wals_ooc.split(small_store, train, test, seed=3, progress=False)
    model = wals_ooc.WALS(factors=8, iterations=3, random_state=0).fit(train, str(root / "model.zarr"), progress=False)
    return root, model, train, test


def test_metric_curves_equal_metrics_at_each_k():
    """One top-k_max pass gives, at every k, what ``ranking_metrics`` gives at that k."""
    import numpy as np

    from wals_ooc.evaluate.metrics import ranking_curves, ranking_metrics

    rng = np.random.default_rng(4)
    n_users, k_max = 30, 12
    rec = np.stack([rng.permutation(40)[:k_max] for _ in range(n_users)])
    rec[3, 7:] = -1  # a user with fewer candidates than k_max
    truth = [np.sort(rng.choice(40, size=rng.integers(0, 6), replace=False)) for _ in range(n_users)]
    indptr = np.concatenate([[0], np.cumsum([len(t) for t in truth])]).astype(np.int64)
    ids = np.concatenate(truth).astype(np.int64)
    curves = ranking_curves(rec, indptr, ids, None, None, k_max).means()
    for k in range(1, k_max + 1):
        at_k = ranking_metrics(rec, indptr, ids, None, None, k).means(k)
        for metric in ("precision", "recall", "ndcg", "map"):
            assert curves[metric][k - 1] == pytest.approx(at_k[f"{metric}@{k}"], rel=1e-12)
    assert curves["users"] == at_k["users"] > 20


def test_report_renders_every_panel(trained_split, capsys):
    pytest.importorskip("matplotlib")
    root, model, train, test = trained_split
    out = root / "report.html"
    code, stdout, err = run(capsys, "report", model.factors_store.location, "--test", test, "-o", out, "--k-max", "20",
                            "--show-users", "3", "--sample-users", "100", "-q")
    assert code == 0, err
    assert stdout.strip() == f"wrote {out}"
    page = _Panels(out.read_text(encoding="utf-8"))
    assert list(page.images) == ["training", "metrics", "popularity", "users"] and not page.external
    for panel in ("training", "metrics", "popularity"):
        assert len(page.images[panel]) == 1 and _non_trivial_png(page.images[panel][0]), panel
    assert "AUC" in page.text["metrics"] and "catalogue coverage" in page.text["popularity"]
    assert page.text["users"].count("strongest interactions") == 3
    # the numbers behind it: metrics at every k equal evaluate at that k
    from wals_ooc.report import collect_report

    data = collect_report(model, test, k_max=20, sample_users=50, show_users=2)
    assert data.metrics["k"] == list(range(1, 21)) and data.training["iteration"] == [1, 2, 3]
    at_k = model.evaluate(test, k=20)
    for metric in ("precision", "recall", "ndcg", "map"):
        assert data.metrics[metric][19] == pytest.approx(at_k[f"{metric}@20"], rel=1e-9, abs=1e-12)
    assert data.metrics["auc"] == pytest.approx(at_k["auc"]) and data.metrics["users"] == at_k["users"]
    popularity = data.popularity
    assert popularity["users_sampled"] == 50 and popularity["recommendations"] == 50 * 10
    assert 0 < popularity["coverage"] <= 1 and popularity["items_recommended"] <= popularity["n_items"]
    assert popularity["head_recommendation_share"] + popularity["tail_recommendation_share"] == pytest.approx(1)
    for key in ("item_share", "interaction_share", "recommendation_share"):
        assert sum(popularity["bins"][key]) == pytest.approx(1)
        assert popularity["cumulative"][key][-1] == pytest.approx(1)
    assert len(data.users) == 2 and all(len(u["recommendations"]) == 10 for u in data.users)
    # an existing page is replaced only with --overwrite; without a test store the metrics panel says how
    code, _, err = run(capsys, "report", model.factors_store.location, "-o", out, "-q")
    assert code == 2 and "--overwrite" in err
    assert model.report(str(out), overwrite=True, sample_users=20, show_users=1) == str(out)
    page = _Panels(out.read_text(encoding="utf-8"))
    assert page.images["metrics"] == [] and "--test TEST" in page.text["metrics"]
    assert _non_trivial_png(page.images["popularity"][0])


# -- default model paths, no padding ---------------------------------------------------------------
def test_fit_without_a_path_gives_each_setting_its_own_model(tmp_path):
    from wals_ooc import WALS
    from wals_ooc.synthetic import SyntheticSpec, write_synthetic_store

    store = str(tmp_path / "plays.zarr")
    write_synthetic_store(SyntheticSpec(n_users=60, n_items=40, rows=600, seed=2), store, progress=False)
    plain = str(tmp_path / "plays-model.zarr")

    def fit(**settings):
        return WALS(iterations=settings.pop("iterations", 1), random_state=settings.pop("seed", 0), **settings).fit(
            store, progress=False).factors_store

    first = fit(factors=3)
    assert first.location == plain
    other = fit(factors=4)  # other settings: a new model beside it, the first one untouched
    assert other.location.startswith(str(tmp_path / "plays-model-4f-")) and other.location.endswith(".zarr")
    assert first.location != other.location and fit(factors=4).location == other.location  # same settings: same model
    more = fit(factors=3, iterations=2)  # more iterations of the same settings: resumes the first
    assert more.location == plain and more.iterations_done == 2
    reseeded = fit(factors=3, seed=5)
    assert reseeded.location not in (plain, other.location) and reseeded.iterations_done == 1
    assert fit(factors=3, seed=None).location == plain  # no seed asked for: any recorded one will do


def test_recommend_returns_only_the_given_items_without_padding(trained_split):
    import numpy as np

    _, model, train, _ = trained_split
    store = model.interactions
    user = store.ids("user")[5].item()
    liked = set(store.ids("item")[store.rows("user", 5, 6).indices].tolist())
    unliked = [i for i in store.ids("item").tolist() if i not in liked]
    chosen = unliked[:3]
    ids, scores = model.recommend(user, N=10, items=chosen)  # one user: 1-D, exactly its results
    assert ids.shape == scores.shape == (3,) and sorted(ids.tolist()) == sorted(chosen)
    assert np.all(np.diff(scores) <= 0) and np.all(np.isfinite(scores))
    ids, scores = model.recommend([user, store.ids("user")[6].item()], N=10, items=chosen, filter_already_liked=False)
    assert ids.shape == (2, 3) and set(ids.ravel().tolist()) == set(chosen)
    mixed = [liked.pop(), chosen[0]]  # one of them already liked: filtered, not padded
    ids, scores = model.recommend(user, N=10, items=mixed)
    assert ids.tolist() == [chosen[0]]


def test_split_names_its_own_stages(tmp_path, small_store, capsys):
    import wals_ooc

    wals_ooc.split(small_store, str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), progress=True)
    bars = {line.split(":")[0] + ":" + line.split(":")[1] for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if line.startswith("split ")}
    assert {"split train: read", "split test: read"} <= bars
    # ids are mapped (and, when both sides were counted in the first pass, bucketed in the same pass)
    assert {side for side in ("train", "test") if any(bar.startswith(f"split {side}: map ids") for bar in bars)} == {"train", "test"}
    assert all(bar.split(":")[0] in ("split train", "split test") for bar in bars)


def test_readme_test_command_is_what_ci_runs():
    """The README's test command (type check, then tests) and .ci/run say the same thing."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text().splitlines()
    at = next(k for k, line in enumerate(readme) if "(what .ci/run does)" in line)
    command = readme[at + 1].strip()
    assert "mypy wals_ooc" in command and "pytest" in command
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert command in ci


def test_quickstart_refuses_an_output_directory_it_did_not_make(tmp_path):
    """examples/quickstart.sh made its output afresh with `rm -rf`: given a user's directory as
    its output it would have deleted it. It now refuses a directory without its own marker and
    leaves it as it was."""
    import pathlib

    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.sh"
    theirs = tmp_path / "notes"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    done = subprocess.run(["bash", str(script), str(theirs)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "was not made by this example" in done.stderr and done.stderr.count("\n") == 1
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"] and (theirs / "keep.txt").read_text() == "mine"
