"""What a user runs: thin Hydra entry points (train, evaluate, predict, export, ...) and the parts below them."""
from tasks.training.schema import register as _register_schemas

_register_schemas()  # train.yaml's knob types (schema/train in Hydra's ConfigStore), wherever the configs are composed

from tasks import resolvers as _resolvers  # noqa: E402, F401  (registers the ${mv.*} config resolvers)
