"""lm-eval inside a run: generated arithmetic tasks, base-model scores, deltas, early task check."""
import json
from pathlib import Path

from lorasweep import job


def test_arithmetic_benchmark_with_baseline_and_delta(tiny):
    out = job.run(tiny("eval=arithmetic", "eval.limit=6", "train.max_steps=2"), show_progress=False)
    assert out.status == "completed", out.error
    m = out.metrics
    for prefix in ("eval", "eval_base"):
        assert f"{prefix}/lorasweep_arithmetic/exact_match" in m
        assert f"{prefix}/lorasweep_arithmetic_ll/acc" in m
    assert "eval_delta/lorasweep_arithmetic_ll/acc" in m
    assert m["time/eval_s"] > 0 and m["time/eval_base_s"] > 0
    res = json.loads((Path(out.run_dir) / "eval_results.json").read_text())
    assert "lorasweep_arithmetic" in res["results"]
    assert "samples" not in res


def test_max_steps_zero_scores_the_base_model_only(tiny):
    out = job.run(tiny("eval=arithmetic", "eval.limit=4", "eval.baseline=false", "train.max_steps=0"),
                       show_progress=False)
    assert out.status == "completed", out.error
    assert out.metrics["train/steps"] == 0 and "eval/lorasweep_arithmetic_ll/acc" in out.metrics


def test_unknown_task_fails_before_training(tiny):
    out = job.run(tiny("eval=arithmetic", "eval.tasks=[lorasweep_arithmetc]", "train.max_steps=500"),
                       show_progress=False)
    assert out.status == "failed"
    assert "lorasweep_arithmetc" in out.error and "closest: lorasweep_arithmetic" in out.error
    assert "train/steps" not in out.metrics and "time/load_s" not in out.metrics  # before any weights load


def test_user_task_yaml_through_include_path(tiny, tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{i} plus one is", "choices": [str(i + 1), str(i + 5)], "label": 0})
                              for i in range(4)) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: my_plus_one\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    out = job.run(tiny("eval=tasks", "eval.tasks=[my_plus_one]", f"eval.include_path={tasks}",
                            "train.max_steps=1"), show_progress=False)
    assert out.status == "completed", out.error
    assert 0.0 <= out.metrics["eval/my_plus_one/acc"] <= 1.0


def test_base_scores_are_shared_by_runs_of_one_base(tiny):
    a = job.run(tiny("eval=arithmetic", "eval.limit=4", "train.max_steps=1", "lora.r=2"), show_progress=False)
    b = job.run(tiny("eval=arithmetic", "eval.limit=4", "train.max_steps=1", "lora.r=4"), show_progress=False)
    assert a.status == b.status == "completed"
    assert "eval_base/reused" not in a.metrics and b.metrics["eval_base/reused"] == 1
    for k, v in a.metrics.items():
        if k.startswith("eval_base/"):
            assert b.metrics[k] == v
    c = job.run(tiny("eval=arithmetic", "eval.limit=4", "train.max_steps=1", "precision=bf16_true"),
                     show_progress=False)
    assert "eval_base/reused" not in c.metrics  # another precision is another base
