"""lorasweep: LoRA / QLoRA fine-tuning sweeps that say what each setting costs and gains."""

__version__ = "0.1.0"

from . import quiet as _quiet

_quiet.install()  # known third-party chatter to DEBUG (lorasweep.quiet); before torch/peft/bnb load
