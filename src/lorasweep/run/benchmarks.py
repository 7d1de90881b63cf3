"""Benchmark evaluation with lm-evaluation-harness on the model already in memory.

lm-eval's built-in tasks read their data from the hub, so offline runs use task YAMLs with
local ``data_files`` (``dataset_path: json``); ``write_local_tasks`` writes such a pair from
prompt/target records. lm-eval is imported lazily: importing it costs ~7 s.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

from .. import quiet

# A fresh task index over lm-eval's ~15k built-in YAMLs takes 10+ s, so TaskManagers are
# kept per (include_path, include_defaults, fingerprint of the include_path YAMLs).
_TM_CACHE: dict[tuple, Any] = {}


# ----------------------------------------------------------------------------- task lookup
def _include_fingerprint(include_path: str | None) -> tuple:
    if not include_path:
        return ()
    root = Path(include_path)
    files = [root] if root.is_file() else sorted(root.rglob("*.yaml")) + sorted(root.rglob("*.yml"))
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    key = (str(include_path) if include_path else None, include_defaults, _include_fingerprint(include_path))
    tm = _TM_CACHE.get(key)
    if tm is None:
        tm = TaskManager(include_path=str(include_path) if include_path else None,
                         include_defaults=include_defaults)
        _TM_CACHE[key] = tm
    return tm


def _is_task_file(name: str) -> bool:
    # lm-eval also accepts a path to a task YAML in place of a name
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _resolve_task_manager(tasks: list[str], include_path: str | None):
    """Smallest TaskManager that knows every task: include_path alone when it suffices."""
    if include_path:
        tm = _task_manager(include_path, include_defaults=False)
        if all(t in tm.all_tasks or _is_task_file(t) for t in tasks):
            return tm
    return _task_manager(include_path, include_defaults=True)


def _builtin_task_names() -> list[str]:
    """Names of lm-eval's built-in tasks/groups/tags. Indexing them takes 10+ s, so the list is
    cached on disk per lm-eval install (~/.cache/lorasweep, or $LORASWEEP_CACHE_DIR)."""
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    stamp = f"{getattr(lm_eval, '__version__', '?')}-{tasks_dir.stat().st_mtime_ns}"
    cache_dir = Path(os.environ.get("LORASWEEP_CACHE_DIR") or Path.home() / ".cache" / "lorasweep")
    cache = cache_dir / "lm_eval_builtin_tasks.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("stamp") == stamp and data.get("tasks_dir") == str(tasks_dir):
            return list(data["names"])
    except (OSError, ValueError, KeyError):
        pass
    names = list(_task_manager(None, include_defaults=True).all_tasks)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "tasks_dir": str(tasks_dir), "names": names}))
        tmp.replace(cache)  # atomic: parallel sweep jobs may race here
    except OSError:
        pass  # read-only home: just no cache
    return names


def check_tasks(tasks: list[str], include_path: str | None) -> None:
    """Raise ValueError naming every unknown task (and its closest known names), before training.

    Tasks all found in include_path cost a small index (< 1 s); otherwise the built-in names are
    read from the on-disk cache (first time per install: ~13 s to index lm-eval's task YAMLs).
    """
    if not tasks:
        return
    local: list[str] = []
    if include_path:
        local = list(_task_manager(include_path, include_defaults=False).all_tasks)
    missing = [t for t in tasks if t not in local and not _is_task_file(t)]
    if not missing:
        return
    known = local + _builtin_task_names()
    known_set = set(known)
    problems = []
    for t in missing:
        if t in known_set:
            continue
        close = difflib.get_close_matches(t, known, n=3, cutoff=0.6)
        problems.append(f"{t} (closest: {', '.join(close)})" if close else f"{t} (no close match)")
    if problems:
        where = f" (searched {include_path} and lm-eval's built-in tasks)" if include_path else ""
        raise ValueError(f"unknown lm-eval task(s){where}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- local tasks
def write_local_tasks(folder: Path, name: str, records: list[dict], max_gen_toks: int = 16) -> Path:
    """Write offline lm-eval tasks ``<name>`` (generate_until, exact_match) and ``<name>_ll``
    (loglikelihood: acc = target is the greedy continuation, perplexity) over ``records``
    ``[{'prompt': ..., 'target': ...}]``; returns ``folder`` for use as include_path.

    The prompt ends where the answer starts, so ``target_delimiter`` is empty. A group
    ``<name>_all`` holding both tasks is written too. ``max_gen_toks`` is only the YAML default:
    evaluate_benchmarks overrides it with its max_new_tokens.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError(f"write_local_tasks({name!r}): no records")
    data = folder / f"{name}.jsonl"
    with data.open("w") as f:
        for r in records:
            f.write(json.dumps({"prompt": str(r["prompt"]), "target": str(r["target"])}) + "\n")

    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metadata": {"version": 1.0},
    }
    gen = {
        "task": name,
        **common,
        "output_type": "generate_until",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": int(max_gen_toks)},
        # exact match after stripping surrounding whitespace of generation and target
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "regexes_to_ignore": ["^\\s+", "\\s+$"]}],
    }
    ll = {
        "task": f"{name}_ll",
        **common,
        "output_type": "loglikelihood",
        # perplexity = exp(-mean per-example target log-likelihood) (lm-eval's definition)
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}],
    }
    group = {"group": f"{name}_all", "task": [name, f"{name}_ll"], "metadata": {"version": 1.0}}
    import yaml  # comes with transformers / lm-eval

    for fname, cfg in ((f"{name}.yaml", gen), (f"{name}_ll.yaml", ll), (f"{name}_all.yaml", group)):
        (folder / fname).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


# ----------------------------------------------------------------------------- evaluation
def flatten_results(results: dict, prefix: str = "eval") -> dict[str, float]:
    """lm-eval's {'task': {'acc,none': .., 'acc_stderr,none': ..}} -> {'prefix/task/acc': ..}.

    One rule: '<metric>,<filter>' -> metric if filter is 'none' else '<metric>_<filter>';
    '<metric>_stderr,<filter>' -> that name + '_stderr'. Non-numbers ('N/A', aliases) are skipped.
    """
    out: dict[str, float] = {}
    per_task = dict(results.get("groups") or {})
    per_task.update(results.get("results") or {})
    for task, metrics in per_task.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            if stderr:
                metric = metric[: -len("_stderr")]
            name = metric if filt == "none" else f"{metric}_{filt}"
            if stderr:
                name += "_stderr"
            out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def _jsonable(obj: Any, drop=object()) -> Any:
    """JSON-safe copy; objects with no JSON form (functions, task objects) are dropped."""
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, np.generic):
        return _jsonable(obj.item(), drop)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), drop)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = _jsonable(v, drop)
            if v is not drop:
                out[str(k)] = v
        return out
    if isinstance(obj, (list, tuple, set)):
        return [v for v in (_jsonable(x, drop) for x in obj) if v is not drop]
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__module__ == "torch" and type(obj).__name__ == "dtype":
        return str(obj)
    return drop


def _clean(obj: Any) -> Any:
    drop = object()
    out = _jsonable(obj, drop)
    return None if out is drop else out


@contextlib.contextmanager
def _quiet_progress(enabled: bool) -> Iterator[None]:
    """Hide lm-eval's and datasets' progress bars for the call only (module attributes restored)."""
    if enabled:
        yield
        return
    import datasets
    import lm_eval.api.model
    import tqdm as tqdm_pkg
    import lm_eval.api.task
    import lm_eval.models.huggingface as hf
    from tqdm import tqdm as _tqdm

    def quiet(*args, **kwargs):
        kwargs["disable"] = True
        return _tqdm(*args, **kwargs)

    # module-level `tqdm` names, plus the package attribute for lm-eval's function-local imports
    mods = [lm_eval.api.model, lm_eval.api.task, hf, tqdm_pkg]
    saved = [m.tqdm for m in mods]
    bars_on = datasets.is_progress_bar_enabled()
    try:
        for m in mods:
            m.tqdm = quiet
        datasets.disable_progress_bars()
        yield
    finally:
        for m, t in zip(mods, saved):
            m.tqdm = t
        if bars_on:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate_benchmarks(model, tokenizer, *, tasks: list[str], include_path: str | None = None,
                        limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                        max_new_tokens: int = 16, log_samples: bool = False, out_dir: Path | None = None,
                        prefix: str = "eval", device: str = "cpu", show_progress: bool = True,
                        max_length: int | None = None, bootstrap_iters: int = 1000) -> dict[str, float]:
    """Score the in-memory model (plain, 4-bit or peft-wrapped; no reload, no merge) with lm-eval.

    Returns ``{f'{prefix}/{task}/{metric}': value, f'{prefix}/time_s': seconds}`` (see
    flatten_results). Side effect: sets ``tokenizer.pad_token`` to its eos token when it has none.
    ``device`` is informational: HFLM runs the model where it already is.
    ``bootstrap_iters`` only affects stderr of non-mean metrics (e.g. perplexity); lm-eval's
    default is 100000, which forks a process pool.
    """
    if not tasks:
        return {}
    t0 = time.perf_counter()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit >= 1:
        limit = int(limit)  # a count (config gives floats); below 1 it is a fraction

    tm = _resolve_task_manager(list(tasks), include_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # lm-eval pads batches; mutates the caller's tokenizer

    modes = {name: m.training for name, m in model.named_modules()}
    model.eval()
    try:
        # only bootstrap in-process: a pool fork of a process holding the model is costly
        with _quiet_progress(show_progress), _env(DISABLE_MULTIPROC="1"), quiet.lm_eval_call(), torch.no_grad():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      max_length=max_length, device=device)
            results = simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                batch_size=batch_size, device=device,  # recorded in results['config'] only
                gen_kwargs={"max_gen_toks": int(max_new_tokens)}, log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
            )
    finally:
        for name, m in model.named_modules():
            if name in modes:
                m.training = modes[name]
    metrics = flatten_results(results, prefix)
    metrics[f"{prefix}/time_s"] = time.perf_counter() - t0

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = results.get("samples") or {}
        payload = {k: v for k, v in results.items() if k != "samples"}
        (out_dir / f"{prefix}_results.json").write_text(json.dumps(_clean(payload), indent=2))
        if log_samples:
            for task, rows in samples.items():
                with (out_dir / f"{prefix}_samples_{task}.jsonl").open("w") as f:
                    for row in rows:
                        f.write(json.dumps(_clean(row)) + "\n")
    return metrics
