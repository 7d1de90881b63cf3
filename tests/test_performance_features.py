"""Performance features keep the maths: packing, length grouping, base-model reuse, token cache."""
from __future__ import annotations

import collections

import pytest

torch = pytest.importorskip("torch")

from lorasweep.run import basecache  # noqa: E402
from lorasweep import job  # noqa: E402
from lorasweep.run import data as D  # noqa: E402
from lorasweep.run import model as M  # noqa: E402
from lorasweep.run.cache import cached_examples  # noqa: E402
from lorasweep.config import DataConfig, ModelConfig, PrecisionConfig, TrainConfig  # noqa: E402
from lorasweep.run.packing import fill_rate, pack_examples  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model():
    lm = M.build_model(ModelConfig(name="tiny_llama", name_or_path="builtin:tiny_llama"), PrecisionConfig(),
                       torch.device("cpu"))
    return lm.model, lm.tokenizer


def _examples(tok, n=24, train_on_prompt=True, **kw):
    dc = DataConfig(name="arithmetic", n_train=n, n_val=2, n_test=0, train_on_prompt=train_on_prompt, **kw)
    return D.tokenize(D.load_raw(dc)["train"], tok, dc, 256)


def _varied(tok, n=24):
    """Examples of different lengths: pad the answers so lengths differ by up to ~60 tokens."""
    ex = _examples(tok, n)
    for i, e in enumerate(ex):
        extra = list(e["input_ids"][-4:-1]) * (i % 20)
        e["input_ids"] = e["input_ids"][:-1] + extra + e["input_ids"][-1:]
        e["labels"] = e["labels"][:-1] + extra + e["labels"][-1:]
    return ex


def _token_losses(model, batch):
    """Per-token losses in the order of the label tokens, summed in float64."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=D.IGNORE, reduction="none")
    return loss[labels.reshape(-1) != D.IGNORE]


@pytest.mark.parametrize("train_on_prompt", [True, False])
def test_packed_batch_gives_the_unpacked_loss(tiny_model, train_on_prompt):
    model, tok = tiny_model
    model.eval()
    ex = _varied(tok) if train_on_prompt else _examples(tok, train_on_prompt=False)
    packed = pack_examples(ex, 256, seed=0)
    assert len(packed) < len(ex) and sum(p["n_pieces"] for p in packed) == len(ex)
    pb, ub = D.collate(packed, tok.pad_token_id), D.collate(ex, tok.pad_token_id)
    assert "attention_mask" not in pb and pb["n_loss_tokens"] == ub["n_loss_tokens"]
    assert pb["n_tokens"] == ub["n_tokens"] == sum(len(e["input_ids"]) for e in ex)
    with torch.no_grad():
        lp, lu = _token_losses(model, pb), _token_losses(model, ub)
        assert lp.numel() == lu.numel() == ub["n_loss_tokens"]
        assert abs(lp.mean().item() - lu.mean().item()) < 1e-5
        # the model's own loss (what train() optimises) agrees too, in train mode with the cache off
        model.train()
        model.config.use_cache = False
        try:
            hf = model(input_ids=pb["input_ids"], position_ids=pb["position_ids"], labels=pb["labels"]).loss
        finally:
            model.config.use_cache = True
            model.eval()
        assert abs(hf.item() - lu.mean().item()) < 1e-5


def test_packing_keeps_every_example_once_and_fills_rows(tiny_model):
    _, tok = tiny_model
    ex = _varied(tok, 40)
    packed = pack_examples(ex, 200, seed=3)
    assert all(len(p["input_ids"]) <= 200 for p in packed)
    # each piece restarts its positions at 0; the concatenation of pieces is the examples, once each
    pieces = collections.Counter()
    for p in packed:
        starts = [i for i, x in enumerate(p["position_ids"]) if x == 0] + [len(p["input_ids"])]
        assert len(starts) - 1 == p["n_pieces"]
        for a, b in zip(starts, starts[1:]):
            pieces[tuple(p["input_ids"][a:b])] += 1
            assert p["labels"][a] == D.IGNORE
    assert pieces == collections.Counter(tuple(e["input_ids"]) for e in ex)
    assert fill_rate(packed, 200) > 0.8


def test_group_by_length_keeps_every_example_exactly_once(tiny_model):
    _, tok = tiny_model
    ex = _varied(tok, 37)
    for e, i in zip(ex, range(len(ex))):
        e["id"] = i
    b = D.Batches(ex, batch_size=4, pad_id=tok.pad_token_id, shuffle=True, seed=0, group_by_length=True)
    for epoch in (0, 1):
        order = b.order(epoch)
        assert sorted(order) == list(range(len(ex)))
        seen = sum(x["input_ids"].shape[0] for x in b.epoch(epoch))
        assert seen == len(ex)
    plain = D.Batches(ex, batch_size=4, pad_id=tok.pad_token_id, shuffle=True, seed=0)
    pad = lambda bs: sum(x["input_ids"].numel() - x["n_tokens"] for x in bs.epoch(0))  # noqa: E731
    assert pad(b) < pad(plain)


def test_token_cache_hit_returns_identical_examples(tiny_model, tmp_path):
    _, tok = tiny_model
    dc = DataConfig(name="arithmetic", n_train=30, n_val=2, n_test=0)
    rows = D.load_raw(dc)["train"]
    calls = []

    def compute():
        calls.append(1)
        return D.tokenize(rows, tok, dc, 64)

    settings = {"template": dc.template, "train_on_prompt": False, "max_len": 64}
    first, hit1 = cached_examples(rows, tok, settings, compute, directory=tmp_path)
    second, hit2 = cached_examples(rows, tok, settings, compute, directory=tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == 1 and second == first
    # any change to what decides the tokens is a miss
    _, hit3 = cached_examples(rows, tok, {**settings, "max_len": 32}, compute, directory=tmp_path)
    _, hit4 = cached_examples(rows[1:], tok, settings, compute, directory=tmp_path)
    assert not hit3 and not hit4


def test_reused_base_is_bit_identical_and_gives_the_fresh_result(tiny, tmp_path):
    basecache.drop()
    try:
        fresh = job.run(tiny("train.reuse_base=false", "rerun=true", "train.num_threads=1"), show_progress=False)
        a = job.run(tiny("train.reuse_base=true", "rerun=true", "train.num_threads=1"), show_progress=False)
        digest = basecache._entry.digest
        pristine = {k: v.clone() for k, v in basecache._entry.loaded.model.state_dict().items()}
        b = job.run(tiny("train.reuse_base=true", "rerun=true", "train.num_threads=1"), show_progress=False)
        assert [o.status for o in (fresh, a, b)] == ["completed"] * 3
        assert (a.metrics["model/base_reused"], b.metrics["model/base_reused"]) == (0, 1)
        assert fresh.metrics["train/loss"] == a.metrics["train/loss"] == b.metrics["train/loss"]
        base = basecache._entry.loaded.model
        assert basecache.weights_hash(base) == digest
        after = base.state_dict()
        assert after.keys() == pristine.keys() and all(torch.equal(after[k], pristine[k]) for k in pristine)
        assert not any("lora" in n for n, _ in base.named_parameters())
        # a run the cache cannot serve (another rank is fine; full fine-tuning is not) evicts it
        c = job.run(tiny("train.reuse_base=true", "lora=full", "rerun=true", "train.num_threads=1"), show_progress=False)
        assert c.status == "completed" and c.metrics["model/base_reused"] == 0 and basecache._entry is None
    finally:
        basecache.drop()


def test_weights_hash_sees_a_single_changed_bit(tiny_model):
    model, _ = tiny_model
    h = basecache.weights_hash(model)
    p = next(model.parameters())
    with torch.no_grad():
        old = p.view(-1)[0].clone()
        p.view(-1)[0] = torch.nextafter(old, old + 1)
        try:
            assert basecache.weights_hash(model) != h
        finally:
            p.view(-1)[0] = old
    assert basecache.weights_hash(model) == h


def test_packing_runs_end_to_end(tiny):
    out = job.run(tiny("train.packing=true", "rerun=true", "train.num_threads=1"), show_progress=False)
    assert out.status == "completed", out.error
    assert out.metrics["train/tokens"] > 0 and out.metrics["val/loss"] > 0


def test_train_config_defaults():
    tc = TrainConfig()
    assert tc.packing is False and tc.reuse_base is False
