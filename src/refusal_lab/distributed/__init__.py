"""Distributed patching sweeps: ``refusal-lab run --ray ADDRESS`` shards every ``patch_*`` grid
over Ray actors (one model copy each) and merges the shards into the single-process tensor.

Ray is optional (``pip install 'refusal-lab[ray]'``); nothing here imports it until
:meth:`RayExecutor.connect` is called."""

from refusal_lab.distributed.ray_executor import INSTALL_HINT, RayExecutor, import_ray, load_kwargs
from refusal_lab.distributed.shards import merge, shard_axis, split_spec
from refusal_lab.distributed.worker import ShardWorker, inputs_fingerprint

__all__ = ["INSTALL_HINT", "RayExecutor", "ShardWorker", "import_ray", "inputs_fingerprint", "load_kwargs", "merge",
           "shard_axis", "split_spec"]
