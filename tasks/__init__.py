"""What a user runs: thin Hydra entry points (train, evaluate, predict, export, ...) and the parts below them."""

from tasks import resolvers as _resolvers  # noqa: E402, F401  (registers the ${mv.*} config resolvers)
