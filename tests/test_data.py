"""Data: deterministic arithmetic splits, prompt masking, batching."""
import pytest

from conftest import compose
from lorasweep.run.data import IGNORE, Batches, DataError, arithmetic_splits, read_records, tokenize


def test_arithmetic_is_deterministic_and_disjoint():
    dc = compose("model=tiny_llama").data
    a, b = arithmetic_splits(dc), arithmetic_splits(dc)
    assert a == b
    train_q = {r["instruction"] for r in a["train"]}
    assert not train_q & {r["instruction"] for r in a["test"]}
    assert not train_q & {r["instruction"] for r in a["val"]}
    r = a["train"][0]
    x, op, y = r["instruction"].split("?")[0].split()[-3:]
    assert int(r["output"]) == (int(x) + int(y) if op == "+" else int(x) - int(y))


def test_loss_is_masked_on_the_prompt_by_default():
    from lorasweep.run.model import char_tokenizer

    tok = char_tokenizer()
    dc = compose("model=tiny_llama", "data.template=alpaca").data
    rows = [{"instruction": "What is 2 + 2?", "input": "", "output": "4"}]
    (ex,) = tokenize(rows, tok, dc, 512)
    trained = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE]
    assert tok.decode(trained) == "4</s>"
    dc.train_on_prompt = True
    (ex,) = tokenize(rows, tok, dc, 512)
    assert all(l != IGNORE for l in ex["labels"])


def test_group_by_length_keeps_every_example_once():
    ex = [{"input_ids": [1] * n, "labels": [1] * n} for n in range(3, 60)]
    b = Batches(ex, 4, 0, shuffle=True, seed=0, group_by_length=True)
    seen = sorted(int(m.sum()) for batch in b.epoch(0) for m in batch["attention_mask"])
    assert seen == list(range(3, 60))


def test_records_missing_fields_are_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"instruction": "a"}\n')
    from lorasweep.run.data import instruction_records

    with pytest.raises(DataError, match="record 1 needs 'instruction' and 'output'"):
        instruction_records(read_records(str(f)), "x")
