"""Third-party chatter kept off a run's console.

A run prints lorasweep's own lines and progress bars. The known, harmless messages that the
libraries it drives print on every run are demoted to DEBUG (they show only where that logger is
set to DEBUG, e.g. ``hydra.verbose=lm_eval``); anything else those libraries log at WARNING or
above still shows. ``install`` runs when lorasweep is imported; ``lm_eval_call`` wraps each
lm-eval evaluation (its ``print`` lines become DEBUG records of the ``lm_eval`` logger).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import warnings
from typing import Iterator

# logger -> message starts that are demoted; each is said on every run and asks nothing of the user
DEMOTED: dict[str, tuple[str, ...]] = {
    # lorasweep hands lm-eval the model in memory on purpose (no reload, adapters kept)
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    # max_gen_toks comes from eval.max_new_tokens, by design
    "lm_eval.evaluator": ("generation_kwargs:",),
    # said at import on AVX512-BF16 CPUs without the optional `kernels` package; the built-in
    # 4-bit CPU kernel is used instead (and fp32/bf16 runs never use either)
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}

# (message regex, category): library-internal deprecations a user cannot act on
IGNORED_WARNINGS: list[tuple[str, type[Warning]]] = [
    # transformers asks peft (which reads model.is_gradient_checkpointing) to move on
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
]


class _Demote(logging.Filter):
    """On its logger: records whose message starts with one of `starts` become DEBUG records."""

    def __init__(self, logger: logging.Logger, starts: tuple[str, ...]):
        super().__init__()
        self.logger = logger
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.starts)):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self.logger.isEnabledFor(logging.DEBUG)


def install() -> None:
    """Attach the filters (idempotent). Logger filters survive Hydra's logging setup, which
    resets the level and handlers of lm_eval's child loggers but not their filters."""
    for name, starts in DEMOTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Demote) for f in logger.filters):
            logger.addFilter(_Demote(logger, starts))
    for message, category in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class _DebugLines(io.TextIOBase):
    """A text stream that logs each complete line at DEBUG."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self._buf = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                self.logger.debug(line)
        return len(s)

    def flush(self) -> None:
        if self._buf.strip():
            self.logger.debug(self._buf)
        self._buf = ""


def _git_hash_quietly() -> str | None:
    """lm-eval's get_git_commit_hash without git's "fatal: not a git repository" on stderr."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from lm_eval.loggers.utils import get_commit_from_path
    except ImportError:
        return None
    return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def lm_eval_call() -> Iterator[None]:
    """Around one lm-eval evaluation: its prints ("bootstrapping for stddev: ...") go to the
    lm_eval logger at DEBUG and its git lookup stays off stderr. Progress bars (stderr) stay."""
    import lm_eval.evaluator as evaluator

    install()
    sink = _DebugLines(logging.getLogger("lm_eval"))
    saved = getattr(evaluator, "get_git_commit_hash", None)
    if saved is not None:
        evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        with contextlib.redirect_stdout(sink):
            yield
    finally:
        sink.flush()
        if saved is not None:
            evaluator.get_git_commit_hash = saved
