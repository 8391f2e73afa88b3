"""The tiny-world experiment end to end on the small world: the real CLIs as subprocesses, 2 arms x 2 seeds."""

import json
import shutil

import pytest

from typer.testing import CliRunner

from cli.cache import app


def test_experiment_runs_summarises_and_resumes(tiny_world, tmp_path, capfd):
    world = tmp_path / "world"
    shutil.copytree(tiny_world.root, world)
    out = tmp_path / "exp"
    args = ["tiny-world", "experiment", str(world), "--arms", "grpo,ampo", "--seeds", "0,1", "--samples", "2",
            "--out", str(out), "max_steps=2", "prompts_per_step=4", "mini_batch_prompts=2", "group_size=4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = capfd.readouterr().out + result.output
    assert printed.count("$ ampo-train run --config") == 4 and printed.count("$ ampo-train eval") == 5
    assert "$ ampo-cache coverage" in printed

    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["results"]) == ["student", "grpo", "ampo"]
    hard = summary["results"]["ampo"]["test_level4"]["avg@n"]
    assert hard["n"] == 2 and hard["min"] <= hard["mean"] <= hard["max"]
    assert summary["results"]["student"]["overall"]["avg@n"]["n"] == 1
    # guidance never fires with it off, and every arm logged its guided fraction
    assert summary["results"]["grpo"]["training"]["guided_first_fifth"]["max"] == 0.0
    assert 0.0 <= summary["results"]["ampo"]["training"]["guided_first_fifth"]["mean"] <= 1.0
    # adaptive guidance answers only all-wrong groups; GRPO logs its all-wrong groups too
    for arm in ("grpo", "ampo"):
        training = summary["results"][arm]["training"]
        assert training["guided_first_fifth"]["mean"] <= training["all_wrong_first_fifth"]["mean"] <= 1.0
    for run in ("grpo/seed0", "grpo/seed1", "ampo/seed0", "ampo/seed1"):
        history = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in history] == [1, 2]
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | L1 avg@n") and table[0].endswith("step time / GRPO's |")
    assert len(table) == 2 + 3 and " ± " in table[3]
    assert table[3].endswith(" 1.00x |") and table[2].endswith(" - |")  # GRPO over GRPO; the student never trained
    assert table[4].split("|")[-2].strip().endswith("x")
    for png in ("results-learning_curves.png", "results-pass_at_k.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # Everything exists: a second invocation trains and evaluates nothing again.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    rerun = capfd.readouterr().out + again.output
    assert "$ ampo-cache build" in rerun  # (a no-op) ...
    assert "ampo-train run" not in rerun and "ampo-train eval" not in rerun


def test_experiment_rejects_unknown_arms(tiny_world, tmp_path):
    result = CliRunner().invoke(app, ["tiny-world", "experiment", str(tmp_path), "--arms", "grpo,magic"])
    assert result.exit_code == 2 and "unknown arm(s) magic" in result.output


def test_step_time_ratio_is_over_grpo_of_the_same_summary():
    from tinyworld.experiment import table_rows

    training = lambda seconds: {"training": {"step_time": {"mean": seconds, "std": 0.0, "min": seconds, "max": seconds, "n": 1}}}
    summary = {"seeds": [0], "results": {"student": {}, "grpo": training(2.0), "ampo": training(3.0)}}
    headings, rows = table_rows(summary)
    assert headings[-1] == "step time / GRPO's" and [r[-1] for r in rows] == ["-", "1.00x", "1.50x"]
    assert len(table_rows(summary, short=True)[1][0]) == len(table_rows(summary, short=True)[0])  # no column there
    del summary["results"]["grpo"]
    assert table_rows(summary)[1][-1][-1] == "-"  # nothing to divide by


def test_training_figures_by_hand():
    from tinyworld.experiment import training_figures

    # 10 steps: fifths of 2 steps. Guided 0.5, 0.3 first, 0.1, 0.0 last; all-wrong a step above.
    guided = [0.5, 0.3, 0.4, 0.4, 0.2, 0.2, 0.3, 0.1, 0.1, 0.0]
    history = [{"step": i + 1, "guidance/fraction": g, "groups/all_wrong": g + 0.1, "clip/fraction": 0.01 * i,
                "comprehension/picked": 0.6 if i % 2 else float("nan"), "comprehension/unpicked": 0.2,
                "guidance/k_mean": None if g == 0 else 1 + i % 3, "time/step": 1.0 + i}
               for i, g in enumerate(guided)]
    figures = training_figures(history)
    assert figures["guided_first_fifth"] == pytest.approx(0.4) and figures["guided_last_fifth"] == pytest.approx(0.05)
    assert figures["all_wrong_first_fifth"] == pytest.approx(0.5) and figures["all_wrong_last_fifth"] == pytest.approx(0.15)
    assert figures["clip_fraction"] == pytest.approx(0.045)  # mean of 0.00 .. 0.09
    assert figures["comprehension_picked"] == pytest.approx(0.6)  # NaN steps (nothing scored) left out
    assert figures["k_mean"] == pytest.approx(18 / 9)  # steps 1-9: k 1,2,3,1,2,3,1,2,3; step 10 guided nothing (null)
    assert figures["step_time"] == pytest.approx(5.5)  # median of 1 .. 10 s
    history[-1]["time/step"] = 600.0  # a step the machine stalled: the median holds
    assert training_figures(history)["step_time"] == pytest.approx(5.5)
    # GRPO logs no comprehension: the figure is absent, not NaN (results.json stays strict JSON)
    grpo = training_figures([{k: v for k, v in row.items() if not k.startswith("comprehension")} for row in history])
    assert "comprehension_picked" not in grpo and grpo["guided_first_fifth"] == pytest.approx(0.4)
