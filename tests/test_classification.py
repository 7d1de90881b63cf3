"""Sequence classification: GLUE-layout and generic local data, bad input, a tiny BERT run end to end."""
import json
from pathlib import Path

import pytest

from conftest import compose
from lorasweep.run import classification as cls
from lorasweep import job
from lorasweep.config import DataConfig
from lorasweep.run.data import DataError
from lorasweep.run.record import read_record
from tiny_encoder import tiny_bert_dir, write_glue_folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("models"))


def _run(tmp_path, bert, *overrides):
    cfg = compose("model=minilm_l6", f"model.name_or_path={bert}", "model.name=tiny_bert", "logger=none",
                  f"results_dir={tmp_path / 'results'}", "study=c", "train.batch_size=8", "train.max_seq_len=32",
                  *overrides)
    return job.run(cfg, show_progress=False)


def test_glue_folder_splits_and_val_split(tmp_path):
    folder = write_glue_folder(tmp_path / "sst2")
    raw = cls.load_raw(DataConfig(name="sst2", path=str(folder)), num_labels=2)
    assert (len(raw["train"]), len(raw["val"]), len(raw["test"])) == (64, 24, 16)
    assert {r["label"] for r in raw["train"]} == {0, 1} and raw["train"][0]["text"].startswith("a ")
    raw = cls.load_raw(DataConfig(name="sst2", path=str(folder), val_split="test"), num_labels=2)
    assert len(raw["val"]) == 16 and raw["test"] == []


def test_shared_sst2_layout_if_present():
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
    if not folder.is_dir():
        pytest.skip("no ../shared/data/sst2 here")
    raw = cls.load_raw(DataConfig(name="sst2", path=str(folder), val_split="test"), num_labels=2)
    assert len(raw["val"]) == 872  # GLUE dev, labelled


def test_text_classification_csv_jsonl_and_class_names(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n"nice, really",pos\nterrible,neg\nok film,pos\nmeh,neg\n"so, so good",pos\n')
    dc = DataConfig(name="text_classification", path=str(csv), text_column="text", val_fraction=0.2)
    raw = cls.load_raw(dc, num_labels=2)
    rows = raw["train"] + raw["val"]
    assert len(raw["val"]) == 1 and len(rows) == 5
    assert {r["text"]: r["label"] for r in rows}["nice, really"] == 1  # neg=0, pos=1 (sorted names)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"review": s, "stars": y}) for s, y in [("a", 0), ("b", 2), ("c", 1)] * 3))
    raw = cls.load_raw(DataConfig(name="text_classification", path=str(jl), text_column="review",
                                  label_column="stars", val_fraction=0.3), num_labels=3)
    assert {r["label"] for r in raw["train"] + raw["val"]} == {0, 1, 2}


@pytest.mark.parametrize("content,fragment", [
    ("sentence\tlabels\nfine\t1\n", "label column 'label' not found"),
    ("sentence\tlabel\nfine\t1\nbad\t2\n", "label 2 in row 2, outside 0..1"),
    ("sentence\tlabel\n \t1\n\t0\n", "text column 'sentence' holds only empty strings"),
    ("text\tlabel\nfine\t1\n", "text column 'sentence' not found"),
])
def test_bad_input_names_file_and_column(tmp_path, content, fragment):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.tsv").write_text(content)
    with pytest.raises(DataError) as e:
        cls.load_raw(DataConfig(name="sst2", path=str(folder)), num_labels=2)
    assert fragment in str(e.value) and str(folder / "train.tsv") in str(e.value)


def test_bad_input_fails_the_run_before_weights_load(tmp_path, bert, monkeypatch):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\nfine\t7\n")
    from lorasweep.run import model as model_stage

    monkeypatch.setattr(model_stage, "build_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = _run(tmp_path, bert, "data=sst2", f"data.path={folder}")
    assert out.status == "failed" and "label 7" in out.error and "train.tsv" in out.error


def test_task_and_data_must_match(tmp_path, bert):
    out = _run(tmp_path, bert, "data=arithmetic")
    assert out.status == "failed" and "data=sst2 or data=text_classification" in out.error


def test_lora_head_run_end_to_end(tmp_path, bert):
    folder = write_glue_folder(tmp_path / "sst2")
    out = _run(tmp_path, bert, "data=sst2", f"data.path={folder}", "lora=r2_a4_qv", "train.max_steps=12",
               "optimizer.lr=5e-3")
    assert out.status == "completed", out.error
    m = read_record(Path(out.run_dir))["metrics"]
    for k in ("val/loss", "val/accuracy", "val/f1", "train/loss", "params/trainable"):
        assert k in m
    assert 0.0 <= m["val/accuracy"] <= 1.0 and m["val/examples"] == 24
    params = (Path(out.run_dir) / "params.tsv").read_text()
    trained = {l.split("\t")[0] for l in params.splitlines()[1:] if "\tTrue\t" in l}
    assert any("classifier" in n for n in trained)  # the head trains alongside LoRA
    assert all("lora_" in n or "classifier" in n for n in trained)
    assert "trainable" in params.splitlines()[-1]
    assert (Path(out.run_dir) / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("lora,expect", [("full", "all"), ("partial_qv", "qv"), ("partial_attention", "attn")])
def test_full_and_partial_on_an_encoder(tmp_path, bert, lora, expect):
    folder = write_glue_folder(tmp_path / "sst2", n_train=16, n_dev=8, n_test=4)
    out = _run(tmp_path, bert, "data=sst2", f"data.path={folder}", f"lora={lora}", "train.max_steps=2")
    assert out.status == "completed", out.error
    rows = [l.split("\t") for l in (Path(out.run_dir) / "params.tsv").read_text().splitlines()[1:-1]]
    trained = {n for n, t, _ in rows if t == "True"}
    if expect == "all":
        assert len(trained) == len(rows)
    else:
        mods = ("query", "value") if expect == "qv" else ("query", "key", "value", "attention.output.dense")
        assert trained and all(any(f".{m}." in n for m in mods) or n.startswith("classifier") for n in trained)
        assert any(n.startswith("classifier") for n in trained)


def test_f1_binary_and_macro():
    assert cls.f1_score([1, 1, 0, 0], [1, 0, 0, 1], 2) == pytest.approx(0.5)
    assert cls.f1_score([0, 1, 2], [0, 1, 2], 3) == 1.0
