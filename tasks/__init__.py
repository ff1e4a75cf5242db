"""What a user runs: thin Hydra entry points (train, evaluate, predict, export, ...) and the parts below them."""
