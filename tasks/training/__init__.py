"""The training machinery: engine (loop + checkpoint state), evaluation pass, loaders, optimizers, DDP, RNG."""
