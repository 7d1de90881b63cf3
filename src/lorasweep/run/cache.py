"""On-disk cache of tokenized examples, keyed by everything that decides the tokens.

Key = hash(rows, tokenizer fingerprint, template/prompt-masking settings, max_len, format version),
so a changed data file, tokenizer or setting is a miss, never a stale hit. Files are written
atomically; a corrupt or unreadable file is treated as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

FORMAT = 2  # 2: prompt + answer tokenized as one text; bump when tokenize()'s output changes meaning


def cache_root() -> Path:
    return Path(os.environ.get("LORASWEEP_CACHE", Path.home() / ".cache" / "lorasweep"))


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes two tokenizers produce the same ids: vocab/merges/normalizer, specials, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "add_eos_token", "chat_template"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()


def key_for(rows: list[dict], tokenizer, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(f"v{FORMAT};".encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(rows, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cached_examples(rows: list[dict], tokenizer, settings: dict, compute: Callable[[], list[dict]],
                    directory: Path | None = None) -> tuple[list[dict], bool]:
    """(examples, hit). ``compute`` runs only on a miss; its result is stored for the next run."""
    d = Path(directory) if directory is not None else cache_root() / "tokenized"
    path = d / f"{key_for(rows, tokenizer, settings)}.json"
    try:
        return json.loads(path.read_text()), True
    except (OSError, ValueError):
        pass
    examples = compute()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(examples, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed
    return examples, False
