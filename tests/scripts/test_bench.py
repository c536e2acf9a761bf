"""scripts/bench.py end to end on a tiny model: side-by-side table, JSON keys, epoch and AutoAttack modes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_script"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_script", None)


# Two attack steps and one thread keep this fast on a small shared CPU (the threads are restored after).
TINY = [
    "--width",
    "0.03125",
    "--batch",
    "8",
    "--steps",
    "1",
    "--reps",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
]
FEW_STEPS = "defense.attack.steps=2"


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_step_mode_prints_both_loops_and_writes_the_json_keys(bench, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    result = bench.main([*TINY, "--defense", "pgd_at", "trades", "--override", FEW_STEPS, "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ours img/s" in printed and "ref img/s" in printed and "pgd_at" in printed and "trades" in printed
    data = json.loads(out.read_text())
    for key in ("ours_img_s", "reference_img_s", "ratio", "peak_mem_mb", "device"):
        assert key in data, key
    assert data["ours_img_s"] > 0 and data["reference_img_s"] > 0 and data["peak_mem_mb"] > 0
    assert data["ratio"] == pytest.approx(data["ours_img_s"] / data["reference_img_s"])
    rows = {row["defense"]: row for row in result["step"]}
    assert set(rows) == {"pgd_at", "trades"}
    # FLOPs of PGD-10-style steps: TRADES adds the clean reference and the clean outer forward.
    assert 0 < rows["pgd_at"]["gflop_per_step"] < rows["trades"]["gflop_per_step"]
    assert rows["pgd_at"]["fast"] == {
        "amp": False,
        "channels_last": False,
        "compile": False,
        "fused_sgd": False,
    }


def test_addons_without_reference_epoch_and_autoattack_modes(bench, tmp_path) -> None:
    out = tmp_path / "b.json"
    result = bench.main([
        *TINY, "--reps", "1", "--defense", "pgd_at", "--addons", "slim", "--no-reference",
        "--override", FEW_STEPS, "trainer.fast.amp=true", "trainer.fast.channels_last=true",
        "--mode", "step", "epoch", "autoattack", "--images", "16",
        "--aa-images", "2", "--aa-versions", "lite",
        "--json", str(out),
    ])  # fmt: skip
    row = result["step"][0]
    assert row["addons"] == ["slim"] and row["reference_img_s"] is None and row["ratio"] is None
    assert row["fast"]["amp"] == "bfloat16" and row["fast"]["channels_last"] is True
    epoch = result["epoch"][0]
    assert epoch["images"] == 16 and epoch["extrapolated"]
    assert epoch["epoch_s_50k"] == pytest.approx(epoch["epoch_s"] * 50_000 / 16)
    aa = result["autoattack"]
    assert aa["images"] == 2 and aa["lite_s_per_1000"] == pytest.approx(aa["lite_s"] * 500)
    assert json.loads(out.read_text())["ours_img_s"] > 0


def test_data_mode_streams_a_written_file_and_reports_the_margin(bench, tmp_path) -> None:
    path = tmp_path / "extra.npz"
    result = bench.main([
        "--mode", "data", "--device", "cpu", "--threads", "1", "--extra-images", "3000",
        "--extra-path", str(path), "--data-batch", "64", "--data-steps", "6",
        "--flop-model", "preact_resnet18", "--flop-width", "0.0625", "--flop-attack-steps", "1",
        "--json", str(tmp_path / "d.json"),
    ])  # fmt: skip
    d = result["data"]
    assert d["extra_images"] == 3000 and d["file_bytes"] > 3000 * 3072 and not path.exists()  # deleted
    assert d["extra_per_batch"] == 44 and d["steps"] == 6  # int(64 * 0.7) extra, 20 original
    assert d["delivered_img_s_cold"] > 0 and d["delivered_img_s_warm"] > 0 and d["peak_rss_mb"] > 0
    assert d["gflop_per_image"] > 0 and "40% MFU" in d["gpu_assumption"]
    assert d["gpu_consumed_img_s"] == pytest.approx(989.4 * 0.4 * 1e12 / (d["gflop_per_image"] * 1e9))
    assert d["margin"] == pytest.approx(d["delivered_img_s_cold"] / d["gpu_consumed_img_s"])
    assert json.loads((tmp_path / "d.json").read_text())["data"]["margin"] == pytest.approx(d["margin"])

    kept = bench.main([
        "--mode", "data", "--device", "cpu", "--extra-images", "500", "--extra-path", str(path),
        "--data-batch", "16", "--data-steps", "2", "--flop-model", "preact_resnet18",
        "--flop-width", "0.0625", "--flop-attack-steps", "1", "--keep",
    ])["data"]  # fmt: skip
    assert path.exists() and kept["file_kept"] and kept["write_s"] is not None
    again = bench.main([
        "--mode", "data", "--device", "cpu", "--extra-images", "500", "--extra-path", str(path),
        "--data-batch", "16", "--data-steps", "2", "--flop-model", "preact_resnet18",
        "--flop-width", "0.0625", "--flop-attack-steps", "1",
    ])["data"]  # fmt: skip
    assert (
        again["write_s"] is None and path.exists()
    )  # written once, reused; a given file the user kept stays
