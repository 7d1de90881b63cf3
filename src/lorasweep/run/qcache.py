"""Cached 4-bit checkpoints: quantize a model once, in a child process, and load the 4-bit file after.

Loading with ``BitsAndBytesConfig`` from the full-precision checkpoint reads (and keeps mapped)
every fp32 weight before quantizing it, so a QLoRA run's resident memory showed no saving over
plain LoRA. Here the quantization happens once per (model, quant type, double quant, compute
dtype, device type) in a separate process; every run, the first one included, loads the saved
4-bit checkpoint and never touches the fp32 weights. Set LORASWEEP_QUANT_CACHE=0 to bypass.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DONE = "lorasweep_quant.json"  # written last: a folder without it is unfinished


def enabled() -> bool:
    return os.environ.get("LORASWEEP_QUANT_CACHE", "1") not in ("0", "false", "no")


def cache_key(name_or_path: str, src: str, quant: str, double_quant: bool, cdtype: torch.dtype,
              device_type: str) -> str:
    dt = str(cdtype).replace("torch.", "")
    ident = hashlib.sha256(f"{name_or_path}|{src}".encode()).hexdigest()[:8]
    short = Path(name_or_path.replace("builtin:", "")).name or "model"
    return f"{short}-{ident}-{quant}{'-dq' if double_quant else ''}-{dt}-{device_type}"


def quantize_to(src: str, dst: str, quant: str, double_quant: bool, cdtype: str, device_map: str,
                trust_remote_code: bool, attn_implementation: str = "auto") -> None:
    """Child-process body: load with bitsandbytes from the full-precision source, save 4-bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, cdtype)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=dtype)
    dm = int(device_map) if device_map.isdigit() else device_map
    # the run's attention implementation here too: a model that cannot build with it fails here, once
    attn = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=dtype, device_map={"": dm},
                                                 trust_remote_code=trust_remote_code, **attn)
    model.save_pretrained(dst)


def quantized_checkpoint(root: Path, name_or_path: str, src: str, quant: str, double_quant: bool,
                         cdtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
                         attn_implementation: str = "auto") -> Path:
    """The cached 4-bit folder for this setting, made on first use (one maker at a time)."""
    final = root / "quantized" / cache_key(name_or_path, src, quant, double_quant, cdtype, device.type)
    if (final / DONE).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(str(final) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent sweep jobs: one quantizes, the others wait
        if (final / DONE).exists():
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        dm = str(device.index if device.type == "cuda" and device.index is not None else device.type)
        args = [src, str(tmp), quant, bool(double_quant), str(cdtype).replace("torch.", ""), dm, trust_remote_code,
                attn_implementation]
        log.info("quantizing %s to %s once (cached under %s)", name_or_path, quant, final)
        code = f"import json,sys; from lorasweep.run.qcache import quantize_to; quantize_to(*json.loads(sys.argv[1]))"
        env = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"quantizing {name_or_path} to {quant} failed: {tail[0]}")
        (tmp / DONE).write_text(json.dumps({"source": src, "name_or_path": name_or_path, "quant": quant,
                                            "double_quant": bool(double_quant), "compute_dtype": args[4],
                                            "device": device.type}, indent=1))
        if final.exists():  # an unfinished folder from a killed maker
            import shutil

            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final
