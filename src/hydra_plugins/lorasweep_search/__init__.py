"""lorasweep's Optuna search as a Hydra sweeper (Hydra finds sweepers in the hydra_plugins namespace)."""
