"""The corpus-size benchmark: a minute budget becomes the same step count whatever the load, scaled
by a setting's speed; the queue runs the smallest corpora first; a run reports its plan in epochs."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus_sizes import SETTINGS, budget_steps, queue, rule_pick, shape, train_one  # noqa: E402
from conftest import sentence_corpus  # noqa: E402

SPEED = {"h256": 1.0, "h256+wdrop": 0.85, "h384": 0.5}


def test_a_budget_is_the_defaults_recorded_steps_times_the_settings_speed():
    assert budget_steps(2, SETTINGS["default"], SPEED) == 1718
    assert budget_steps(10, SETTINGS["d0.35"], SPEED) == 8569  # dropout does not change the speed
    assert budget_steps(10, SETTINGS["h384+d0.15"], SPEED) == round(8569 * 0.5)
    assert budget_steps(2, SETTINGS["d0.2+wdrop0.2"], SPEED) == round(1718 * 0.85)
    assert budget_steps(5, SETTINGS["default"], SPEED) == 5 * 857  # a budget with no recorded run
    assert shape({"weight_drop": 0.2, "hidden_size": 384}) == "h384+wdrop"


def test_the_queue_takes_a_budget_at_a_time_then_the_cells_in_order():
    cell_list = [("shakespeare", 100_000), ("python", 100_000), ("shakespeare", 300_000), ("python", 300_000)]
    runs = queue(cell_list, [2.0, 10.0], ["default", "d0.25"])
    assert runs[:4] == [("shakespeare", 100_000, 2.0, "default"), ("shakespeare", 100_000, 2.0, "d0.25"),
                        ("python", 100_000, 2.0, "default"), ("python", 100_000, 2.0, "d0.25")]
    assert {r[2] for r in runs[:8]} == {2.0} and len(runs) == 16


def test_a_run_trains_its_steps_and_counts_the_epochs_they_read():
    text = sentence_corpus(("the cat sat on the mat. ", "a dog ran to the log. "), 8_000)
    row = train_one(text, {"dropout": 0.25, "hidden_size": 32}, max_steps=12, threads=1)
    assert row["planned_steps"] == 12 and row["train_tokens"] == 7_200
    assert abs(row["planned_epochs"] - 12 * 32 * 64 / 7_200) < 1e-9
    steps, losses = zip(*row["curve"])
    assert steps[-1] == 12 and abs(row["final_val_loss"] - losses[-1]) < 1e-4
    assert abs(row["best_val_loss"] - min(losses)) < 1e-4 and row["best_step"] == steps[losses.index(min(losses))]


def test_the_table_names_the_grid_setting_that_auto_trains():
    assert rule_pick(2, 90_000)[0] == "d0.35+wdrop0.2"  # 100 KB read 39 times
    assert rule_pick(10, 1_003_855)[0] == "d0.15"  # tiny Shakespeare at 10 minutes
    assert rule_pick(2, 4_050_000)[0] == "default"  # 4.5 MB: under an epoch
    name, pick = rule_pick(10, 4_050_000)  # 4.5 MB at 10 minutes: the wider model, read 2.5 times
    assert name == "h384+d0.15" and pick["hidden_size"] == 384 and pick["dropout"] == 0.15
