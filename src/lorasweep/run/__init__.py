"""One run, end to end: the pipeline and its stages (model, adapter, data, train, evaluate, record)."""
