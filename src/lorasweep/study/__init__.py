"""Many runs: sweep bookkeeping, run-folder leases, Optuna search and the pruner."""
