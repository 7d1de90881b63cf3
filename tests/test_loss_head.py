"""The labelled-positions loss (loss.py) equals the model's own loss, and its gradients, exactly.

Tiny Llamas built from a config (fp32, CPU); the chunk size is shrunk so every batch spans
several chunks. The reference is transformers' own ``model(..., labels=...).loss`` (a mean over
the shifted, non-ignored labels); ``batch_loss_sum`` returns the sum, so it is divided by the count.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from lorasweep.run import loss as L

VOCAB = 97
IGNORE = -100


def _llama(tied: bool, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied, pad_token_id=0, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _lora(model, head: str | None = None):
    """LoRA on every linear layer; ``head``: None, 'modules_to_save' (a trained copy of lm_head)
    or 'lora' (LoRA on lm_head too)."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if head == "lora":
        targets.append("lm_head")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                     modules_to_save=["lm_head"] if head == "modules_to_save" else None)
    model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # B != 0, so LoRA (and its gradients on A) really take part
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def _unpacked_batch(seed: int = 0) -> dict:
    """Rows of different lengths (right padding), the prompt of each masked."""
    g = torch.Generator().manual_seed(seed)
    lens, prompts = [20, 13, 17, 6], [12, 5, 16, 3]
    T = max(lens)
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    labels = torch.full((len(lens), T), IGNORE)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, (n, p) in enumerate(zip(lens, prompts)):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        labels[i, p:n] = ids[i, p:n]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _packed_batch(seed: int = 0) -> dict:
    """Two rows, each holding several examples with their own position ids (packing.py's layout)."""
    from lorasweep.run.packing import join

    g = torch.Generator().manual_seed(seed)

    def example(n, p):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [IGNORE] * p + ids[p:]}

    rows = [join([example(9, 4), example(7, 3), example(8, 6)]), join([example(14, 5), example(10, 2)])]
    T = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (T - len(xs))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], IGNORE) for r in rows]),
            "position_ids": torch.tensor([pad(r["position_ids"], 0) for r in rows])}


def _n_labelled(batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _compare(model, batch):
    """(own mean loss, ours / n) and their gradients on every trainable parameter."""
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert L.split_head(model) is not None  # the labelled path, not the fallback, is under test
    model.zero_grad(set_to_none=True)
    own = model(**batch).loss
    own.backward()
    g_own = _grads(model)
    model.zero_grad(set_to_none=True)
    ours = L.batch_loss_sum(model, batch) / _n_labelled(batch)
    ours.backward()
    g_ours = _grads(model)
    model.zero_grad(set_to_none=True)
    assert abs(ours.item() - own.item()) <= 1e-6, (ours.item(), own.item())
    assert g_ours.keys() == g_own.keys() and set(g_own) == set(trainable)
    for n in g_own:
        torch.testing.assert_close(g_ours[n], g_own[n], atol=1e-5, rtol=0, msg=n)
        # and relative to each gradient's size, so that small gradients are checked too
        assert float((g_ours[n] - g_own[n]).norm()) <= 1e-4 * float(g_own[n].norm()) + 1e-12, n
    return ours.item()


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # 10 positions per chunk: every batch below spans several chunks
    monkeypatch.setattr(L, "CHUNK_BYTES", 10 * 4 * VOCAB)
    assert L.chunk_positions(VOCAB) == 10


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head", [None, "modules_to_save", "lora"], ids=["frozen_head", "head_copy_trained", "head_lora"])
@pytest.mark.parametrize("batch", [_unpacked_batch, _packed_batch], ids=["unpacked", "packed"])
def test_labelled_loss_and_grads_equal_the_models_own(tied, head, batch):
    model = _lora(_llama(tied), head)
    parts = L.split_head(model)
    assert parts is not None and parts.backbone is model.base_model.model.model
    _compare(model, batch())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_full_fine_tuning_with_tied_embeddings(tied):
    model = _llama(tied)  # no peft: every weight trains, the tied table gets both gradients
    _compare(model, _unpacked_batch(1))


def test_gradient_checkpointing():
    model = _llama(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = _lora(model)
    _compare(model, _packed_batch(2))


def test_full_mode_is_the_models_forward_and_agrees():
    model = _lora(_llama(True))
    b = _unpacked_batch(3)
    calls = []
    h = model.base_model.model.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:
        full = L.batch_loss_sum(model, b, head="full")
        labelled = L.batch_loss_sum(model, b)
    finally:
        h.remove()
    assert abs(float(full) - float(labelled)) <= 1e-6 * _n_labelled(b)
    B, T = b["input_ids"].shape
    assert calls[0] == (B, T, 32)  # full: the head at every position
    n = _n_labelled(b)
    assert sum(c[0] for c in calls[1:]) == n and all(len(c) == 2 for c in calls[1:])  # labelled: n rows, in chunks
    assert len(calls[1:]) == -(-n // 10)


def test_no_labelled_position_gives_zero_and_zero_grads():
    model = _lora(_llama(False))
    b = _unpacked_batch(4)
    b["labels"][:] = IGNORE
    loss = L.batch_loss_sum(model, b)
    assert float(loss) == 0.0 and torch.isfinite(loss)
    loss.backward()  # the train loop always calls backward: it must work
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any()), n
    with torch.no_grad():
        assert float(L.batch_loss_sum(model, b)) == 0.0


def test_no_grad_path_equals_the_grad_path():
    model = _lora(_llama(False))
    b = _packed_batch(5)
    with torch.no_grad():
        a = L.batch_loss_sum(model, b)
    assert abs(float(a) - float(L.batch_loss_sum(model, b))) <= 1e-5


def test_classification_keeps_the_models_own_loss():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg)
    b = {"input_ids": torch.randint(1, VOCAB, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long),
         "labels": torch.tensor([0, 2, 1, 2])}
    assert abs(float(L.batch_loss_sum(model, b)) - 4 * float(model(**b).loss)) <= 1e-5


def test_models_that_transform_their_logits_keep_their_own_forward():
    model = _llama(False)
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style: lm_head alone is not the logits
    assert L.split_head(model) is None
    assert L.describe(model, "labelled", torch.device("cpu")).startswith("full")
    model.config.final_logit_softcapping = None
    assert L.describe(model, "labelled", torch.device("cpu")) == "labelled: torch, chunks of 10 positions"


def test_4bit_base():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training

    model = _llama(False)
    for layer in model.model.layers:  # the decoder's linears in nf4, as a QLoRA load leaves them
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                          quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4").to("cpu")
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _compare(_lora(model), _unpacked_batch(6))


@pytest.mark.slow
def test_benchmark_script_runs_both_paths_and_they_agree(tmp_path):
    """benchmarks/bench_loss_head.py, tiny: tiny_llama and a 2,000-token-vocabulary Llama on a
    generated alpaca-format file; one alternating trial per path."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Spell the number {i} in words.", "input": "",
                                 "output": f"The number {i} is written " + "one two three four " * (1 + i % 4)}
                                for i in range(40)]))
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_loss_head.py"), "--model", "tiny_llama",
                        "--shapes", "quickstart,llama3_vocab", "--steps", "1", "--repeats", "1", "--vocab", "2000",
                        "--hidden", "64", "--seq", "256", "--batch", "2", "--data", str(data),
                        "--alpaca-examples", "40", "--json", str(out)],
                       capture_output=True, text=True, cwd=repo / "benchmarks", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = {r["shape"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"quickstart", "llama3_vocab"}
    for r in results.values():
        assert r["max_loss_diff"] <= 1e-5  # the two paths train the same
        for path in ("labelled", "full"):
            assert r[path]["tok_per_cpu_s"] > 0 and r[path]["peak_gb"] > 0
        assert 0 < r["labelled_per_batch"] < r["batch"] * r["seq"]  # prompts are masked: fewer positions
    assert results["llama3_vocab"]["vocab"] == 2000
    assert "speed (CPU)" in p.stdout and "labelled: torch, chunks of" in p.stdout


@pytest.mark.slow
def test_compile_warm_up_trains_nothing_and_is_undone():
    """train.compile: the decoder compiled in place, a warm-up step that leaves weights, gradients
    and RNG as they were, the same loss afterwards, and eager again after uncompile (torch.compile's
    'eager' backend here: dynamo's tracing without inductor's C++ build)."""
    from lorasweep.run import compiling
    from lorasweep.config import TrainConfig
    from lorasweep.run.data import Batches

    torch.manual_seed(0)
    model = _lora(_llama(False))
    model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p = 0.1  # RNG in play
    b = _unpacked_batch(7)
    examples = [{"input_ids": r[m.bool()].tolist(), "labels": l[m.bool()].tolist()}
                for r, l, m in zip(b["input_ids"], b["labels"], b["attention_mask"])]
    train = Batches(examples, 4, pad_id=0, shuffle=False, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    assert compiling.compile_for_training(model, train, TrainConfig(compile=False), device=torch.device("cpu"),
                                          autocast_dtype=None) == {}
    out = compiling.compile_for_training(model, train, TrainConfig(compile=True), device=torch.device("cpu"),
                                         autocast_dtype=None, backend="eager")
    assert out["time/compile_s"] > 0
    backbone = L.split_head(model).backbone
    assert backbone._compiled_call_impl is not None
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n]), n
    model.eval()  # no dropout: compiled and eager give the same loss
    compiled_loss = L.batch_loss_sum(model, b).item()
    compiling.uncompile(model)
    assert backbone._compiled_call_impl is None
    assert abs(compiled_loss - L.batch_loss_sum(model, b).item()) <= 1e-4


def test_config_field_is_checked_and_only_a_change_moves_the_run_id():
    from conftest import compose
    from lorasweep.config import ConfigError, config_hash, validate

    with pytest.raises(ConfigError, match=r"train.loss_head='everywhere': must be labelled"):
        validate(compose("model=tiny_llama", "train.loss_head=everywhere"))
    default = compose("model=tiny_llama")
    assert default.train.loss_head == "labelled" and default.train.compile is False
    # at the defaults the hash is what it was before the fields existed; a comparison run gets its own id
    same = config_hash(compose("model=tiny_llama", "train.loss_head=labelled", "train.compile=false"))
    assert same == config_hash(default)
    assert config_hash(compose("model=tiny_llama", "train.loss_head=full")) != config_hash(default)
    assert config_hash(compose("model=tiny_llama", "train.compile=true")) != config_hash(default)


@pytest.mark.gpu
@pytest.mark.parametrize("head", [None, "modules_to_save"], ids=["frozen_head", "head_copy_trained"])
def test_cuda_loss_path_equals_the_models_own(head):
    """On CUDA a plain lm_head goes to Liger's fused kernel when liger-kernel is installed (else the
    torch chunks); an adapted head always takes the torch chunks. Same loss and gradients either way."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    model = _lora(_llama(True), head).to(device)
    fused = head is None and L._liger_loss() is not None
    assert L.describe(model, "labelled", device).startswith("labelled: liger-kernel" if fused else "labelled: torch")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 to fp32: the comparison is about the loss path
    b = {k: v.to(device) for k, v in _packed_batch(8).items()}
    model.train()
    own = model(**b).loss
    own.backward()
    g_own = _grads(model)
    model.zero_grad(set_to_none=True)
    ours = L.batch_loss_sum(model, b) / _n_labelled(b)
    ours.backward()
    g_ours = _grads(model)
    assert abs(ours.item() - own.item()) <= 1e-5
    for n in g_own:
        torch.testing.assert_close(g_ours[n], g_own[n], atol=1e-5, rtol=1e-4, msg=n)


def test_every_listed_model_computes_its_logits_as_the_bare_head():
    """BARE_HEAD is what lets the labelled path replace a model's forward: each listed class's forward
    (in the installed transformers) must assign its logits only as lm_head(hidden)."""
    import inspect
    import re

    for name in sorted(L.BARE_HEAD):
        cls = getattr(transformers, name)
        src = inspect.getsource(cls.forward)
        assigned = [l.strip() for l in src.splitlines()
                    if re.match(r"\s*(lm_)?logits = ", l) and not l.rstrip().endswith(",")]  # statements, not keywords
        assert assigned and all(re.fullmatch(r"(lm_)?logits = self\.lm_head\(hidden_states\)(\.contiguous\(\))?", a)
                                for a in assigned), (name, assigned)


def test_falcon_h1_and_gemma_3n_keep_their_own_forward():
    """Falcon-H1 multiplies lm_head's output by lm_head_multiplier; Gemma-3n softcaps (its setting in
    text_config): the labelled path would train another loss, so both take the full one, and say why."""
    falcon = transformers.FalconH1ForCausalLM(transformers.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
        mamba_n_groups=1, mamba_chunk_size=8, lm_head_multiplier=4.0))
    assert L.split_head(falcon) is None
    why = L.describe(falcon, "labelled", torch.device("cpu"))
    assert why.startswith("full: FalconH1ForCausalLM is not on the list"), why
    b = _unpacked_batch()
    with torch.no_grad():
        own = falcon(**{k: v for k, v in b.items() if k != "labels"}).logits
    want = torch.nn.functional.cross_entropy(own[:, :-1].reshape(-1, own.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")
    with torch.no_grad():
        assert float(L.batch_loss_sum(falcon, b)) == pytest.approx(float(want), rel=1e-6)  # the model's own loss

    model = _llama(False)
    model.config.lm_head_multiplier = 4.0  # a transform field set on a listed class's config: taken as meant
    assert L.split_head(model) is None and "lm_head_multiplier=4.0" in L.describe(model, "labelled", torch.device("cpu"))
