"""The report's plots, labels and HTML page: what a reader needs is on the figure (titles with data, eps,
seeds and checkpoint; integer epochs; std bands; short labels) and in report.html."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from robust_train.report import build_report, group_runs, load_local_runs
from robust_train.report.aggregate import LABEL_MAX, comparable_groups, pareto_front, strongest_shared_attack
from robust_train.report.html import markdown_to_html
from robust_train.report.plots import attacks_figure, epochs_figure, eps_figure, pareto_figure
from robust_train.report.runs import format_eps
from robust_train.tracking.results import RESULTS_FORMAT, RESULTS_VERSION

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.collections import PolyCollection  # noqa: E402

EPS = 8 / 255
QUICK = {"clean": {"name": "clean"}, "pgd20": {"name": "pgd", "steps": 20, "eps": None}}
# A suite whose attack nodes alone differ from QUICK's in hundreds of characters of keys.
FULL = {
    **QUICK,
    "cw20": {"name": "pgd", "loss": "cw", "steps": 20, "kappa": 50.0, "restarts": 1, "bn_mode": "eval"},
    "autoattack": {"name": "autoattack", "version": "standard", "seed": 0, "batch_size": 500},
    "lafeat": {"name": "lafeat", "head_lr": 0.01, "head_epochs": 5, "betas": [0.1, 0.2, 0.3, 0.4, 0.5],
               "head_channels": [64, 128, 256, 512], "beta_schedule": "linear", "head_data": "train"},
    "ssah": {"name": "ssah", "lr": 0.001, "steps": 150, "lambda_lf": 0.1, "wavelet": "haar"},
}  # fmt: skip


def _config(defense: str, seed: int, suite: str = "quick", eps: Any = EPS, **extra: Any) -> dict:
    attacks = FULL if suite == "full" else QUICK
    config = {
        "seed": seed, "dataset": {"name": "cifar10"}, "model": {"name": "preact_resnet18"},
        "defense": {"name": defense, "beta": 6.0 if defense == "trades" else None}, "addons": {},
        "trainer": {"epochs": 5, "optimizer": {"lr": 0.1}, "validation": {"pgd_steps": 10}},
        "threat": {"norm": "linf", "eps": eps}, "logger": {"name": "none"},
        "eval": {"name": suite, "force": seed % 2 == 0, "attacks": attacks},
        # Run metadata (another engineer's `run` node): different in every run, never a group key.
        "run": {"dir": f"/runs/{defense}/{seed}", "git_sha": f"{seed:040x}", "overrides": [f"seed={seed}"]},
    }  # fmt: skip
    for key, value in extra.items():
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def _write(run_dir: Path, config: dict, clean: float, robust: float, epochs: int = 5) -> None:
    rng = random.Random(str(run_dir))
    attacks = {
        name: {"accuracy": clean if name == "clean" else robust - 2 * i + rng.uniform(-1, 1), "n": 100,
               "time_s": 1.0, "attack": {**node, "eps": None if name == "clean" else config["threat"]["eps"]}}
        for i, (name, node) in enumerate(config["eval"]["attacks"].items())
    }  # fmt: skip
    history = [
        {"epoch": e, "val/clean_acc": clean - 10 + 2 * e + rng.uniform(-1, 1),
         "val/robust_acc": robust - 10 + 2 * e + rng.uniform(-1, 1)}
        for e in range(1, epochs + 1)
    ]  # fmt: skip
    last = {k: {**v, "accuracy": v["accuracy"] - 1} for k, v in attacks.items()}
    res = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "config": config, "seed": config["seed"],
        "train": {"history": history},
        "eval": {"n_examples": 100, "best": {"epoch": epochs - 1, "attacks": attacks},
                 "last": {"epoch": epochs, "attacks": last}},
    }  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(res))


@pytest.fixture
def methods(tmp_path: Path) -> Path:
    """2 methods x 3 seeds x 3 epochs (few epochs: matplotlib would tick 1.25, 1.5, ...)."""
    root = tmp_path / "methods"
    for i, (defense, clean, robust) in enumerate([("pgd_at", 82.0, 45.0), ("trades", 78.0, 49.0)]):
        for seed in range(3):
            _write(root / f"{i}{seed}", _config(defense, seed), clean + seed, robust - seed, epochs=3)
    return root


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_format_eps_writes_255ths_as_fractions() -> None:
    assert format_eps(8 / 255) == "8/255" and format_eps(16 / 255) == "16/255"
    assert format_eps(0.1) == "0.1" and format_eps(0.5) == "0.5" and format_eps(1.0) == "1"


def test_attack_panels_best_and_last_side_by_side_with_titles(methods: Path) -> None:
    groups = group_runs(load_local_runs([methods]))
    fig = attacks_figure(groups)
    title = fig.get_suptitle()
    assert "n=3 seeds" in title and "eps=8/255" in title and "cifar10" in title and "best | last" in title
    best, last = fig.axes[:2]
    assert [best.get_title(), last.get_title()] == ["best checkpoint", "last checkpoint"]
    assert best.get_shared_y_axes().joined(best, last)
    assert _legend_texts(fig) == ["pgd_at (n=3)", "trades (n=3)"]


def test_attack_panels_for_every_kind_there_is(methods: Path) -> None:
    path = methods / "00" / "results.json"
    res = json.loads(path.read_text())
    res["eval"]["ema"] = {**res["eval"]["last"], "weights": "ema"}
    path.write_text(json.dumps(res))
    fig = attacks_figure(group_runs(load_local_runs([methods])))
    assert [ax.get_title() for ax in fig.axes] == ["best checkpoint", "last checkpoint", "ema checkpoint"]


def test_epoch_plot_has_integer_ticks_a_std_band_and_seed_counts(methods: Path) -> None:
    fig = epochs_figure(group_runs(load_local_runs([methods])))
    title = fig.get_suptitle()
    assert "n=3 seeds" in title and "eps=8/255" in title
    assert _legend_texts(fig)[:2] == ["pgd_at (n=3)", "trades (n=3)"]
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        # One mean ± std band per group of several seeds.
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 2


def test_epoch_plot_of_single_seeds_has_no_band(tmp_path: Path) -> None:
    _write(tmp_path / "a", _config("pgd_at", 0, eps="8/255"), 80.0, 40.0)  # an older file: eps as written
    fig = epochs_figure(group_runs(load_local_runs([tmp_path])))
    assert "n=1 seed per group" in fig.get_suptitle() and "eps=8/255" in fig.get_suptitle()
    assert not any(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)


def test_pareto_front_membership() -> None:
    points = [(80, 40), (85, 35), (79, 39), (80, 40), (70, 50), (69, 49), (85, 34)]
    # (79, 39) and (69, 49) are beaten in both; (85, 34) by (85, 35) in one and matched in the other;
    # equal points both stay.
    assert pareto_front(points) == [0, 1, 3, 4]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


def test_pareto_plot_uses_the_strongest_attack_all_groups_ran(tmp_path: Path) -> None:
    for seed in range(2):
        _write(tmp_path / f"f{seed}", _config("pgd_at", seed, suite="full"), 82.0 + seed, 45.0)
        _write(tmp_path / f"q{seed}", _config("trades", seed), 78.0 + seed, 49.0)
        _write(tmp_path / f"m{seed}", _config("mart", seed, suite="full"), 70.0 + seed, 40.0)
    groups = group_runs(load_local_runs([tmp_path]))
    # The full suite's AutoAttack is lower, but the quick suite has only pgd20 in common.
    assert strongest_shared_attack(groups) == "pgd20"
    full = [g for g in groups if "autoattack" in g.attacks]
    assert strongest_shared_attack(full) == "ssah"  # lowest mean accuracy: the last in _write's order
    fig = pareto_figure(groups)
    ax = fig.axes[0]
    assert "pgd20" in ax.get_ylabel() and "pgd20" in fig.get_suptitle()
    assert "n=2 seeds" in fig.get_suptitle() and "eps=8/255" in fig.get_suptitle()
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == ["mart (n=2)", "pgd_at (n=2)", "trades (n=2)"]
    # mart (70, 40) is dominated by pgd_at; the dashed front joins pgd_at and trades only.
    front_line = ax.lines[0]
    assert len(front_line.get_xdata()) == 2


def test_pareto_compares_one_threat_model_only(tmp_path: Path) -> None:
    for i, eps in enumerate([EPS, EPS, 4 / 255]):
        _write(tmp_path / str(i), _config(["pgd_at", "trades", "mart"][i], 0, eps=eps), 80.0, 40.0)
    groups = group_runs(load_local_runs([tmp_path]))
    assert sorted(g.label.split()[0] for g in comparable_groups(groups)) == ["pgd_at", "trades"]
    assert "1 more group(s)" in pareto_figure(groups).get_suptitle()


def test_robust_vs_eps_ticks_read_in_255ths(tmp_path: Path) -> None:
    for i, k in enumerate([2, 4, 8]):
        for seed in range(2):
            _write(tmp_path / f"{i}{seed}", _config("pgd_at", seed, eps=k / 255), 80.0, 60.0 - 4 * k)
    fig = eps_figure(load_local_runs([tmp_path]))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2/255", "4/255", "8/255"]
    assert "n=2 seeds" in fig.get_suptitle() and any(isinstance(c, PolyCollection) for c in ax.collections)
    assert all("(n=2)" in t for t in _legend_texts(fig))


def test_eval_suites_run_and_force_do_not_flood_labels(tmp_path: Path) -> None:
    for seed in range(2):
        # robust-eval's checkpoint path and training-run link are per seed too.
        evaluated = {"checkpoint": f"/runs/{seed}/best.pt", "train_run.run_id": f"id{seed}"}
        _write(tmp_path / f"q{seed}", _config("pgd_at", seed, suite="quick", **evaluated), 80.0, 40.0)
        _write(tmp_path / f"f{seed}", _config("pgd_at", seed, suite="full", **evaluated), 80.0, 40.0)
    groups = group_runs(load_local_runs([tmp_path]))
    # `run`, `eval.force`, `checkpoint` and `train_run` differ between seeds, yet the seeds group.
    assert [(g.label, g.n) for g in groups] == [("pgd_at eval=full", 2), ("pgd_at eval=quick", 2)]


def test_unnamed_suites_are_named_by_their_attacks(tmp_path: Path) -> None:
    full = _config("pgd_at", 0, suite="full")
    quick = _config("pgd_at", 0, suite="quick")
    full["eval"]["name"] = quick["eval"]["name"] = None
    _write(tmp_path / "f", full, 80.0, 40.0)
    _write(tmp_path / "q", quick, 80.0, 40.0)
    labels = [g.label for g in group_runs(load_local_runs([tmp_path]))]
    assert labels == ["pgd_at eval=autoattack+clean+cw20+lafeat+pgd20+ssah", "pgd_at eval=clean+pgd20"]


def test_labels_are_short_keyed_capped_unique_and_stable(tmp_path: Path) -> None:
    # A sweep over many keys at once: the label would run past LABEL_MAX.
    many = {f"trainer.knob_{c}": None for c in "abcdefghij"}
    for i in range(3):
        extra = {k: f"value{i}" for k in many}
        _write(tmp_path / str(i), _config("trades", 0, **{"trainer.optimizer.lr": 0.1 / (i + 1)}, **extra),
               80.0, 40.0)  # fmt: skip
    runs = load_local_runs([tmp_path])
    labels = [g.label for g in group_runs(runs)]
    assert all(len(label) <= LABEL_MAX for label in labels) and len(set(labels)) == 3
    assert all(label.startswith("trades knob_a=value") for label in labels)
    assert [g.label for g in group_runs(list(reversed(runs)))] == labels  # not the runs' order
    full = [g.full_label for g in group_runs(runs)]
    assert all(f and "lr=" in f and len(f) > LABEL_MAX for f in full)
    md = build_report(runs, tmp_path / "out", plots=False).markdown
    assert "Labels cut short above, in full:" in md


def test_labels_that_the_cut_makes_equal_stay_apart(tmp_path: Path) -> None:
    note = "a note that is long enough that the end of it, where the runs differ, is cut: run "
    for i in range(2):
        _write(tmp_path / str(i), _config("trades", 0, **{"trainer.note": note + str(i)}), 80.0, 40.0)
    runs = load_local_runs([tmp_path])
    labels = [g.label for g in group_runs(runs)]
    assert len(set(labels)) == 2 and all(
        len(t) <= LABEL_MAX and re.search(r"… #[0-9a-f]{4}$", t) for t in labels
    )
    assert [g.label for g in group_runs(list(reversed(runs)))] == labels


def test_eps_written_as_text_or_as_a_number_is_one_threat_model(tmp_path: Path) -> None:
    _write(
        tmp_path / "old", _config("pgd_at", 0, eps="8/255", **{"defense.attack.step": "eps/4"}), 80.0, 40.0
    )
    _write(tmp_path / "new", _config("pgd_at", 1, eps=EPS, **{"defense.attack.step": EPS / 4}), 82.0, 42.0)
    assert [(g.label, g.n) for g in group_runs(load_local_runs([tmp_path]))] == [("pgd_at", 2)]


def test_sweep_labels_name_only_what_varies(tmp_path: Path) -> None:
    for beta in (1.0, 6.0):
        for lr in (0.1, 0.05):
            for seed in range(2):
                config = _config(
                    "trades", seed, suite="full", **{"defense.beta": beta, "trainer.optimizer.lr": lr}
                )
                _write(tmp_path / f"{beta}-{lr}-{seed}", config, 80.0, 40.0)
    groups = group_runs(load_local_runs([tmp_path]))
    # Keys shortened to the tail no other key has: the suite's ssah.lr keeps optimizer.lr whole.
    assert [g.label for g in groups] == [
        "trades beta=1 optimizer.lr=0.05", "trades beta=1 optimizer.lr=0.1",
        "trades beta=6 optimizer.lr=0.05", "trades beta=6 optimizer.lr=0.1",
    ]  # fmt: skip
    assert _legend_texts(attacks_figure(groups))[0] == "trades beta=1 optimizer.lr=0.05 (n=2)"


def test_html_page_embeds_every_plot_and_the_tables(methods: Path, tmp_path: Path) -> None:
    odd = methods / "<b>odd & run</b>"
    _write(odd, _config("mart", 0), 70.0, 30.0, epochs=3)
    report = build_report(load_local_runs([methods]), tmp_path / "out")
    assert report.path.name == "report.md" and report.html_path == tmp_path / "out" / "report.html"
    page = report.html_path.read_text()
    assert report.plots and all(f'<img src="{p.name}"' in page for p in report.plots)
    assert page.count("<table>") == report.markdown.count("\n|---")
    assert "<td>pgd_at</td>" in page and '<td class="num">82.00 ± 1.00</td>' in page
    # Run names are text, not markup.
    assert "<b>odd" not in page and "&lt;b&gt;odd &amp; run&lt;/b&gt;" in page


def test_no_plots_still_writes_the_html_page(methods: Path, tmp_path: Path) -> None:
    report = build_report(load_local_runs([methods]), tmp_path / "out", plots=False)
    page = report.html_path.read_text()
    assert not report.plots and "<img" not in page and "<table>" in page
    assert not list((tmp_path / "out").glob("*.png"))


def test_markdown_to_html_lists_code_and_bold() -> None:
    page = markdown_to_html("## A\n\n- a `x<y`\n  - **b**\n- c\n\nplain & text\n")
    body = re.sub(r"\s+", " ", page.split("<body>")[1])
    assert (
        "<h2>A</h2>" in body
        and "<li>a <code>x&lt;y</code><ul> <li><strong>b</strong></li> </ul></li>" in body
    )
    assert "<li>c</li>" in body and "<p>plain &amp; text</p>" in body


def test_epoch_bands_stay_within_0_and_100(tmp_path: Path) -> None:
    # Seeds at 1 % and 40 % robust accuracy: mean ± std reaches below 0, the band must not.
    _write(tmp_path / "a", _config("trades", 0), 20.0, 11.0)
    _write(tmp_path / "b", _config("trades", 1), 95.0, 60.0)
    fig = epochs_figure(group_runs(load_local_runs([tmp_path])))
    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert bands
    for band in bands:
        ys = [y for path in band.get_paths() for _, y in path.vertices]
        assert min(ys) >= 0.0 and max(ys) <= 100.0


def test_an_eps_sweep_with_steps_that_follow_eps_is_one_method_per_label(tmp_path: Path) -> None:
    # results.json stores steps as numbers (eps/4 at each eps): they differ whenever eps does.
    for i, k in enumerate([4, 8]):
        for defense in ("standard", "pgd_at"):
            steps = {"threat.step": k / 4 / 255, "defense.attack.step": k / 4 / 255}
            _write(tmp_path / f"{defense}{i}", _config(defense, 0, eps=k / 255, **steps), 80.0, 60.0 - 4 * k)
    groups = group_runs(load_local_runs([tmp_path]))
    assert [g.label for g in groups] == [
        "pgd_at eps=4/255", "pgd_at eps=8/255", "standard eps=4/255", "standard eps=8/255"
    ]  # fmt: skip
    fig = eps_figure(load_local_runs([tmp_path]))
    assert fig is not None  # one line per method across the radii
    assert sorted(_legend_texts(fig)) == ["pgd_at: pgd20 (n=1)", "standard: pgd20 (n=1)"]
    # A step that does not follow eps still tells runs apart, as a fraction of eps.
    _write(tmp_path / "odd", _config("pgd_at", 0, eps=8 / 255, **{"threat.step": 1 / 255}), 80.0, 20.0)
    labels = [g.label for g in group_runs(load_local_runs([tmp_path]))]
    assert any("step=eps/8" in label for label in labels) and any("step=eps/4" in label for label in labels)
