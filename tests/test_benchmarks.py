"""Benchmark evaluation (lorasweep.run.benchmarks) on a tiny offline Llama and char-level tokenizer."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

import lm_eval.tasks  # noqa: E402  (imported up front so the check_tasks timing excludes it)
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from lorasweep.run import benchmarks as B  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
MAX_NEW = 4


def _tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.printable))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()  # characters join without spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def _model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return _model(tok)


def _greedy(model, tok, prompt: str) -> str:
    """What lm-eval's generate_until should produce: greedy, cut at newline / eos."""
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # as lm-eval decodes
    return text.split("\n")[0].split(tok.eos_token)[0]


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory, model, tok):
    """8 records, equal prompt lengths (no padding); targets 0,2,4,6 are the model's own greedy
    continuation, the others are wrong, so exact_match and acc must both be exactly 0.5."""
    records = []
    for i in range(8):
        prompt = f"Q: {i}+{i}=\nA:"
        greedy = _greedy(model, tok, prompt)
        assert greedy.strip(), "tiny model produced an empty continuation; change the seed"
        records.append({"prompt": prompt, "target": greedy if i % 2 == 0 else "~~"})
    return B.write_local_tasks(tmp_path_factory.mktemp("tasks"), "toy", records)


def _scores(metrics):
    return {k: v for k, v in metrics.items() if not k.endswith("/time_s")}


def test_local_tasks_score_what_they_promise(model, tok, toy_tasks):
    m = B.evaluate_benchmarks(model, tok, tasks=["toy", "toy_ll"], include_path=str(toy_tasks),
                              max_new_tokens=MAX_NEW, show_progress=False)
    assert m["eval/toy/exact_match"] == 0.5
    assert m["eval/toy_ll/acc"] == 0.5
    assert m["eval/toy_ll/perplexity"] > 1.0
    assert "eval/toy/exact_match_stderr" in m and m["eval/time_s"] > 0


def test_matches_lm_eval_directly(model, tok, toy_tasks):
    kw = dict(limit=6, num_fewshot=1)
    ours = B.evaluate_benchmarks(model, tok, tasks=["toy", "toy_ll"], include_path=str(toy_tasks),
                                 batch_size=4, max_new_tokens=MAX_NEW, show_progress=False, **kw)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    ref = simple_evaluate(model=lm, tasks=["toy", "toy_ll"],
                          task_manager=lm_eval.tasks.TaskManager(include_path=str(toy_tasks),
                                                                 include_defaults=False),
                          gen_kwargs={"max_gen_toks": MAX_NEW}, bootstrap_iters=1000, **kw)
    r = ref["results"]
    assert ours["eval/toy/exact_match"] == r["toy"]["exact_match,none"]
    assert ours["eval/toy/exact_match_stderr"] == r["toy"]["exact_match_stderr,none"]
    assert ours["eval/toy_ll/acc"] == r["toy_ll"]["acc,none"]
    assert ours["eval/toy_ll/perplexity"] == r["toy_ll"]["perplexity,none"]
    assert ref["n-shot"]["toy"] == 1 and ref["n-samples"]["toy"]["effective"] == 6
    assert _scores(ours) == B.flatten_results(ref)


MC_YAML = """\
task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _loglik(model, tok, ctx: str, cont: str) -> float:
    c, x = tok(ctx).input_ids, tok(cont).input_ids
    ids = torch.tensor([c + x])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(x))


def test_user_multiple_choice_yaml_via_include_path(model, tok, tmp_path):
    docs = [{"question": f"{a} plus {a}?", "choices": ["one", "two", "four", "ten"], "answer": a % 4}
            for a in range(5)]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "my_mc.yaml").write_text(MC_YAML.format(data=data))
    B.check_tasks(["my_mc"], str(tmp_path))
    m = B.evaluate_benchmarks(model, tok, tasks=["my_mc"], include_path=str(tmp_path), show_progress=False)
    # acc recomputed by hand: argmax of each choice's log-likelihood (" " target delimiter)
    hits = [max(range(4), key=lambda i: _loglik(model, tok, f"Question: {d['question']}\nAnswer:",
                                                " " + d["choices"][i])) == d["answer"] for d in docs]
    assert m["eval/my_mc/acc"] == pytest.approx(sum(hits) / len(docs))
    assert 0.0 <= m["eval/my_mc/acc_norm"] <= 1.0


def test_check_tasks_include_only_is_fast(toy_tasks, monkeypatch):
    def no_builtins():
        raise AssertionError("indexed the built-in tasks for include_path-only names")

    monkeypatch.setattr(B, "_builtin_task_names", no_builtins)  # the slow index is never touched
    B.check_tasks(["toy", "toy_ll", "toy_all"], str(toy_tasks))


def test_check_tasks_names_unknown_and_closest(toy_tasks, monkeypatch):
    # stand-in for the built-in list (the real one is covered by the slow test below)
    monkeypatch.setattr(B, "_builtin_task_names", lambda: ["hellaswag", "arc_easy"])
    with pytest.raises(ValueError) as err:
        B.check_tasks(["toy", "toy_lll", "hellaswg", "zzzzqqq", "arc_easy"], str(toy_tasks))
    msg = str(err.value)
    assert "toy_lll (closest: toy_ll" in msg and "hellaswg (closest: hellaswag)" in msg
    assert "zzzzqqq (no close match)" in msg and "arc_easy" not in msg.split(":", 1)[1].replace("closest", "")


@pytest.mark.slow
def test_check_tasks_builtin_names(tmp_path, monkeypatch):
    # indexes lm-eval's ~15k built-in task YAMLs (~13 s on 2 cores), then reads the disk cache
    monkeypatch.setenv("LORASWEEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(B, "_TM_CACHE", {})
    B.check_tasks(["hellaswag", "arc_easy"], None)
    with pytest.raises(ValueError, match=r"hellaswg \(closest: hellaswag"):
        B.check_tasks(["hellaswg"], None)
    assert (tmp_path / "lm_eval_builtin_tasks.json").is_file()
    monkeypatch.setattr(B, "_TM_CACHE", {})

    def no_index(*a, **kw):
        raise AssertionError("indexed lm-eval's tasks again instead of reading the disk cache")

    monkeypatch.setattr(B, "_task_manager", no_index)
    with pytest.raises(ValueError, match="arc_eazy"):
        B.check_tasks(["arc_eazy"], None)


def test_fresh_lora_scores_like_base(tok, toy_tasks):
    peft = pytest.importorskip("peft")
    base = _model(tok)
    kw = dict(tasks=["toy", "toy_ll"], include_path=str(toy_tasks), max_new_tokens=MAX_NEW, show_progress=False)
    before = _scores(B.evaluate_benchmarks(base, tok, **kw))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    after = _scores(B.evaluate_benchmarks(wrapped, tok, **kw))
    assert after == before
    # train/eval mode restored, module by module
    assert wrapped.training and all(m.training for m in wrapped.modules())


def test_results_json_and_samples(model, tok, toy_tasks, tmp_path):
    kw = dict(tasks=["toy_ll"], include_path=str(toy_tasks), limit=2, show_progress=False)
    B.evaluate_benchmarks(model, tok, out_dir=tmp_path / "a", prefix="final", **kw)
    res = json.loads((tmp_path / "a" / "final_results.json").read_text())
    assert "samples" not in res and res["results"]["toy_ll"]["acc,none"] in (0.0, 0.5, 1.0)
    assert not list((tmp_path / "a").glob("*samples*"))

    B.evaluate_benchmarks(model, tok, out_dir=tmp_path / "b", prefix="final", log_samples=True, **kw)
    res = json.loads((tmp_path / "b" / "final_results.json").read_text())
    assert "samples" not in res
    rows = (tmp_path / "b" / "final_samples_toy_ll.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[0])["doc"]["prompt"].startswith("Q: ")


def test_flatten_rule():
    res = {"results": {"t": {"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "exact_match,strict-match": 1.0, "exact_match_stderr,strict-match": "N/A",
                             "bleu,none": None}}}
    assert B.flatten_results(res, "p") == {"p/t/acc": 0.5, "p/t/acc_stderr": 0.1,
                                           "p/t/exact_match_strict-match": 1.0}


def test_no_tasks_is_a_no_op(model, tok):
    assert B.evaluate_benchmarks(model, tok, tasks=[]) == {}
    B.check_tasks([], None)
