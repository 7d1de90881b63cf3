"""Training, validation and lm-eval see the same token ids for the same prompt and answer."""
from __future__ import annotations

import string

import pytest
import torch

from lorasweep.run import data as data_stage
from lorasweep.run import model as model_stage
from lorasweep.config import DataConfig, ModelConfig, PrecisionConfig


def sentencepiece_llama_tokenizer():
    """A Llama-2-style tokenizer (BPE over Metaspace "▁" pieces, BOS added), trained here offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = ["Below is an instruction that describes a task. Write a response that appropriately completes the request.",
             "### Instruction:", "### Response:", "What is 12 + 34? Answer with the number only.",
             "The quick brown fox jumps over the lazy dog 0123456789"] * 20
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tk.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=list(string.printable) + ["▁"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def _lm(tokenizer):
    from lm_eval.models.huggingface import HFLM

    loaded = model_stage.build_model(ModelConfig(name="tiny_llama", name_or_path="builtin:tiny_llama"),
                                     PrecisionConfig(), torch.device("cpu"))
    return HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=1, device="cpu")


def _check_same_ids(tokenizer, dc: DataConfig):
    rows = data_stage.arithmetic_splits(dc)["test"] + [
        {"instruction": "Name a colour.", "input": "The sky", "output": " blue, or grey when it rains."},
        {"instruction": "Say nothing", "input": "", "output": "\n"}]
    train = data_stage.tokenize(rows, tokenizer, dc, max_len=512)
    assert len(train) == len(rows)
    lm = _lm(tokenizer)
    eos = tokenizer.eos_token_id
    for ex, item in zip(train, data_stage.eval_records(rows, tokenizer, dc)):
        ctx, cont = lm._encode_pair(item["prompt"], item["target"])  # what lm-eval's loglikelihood scores
        assert ctx + cont == ex["input_ids"][:-1] and ex["input_ids"][-1] == eos, item
        # the loss covers the answer's tokens (+ EOS): the prompt's own encoding is masked, except a
        # last piece that merges with the answer's first characters (the "\n" + "\n" item here)
        n_prompt = ex["labels"].count(data_stage.IGNORE)
        prompt_ids = lm.tok_encode(item["prompt"])
        assert ex["input_ids"][:n_prompt] == prompt_ids[:n_prompt] and n_prompt >= len(prompt_ids) - 1
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]


def test_sentencepiece_llama_tokenizer_trains_on_the_ids_lm_eval_scores():
    tok = sentencepiece_llama_tokenizer()
    # the defect this guards against: the answer encoded alone gains a leading "▁" piece
    assert tok("42", add_special_tokens=False)["input_ids"] != tok("### Response:\n42")["input_ids"][-2:]
    _check_same_ids(tok, DataConfig(name="arithmetic", template="alpaca", n_train=1, n_val=1, n_test=30))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_char_tokenizer_trains_on_the_ids_lm_eval_scores(template):
    _check_same_ids(model_stage.char_tokenizer(),
                    DataConfig(name="arithmetic", template=template, n_train=1, n_val=1, n_test=30))


@pytest.mark.slow
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_smollm2_tokenizer_trains_on_the_ids_lm_eval_scores(template):
    tok = model_stage.load_tokenizer(ModelConfig(name="smollm2_135m", name_or_path="builtin:smollm2_135m"))
    _check_same_ids(tok, DataConfig(name="arithmetic", template=template, n_train=1, n_val=1, n_test=30))
