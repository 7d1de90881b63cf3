"""One run on several processes: the torchrun launch, each rank, the sharded model."""
