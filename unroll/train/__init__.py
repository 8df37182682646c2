"""Training, measuring and looking at white-box models: data, optimisers, the loop, checkpoints."""
