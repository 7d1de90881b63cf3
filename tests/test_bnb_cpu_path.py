"""4-bit layers compute the same on every CPU: validation never rewrites the weights training uses.

bitsandbytes' fused AVX512-BF16 path re-packs a 4-bit weight in place on the first eval-mode forward
without grad (lorasweep.run.bnb_cpu); ``cpu_kind`` (conftest) runs each test as both kinds of CPU.
"""
import json
from pathlib import Path

import torch

from lorasweep.run.bnb_cpu import packed_layers
from lorasweep.run.model import build_model

CPU = torch.device("cpu")


def _ids():
    return torch.randint(5, 90, (2, 24), generator=torch.Generator().manual_seed(0))


def test_eval_forward_leaves_the_4bit_weights_as_loaded(tiny, cpu_kind):
    # hidden 48: q/k/v/o have 48 outputs, not a multiple of the fused path's 32-row tiles
    cfg = tiny("precision=nf4", "model.tiny_hidden=48")
    model = build_model(cfg.model, cfg.precision, CPU).model
    four_bit = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
                for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert len(four_bit) == 14  # 7 linears x 2 layers; lm_head stays unquantized
    ids = _ids()
    model.train()
    train_logits = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids).logits  # the validation forward
    assert packed_layers(model) == []
    for n, m in model.named_modules():
        if n in four_bit:
            assert torch.equal(m.weight.data, four_bit[n][0]) and torch.equal(m.weight.quant_state.absmax, four_bit[n][1]), n
    assert torch.allclose(eval_logits, train_logits.detach(), atol=1e-5)
    model.train()
    x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=x).logits.sum().backward()  # a 4-bit layer passes gradient to its input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_periodic_validation_does_not_change_4bit_training(tiny, cpu_kind):
    from lorasweep.job import run

    common = ["precision=nf4", "train.max_steps=8", "train.log_every=1", "train.num_threads=1"]
    a = run(tiny(*common, "study=a"), show_progress=False)
    b = run(tiny(*common, "study=b", "train.eval_every=2", "train.eval_examples=8"), show_progress=False)
    assert a.status == b.status == "completed"
    steps = [[json.loads(l)["train/loss"] for l in (Path(r.run_dir) / "steps.jsonl").read_text().splitlines()
              if "train/loss" in l] for r in (a, b)]
    assert len(steps[0]) == 8 and steps[0] == steps[1]
    assert a.metrics["val/loss"] == b.metrics["val/loss"]
