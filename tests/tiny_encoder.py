"""A tiny random BERT classifier (2 layers, hidden 32) with the MiniLM tokenizer, and toy labelled text."""
from __future__ import annotations

import random
from pathlib import Path

POS = ["good", "great", "lovely", "fine", "superb", "charming"]
NEG = ["bad", "awful", "dull", "poor", "boring", "weak"]
NOUNS = ["film", "movie", "story", "cast", "plot", "score"]


def tiny_bert_dir(root: Path, num_labels: int = 2) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorasweep.run.model import minilm_l6_dir

    out = root / f"tiny_bert_{num_labels}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(minilm_l6_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randint(0, 1)
        rows.append((f"a {rng.choice(POS if y else NEG)} {rng.choice(NOUNS)}", y))
    return rows


def write_glue_folder(folder: Path, n_train: int = 64, n_dev: int = 24, n_test: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("dev", n_dev, 2), ("test", n_test, 3)):
        lines = ["sentence\tlabel"] + [f"{s} \t{y}" for s, y in sentences(n, seed)]
        (folder / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return folder
