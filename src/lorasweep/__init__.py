"""lorasweep: LoRA / QLoRA fine-tuning sweeps that say what each setting costs and gains."""

__version__ = "0.1.0"
