"""The seed report (bismap.report.seeds) and the time per stage (bismap.report.stage_times), on hand-made files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bismap.report.seeds import write_seed_summary
from bismap.report.spread import format_interval, mean_std, verdict
from bismap.report.stage_times import benchmark_seconds, stage_times

COMPONENTS = {"selftrain_bismap": {"maps": True, "stm": True, "consistency": True, "alignment": True, "rounds": 2,
                                   "distillation": False}}
BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def seed_summary(warmup: float, bismap: float, oracle: float, bismap_classes: dict) -> dict:
    """A per-seed report/summary.json as bismap.report.tables.write_summary writes it (two classes, a and b)."""
    def row(miou, classes, components=None):
        gain = miou - warmup
        return {"miou": miou, "per_class_iou": classes, "gain_over_warmup": gain,
                "gap_closed_percent": 100.0 * gain / (oracle - warmup), "components": components or {}}
    return {"warmup": row(warmup, {"a": 10.0, "b": 5.0}), "selftrain_bismap": row(bismap, bismap_classes,
                                                                                   COMPONENTS["selftrain_bismap"]),
            "oracle": row(oracle, {"a": 90.0, "b": 80.0}), "gap_warmup_to_oracle": oracle - warmup}


def write_benchmark(path: Path, *seconds: float) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{value}\t0:00:00\t100.0\t200.0\t50.0\t60.0\t0.0\t0.1\t50.0\t{value / 2}\n" for value in seconds)
    path.write_text(BENCHMARK_HEADER + rows)
    return str(path)


def hand_made_benchmarks(root: Path) -> dict[int, dict[str, list[str]]]:
    """Seed 0: warmup 10.5 s, evaluate 1.25 + 2.0 s, index 0.5 s; seed 1: 12.5, 1.75 + 2.5, 0.5 + 0.25 (2 rows)."""
    jobs = {0: {"warmup": [[10.5]], "evaluate": [[1.25], [2.0]], "index_dataset": [[0.5]]},
            1: {"warmup": [[12.5]], "evaluate": [[1.75], [2.5]], "index_dataset": [[0.5, 0.25]]}}
    return {seed: {rule: [write_benchmark(root / f"seed_{seed}" / f"{rule}_{job}.tsv", *rows)
                          for job, rows in enumerate(files)] for rule, files in rules.items()}
            for seed, rules in jobs.items()}


@pytest.fixture
def three_seeds(tmp_path) -> dict[int, Path]:
    summaries = {0: seed_summary(20.0, 30.0, 60.0, {"a": 40.0, "b": None}),
                 1: seed_summary(22.0, 31.0, 62.0, {"a": 50.0, "b": 10.0}),
                 2: seed_summary(24.0, 38.0, 70.0, {"a": 60.0, "b": 20.0})}
    paths = {}
    for seed, summary in summaries.items():
        paths[seed] = tmp_path / f"seed_{seed}" / "report" / "summary.json"
        paths[seed].parent.mkdir(parents=True)
        paths[seed].write_text(json.dumps(summary))
    return paths


def test_mean_and_sample_std_of_each_model_row(three_seeds, tmp_path):
    report = tmp_path / "report"
    result = write_seed_summary(three_seeds, hand_made_benchmarks(tmp_path / "bench"),
                                ["warmup", "selftrain_bismap", "oracle"], COMPONENTS,
                                report / "summary.md", report / "summary.json")
    assert json.loads((report / "summary.json").read_text())["seeds"] == [0, 1, 2]
    models = result["models"]
    assert result["seed_count"] == 3
    assert (models["warmup"]["miou"]["mean"], models["warmup"]["miou"]["std"]) == (22.0, 2.0)
    assert models["oracle"]["miou"]["mean"] == 64.0 and models["oracle"]["miou"]["std"] == pytest.approx(math.sqrt(28))
    bismap = models["selftrain_bismap"]
    assert bismap["miou"]["mean"] == 33.0 and bismap["miou"]["std"] == pytest.approx(math.sqrt(19))
    assert bismap["gain_over_warmup"]["values"] == [10.0, 9.0, 14.0]  # each seed against its own warmup
    assert bismap["gain_over_warmup"]["mean"] == 11.0
    assert bismap["gain_over_warmup"]["std"] == pytest.approx(math.sqrt(7))
    closed = [25.0, 22.5, 100 * 14 / 46]  # 10/40, 9/40, 14/46 of each seed's gap
    assert bismap["gap_closed_percent"]["mean"] == pytest.approx(sum(closed) / 3)
    assert bismap["gap_closed_percent"]["std"] == pytest.approx(
        math.sqrt(sum((value - sum(closed) / 3) ** 2 for value in closed) / 2))
    assert bismap["per_class_iou"]["a"]["mean"] == 50.0 and bismap["per_class_iou"]["a"]["std"] == 10.0
    assert bismap["per_class_iou"]["b"]["mean"] == 15.0  # seed 0's class b is undefined: left out
    assert bismap["per_class_iou"]["b"]["std"] == pytest.approx(math.sqrt(50))
    assert result["gap_warmup_to_oracle"]["mean"] == 42.0  # gaps 40, 40, 46
    markdown = (report / "summary.md").read_text()
    # gap closed: std of 25, 22.5, 30.43 = 4.06
    # gains 10, 9, 14: half-width t(0.975, 2) sqrt(7) / sqrt(3) = 4.3027 x 1.5275 = 6.57
    assert bismap["gain_over_warmup"]["ci95"] == pytest.approx([11.0 - 6.5725, 11.0 + 6.5725], abs=1e-4)
    assert ("| selftrain_bismap | ✓ | ✓ | ✓ | ✓ | 2 |  | 33.0 ± 4.4 | +11.0 ± 2.6 | [+4.4, +17.6] | +26.0 ± 4.1 |"
            in markdown)
    # the effect of a row is paired by seed: 30-20, 31-22, 38-24; its interval excludes 0
    assert ("| selftrain_bismap | MAPs, STM, consistency, alignment, self-training over warmup | +11.0 ± 2.6 | "
            "[+4.4, +17.6] | gain |") in markdown
    assert "| selftrain_bismap | 50.0 ± 10.0 | 15.0 ± 7.1 | 33.0 ± 4.4 |" in markdown
    assert "[seed 1](../seed_1/report/summary.md)" in markdown


def test_one_seed_has_no_std(three_seeds, tmp_path):
    result = write_seed_summary({2: three_seeds[2]}, {}, ["warmup", "selftrain_bismap"], COMPONENTS,
                                tmp_path / "one.md", tmp_path / "one.json")
    assert result["models"]["selftrain_bismap"]["miou"] == {"mean": 38.0, "std": None, "ci95": None, "values": [38.0]}
    assert json.loads((tmp_path / "one.json").read_text())["models"]["warmup"]["miou"]["std"] is None
    assert "| selftrain_bismap | ✓ | ✓ | ✓ | ✓ | 2 |  | 38.0 ± — | +14.0 ± — | — |" in (tmp_path / "one.md").read_text()


def test_stage_times_sum_the_s_column_over_jobs_and_average_over_seeds(tmp_path):
    benchmarks = hand_made_benchmarks(tmp_path)
    assert benchmark_seconds(benchmarks[1]["index_dataset"][0]) == 0.75  # two rows (benchmark repeats)
    times = stage_times(benchmarks)
    assert times["per_seed"] == {0: {"warmup": 10.5, "evaluate": 3.25, "index_dataset": 0.5},
                                 1: {"warmup": 12.5, "evaluate": 4.25, "index_dataset": 0.75}}
    stages = times["stages"]
    assert [stages[rule]["jobs"] for rule in ("warmup", "evaluate", "index_dataset")] == [1, 2, 1]
    assert stages["warmup"]["seconds"]["mean"] == 11.5 and stages["warmup"]["seconds"]["std"] == pytest.approx(2 ** 0.5)
    assert stages["evaluate"]["seconds"]["mean"] == 3.75 and stages["index_dataset"]["seconds"]["mean"] == 0.625
    assert times["total"]["values"] == [14.25, 17.5]
    assert times["total"]["mean"] == 15.875 and times["total"]["std"] == pytest.approx(3.25 / 2 ** 0.5)


def test_stage_table_in_the_report(three_seeds, tmp_path):
    write_seed_summary({0: three_seeds[0], 1: three_seeds[1]}, hand_made_benchmarks(tmp_path / "bench"),
                       ["warmup"], {}, tmp_path / "summary.md", tmp_path / "summary.json")
    table = (tmp_path / "summary.md").read_text().split("## Time per stage")[1]
    assert "| warmup | 1 | 11.5 ± 1.4 | 72.4 |" in table  # 11.5 / 15.875
    assert "| evaluate | 2 | 3.8 ± 0.7 | 23.6 |" in table
    assert "| **total** | 4 | 15.9 ± 2.3 | 100.0 |" in table


def test_a_file_that_is_not_a_benchmark_fails_naming_it(tmp_path):
    (tmp_path / "bad.tsv").write_text("seconds\n1.0\n")
    with pytest.raises(ValueError, match="bad.tsv is not a Snakemake benchmark"):
        benchmark_seconds(tmp_path / "bad.tsv")


def test_methods_side_by_side_with_per_class_iou_and_the_papers_number(three_seeds, tmp_path):
    """A family row joins the methods table and leaves BiSMAP's effect table (it is no ablation of BiSMAP)."""
    for seed, path in three_seeds.items():  # a CPSL row: the warmup's IoU plus 4 points on class a
        summary = json.loads(path.read_text())
        cpsl = json.loads(json.dumps(summary["warmup"]))
        cpsl["per_class_iou"]["a"] += 4.0 + seed
        cpsl["miou"] += 2.0 + seed / 2
        cpsl["gap_closed_percent"] = 100.0 * (2.0 + seed / 2) / summary["gap_warmup_to_oracle"]
        summary["selftrain_cpsl"] = cpsl
        path.write_text(json.dumps(summary))
    methods = {"warmup": "source", "selftrain_cpsl": "cpsl", "selftrain_bismap": "bismap", "oracle": "oracle"}
    write_seed_summary(three_seeds, {}, ["warmup", "selftrain_bismap", "selftrain_cpsl", "oracle"], COMPONENTS,
                       tmp_path / "summary.md", tmp_path / "summary.json", methods=methods)
    markdown = (tmp_path / "summary.md").read_text()
    table = markdown.split("## Methods side by side")[1]
    # class a: warmup 10 + 4, 5, 6; mIoU: 22, 24.5, 27 (warmups 20, 22, 24 plus 2, 2.5, 3)
    assert "| CPSL (paper 002) | selftrain_cpsl | 15.0 ± 1.0 | 5.0 ± 0.0 | 24.5 ± 2.5 |" in table
    assert "| 55.7 (CPSL Table 1, before distillation) |" in table
    assert "| BiSMAP self-training (paper 000) | selftrain_bismap | 50.0 ± 10.0 |" in table
    effects = markdown.split("## Effect of each component")[1].split("##")[0]
    assert "selftrain_cpsl" not in effects and "| selftrain_bismap |" in effects
    with pytest.raises(KeyError, match="no paper result for method 'dann'"):
        write_seed_summary(three_seeds, {}, ["warmup"], {}, tmp_path / "x.md", tmp_path / "x.json",
                           methods={"warmup": "dann"})


def test_two_seeds_give_a_wide_paired_interval_and_only_a_narrow_one_says_no_effect():
    two = mean_std([1.0, 3.0])  # mean 2, std sqrt(2): half-width t(0.975, 1) x sqrt(2) / sqrt(2) = 12.706
    assert two["ci95"] == pytest.approx([2.0 - 12.7062, 2.0 + 12.7062], abs=1e-4)
    assert verdict(two["ci95"]) == "not resolved"
    narrow = mean_std([0.1, -0.2, 0.0, 0.3, -0.1])  # mean 0.02, std 0.192: half-width 2.776 x 0.086 = 0.239
    assert narrow["ci95"] == pytest.approx([0.02 - 0.2389, 0.02 + 0.2389], abs=1e-3)
    assert verdict(narrow["ci95"]) == "no effect"
    assert verdict([0.2, 3.0]) == "gain" and verdict([-3.0, -0.2]) == "loss" and verdict(None) == "one seed"
    assert format_interval([-10.71, 14.71]) == "[-10.7, +14.7]" and format_interval(None) == "—"


def test_gap_closed_is_undefined_where_the_oracle_does_not_beat_the_warmup():
    from bismap.report.tables import gains

    rows = {"warmup": {"miou": 40.0}, "selftrain": {"miou": 46.0}, "oracle": {"miou": 35.0}}
    result = gains(rows)
    assert result["selftrain"] == {"gain_over_warmup": 6.0, "gap_closed_percent": None}
    rows["oracle"]["miou"] = 50.0
    assert gains(rows)["selftrain"]["gap_closed_percent"] == pytest.approx(60.0)
