"""Sharding the ``patch_*`` steps of ``refusal-lab run`` over a Ray cluster (``--ray``).

The driver (the ``refusal-lab run`` process) does everything as in a single-process run except the
exact patching grids: :meth:`RayExecutor.patch_grid` splits a grid into shards
(:mod:`refusal_lab.distributed.shards`), sends one to each Ray actor, and merges the returned
per-pair values into the full tensor, which the driver then writes exactly as a single-process run
does. Every actor (:class:`~refusal_lab.distributed.worker.ShardWorker`) loads one model copy once
with the driver's loading arguments and builds the same prompts, receivers and source caches.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import torch
from tqdm.auto import tqdm

from refusal_lab.distributed.shards import merge, shard_axis, split_spec
from refusal_lab.distributed.worker import ShardWorker, inputs_fingerprint, portable_config
from refusal_lab.errors import ConfigError, RefusalLabError

INSTALL_HINT = "Ray is not installed; install it with pip install 'refusal-lab[ray]' to use --ray."
#: environment forwarded to the actors (offline mode, caches, the import path on shared filesystems)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")
CONNECT_TIMEOUT_S = 10.0
ACTOR_START_TIMEOUT_S = float(os.environ.get("REFUSAL_LAB_RAY_START_TIMEOUT", 900))


def import_ray():
    """The ``ray`` module, or a one-sentence :class:`RefusalLabError` (exit 2) naming the extra."""
    try:
        import ray
    except ImportError:
        raise RefusalLabError(INSTALL_HINT) from None
    return ray


def _reachable(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` / ``ray://host:port`` when nothing listens there, else None."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not port:
        return None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError:
        return host, port


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _first_sentence(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")


def _use_token_if_available() -> None:
    """As ``ray start`` and the ``ray`` CLI do: when ``RAY_AUTH_MODE`` is unset and a token exists
    (``RAY_AUTH_TOKEN``, ``~/.ray/auth_token``), authenticate with it (Ray >= 2.5x token auth)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = log.level
    log.setLevel(logging.ERROR)  # no "token authentication is enabled" warning on every run
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception:  # noqa: BLE001 - connecting will report a real problem
        pass
    finally:
        log.setLevel(level)


def _auth_failure(exc: BaseException | None) -> bool:
    while exc is not None:
        if "AuthToken" in str(exc) or type(exc).__name__ == "AuthenticationError":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _unwrap(ray, exc: BaseException) -> BaseException:
    """The user-facing error inside a Ray task/actor error, when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RefusalLabError):
        return cause
    if isinstance(exc, ray.exceptions.RayError):
        text = str(exc).strip().splitlines()
        last = _first_sentence(text[-1]) if text else type(exc).__name__
        return RefusalLabError(f"A Ray worker failed ({last}); rerun with --debug for the traceback.")
    return exc


def load_kwargs(args, config) -> dict:
    """``load_model`` keyword arguments the actors need, from the CLI arguments and the run config."""
    template = getattr(args, "chat_template", None)
    return {"dtype": config.dtype, "device": config.device, "device_map": getattr(args, "device_map", None),
            "trust_remote_code": bool(getattr(args, "trust_remote_code", False)),
            "token": getattr(args, "token", None) or os.environ.get("HF_TOKEN"),
            "chat_template": Path(template).read_text() if template else None}


class RayExecutor:
    """Computes patching grids with ``workers`` Ray actors, each holding one model copy.

    Use :meth:`connect`; actors start on the first grid that is actually computed (a fully
    resumed run starts none) and stop with :meth:`close`."""

    def __init__(self, ray, address: str, workers: int | None, load: dict, owns_ray: bool):
        self.ray = ray
        self.address = address
        self.requested = workers
        self.load = dict(load)
        self.owns_ray = owns_ray
        self.actors: list = []
        self.actor_info: list[dict] = []
        self.workers = None

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(cls, address: str, workers: int | None = None, load: dict | None = None) -> "RayExecutor":
        """Connect to the cluster at ``address`` (``auto``, ``host:port``, ``ray://host:port``, or
        ``local`` to start one in this process); one-sentence errors (exit 2) when Ray is missing
        or the cluster cannot be reached."""
        if workers is not None and workers < 1:
            raise ConfigError(f"--ray-workers must be at least 1, not {workers}.")
        ray = import_ray()
        if ray.is_initialized():  # a library user connected already: use that cluster, leave it open
            return cls(ray, address, workers, load or {}, owns_ray=False)
        if address not in ("auto", "local") and _reachable(address) is not None:
            raise RefusalLabError(f"Cannot reach a Ray cluster at {address}; start one with `ray start --head` "
                                  "or pass the address it printed (or --ray auto on a cluster node).")
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        env["TOKENIZERS_PARALLELISM"] = "false"
        kwargs = dict(runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False)
        auth_mode = os.environ.get("RAY_AUTH_MODE")
        if address != "local":
            _use_token_if_available()
        try:
            ray.init(address=address, **kwargs)  # "local" starts a new local cluster even when RAY_ADDRESS is set
        except Exception as e:  # ConnectionError, RuntimeError, TimeoutError, ... depending on the form
            _restore_env("RAY_AUTH_MODE", auth_mode)
            if _auth_failure(e):
                raise RefusalLabError(f"The Ray cluster at {address} refused this client's authentication token; set "
                                      "RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's token.") from None
            if address == "auto":
                raise RefusalLabError("--ray auto found no running Ray cluster on this machine; start one with "
                                      "`ray start --head` or pass its address (host:6379 or ray://host:10001).") from None
            msg = _first_sentence(str(e)) or type(e).__name__
            raise RefusalLabError(f"Cannot connect to a Ray cluster at {address} ({msg}); check the address, or start "
                                  "a cluster with `ray start --head`.") from None
        executor = cls(ray, address, workers, load or {}, owns_ray=True)
        executor._auth_mode = auth_mode
        return executor

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        if self.owns_ray:
            _restore_env("RAY_AUTH_MODE", getattr(self, "_auth_mode", None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ actors
    def _use_gpus(self, resources: dict) -> bool:
        device = self.load.get("device")
        if device is not None:
            return str(device).startswith("cuda")
        return resources.get("GPU", 0) >= 1

    def _start(self, inputs) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        gpus = self._use_gpus(resources)
        if gpus:
            if resources.get("GPU", 0) < 1:
                raise RefusalLabError(f"The run asks for device {self.load.get('device')} but the Ray cluster at "
                                      f"{self.address} has no GPU; pass --device cpu or add GPU nodes.")
            n = self.requested or max(1, int(resources["GPU"]))
            per = {"num_gpus": max(1, int(resources["GPU"] // n)) if self.load.get("device_map") else 1, "num_cpus": 1}
        else:
            n = self.requested or max(1, len(nodes))
            smallest = min((int(node.get("Resources", {}).get("CPU", 0)) for node in nodes), default=1)
            per = {"num_cpus": max(1, min(int(resources.get("CPU", 1) // n), smallest)), "num_gpus": 0}
        load = dict(self.load)
        if gpus and not load.get("device_map"):
            load["device"] = "cuda"  # the actor sees only its own GPU(s)
        elif not gpus:
            load["device"] = "cpu"
        config = portable_config(inputs.cfg.as_dict())
        fingerprint = inputs_fingerprint(inputs)
        Actor = ray.remote(ShardWorker)
        self.actors = [Actor.options(scheduling_strategy="SPREAD", **per).remote(load, config, fingerprint)
                       for _ in range(n)]
        pending = [a.info.remote() for a in self.actors]
        ready, waiting = ray.wait(pending, num_returns=len(pending), timeout=ACTOR_START_TIMEOUT_S)
        if waiting:
            self.close()
            raise RefusalLabError(
                f"Only {len(ready)} of {n} Ray workers started within {ACTOR_START_TIMEOUT_S:.0f} s (each needs "
                f"{per['num_cpus']} CPU and {per['num_gpus']} GPU); lower --ray-workers or add nodes."
            )
        try:
            self.actor_info = ray.get(pending)
        except ray.exceptions.RayError as e:
            raise _unwrap(ray, e) from None
        self.workers = n
        self.resources = per

    # ------------------------------------------------------------------ grids
    def patch_grid(self, inputs, grid: str, direction: str, spec, progress: bool = True) -> tuple[torch.Tensor, dict]:
        """Per-pair values ``[n_pairs, *spec.shape]`` of ``spec`` computed by the actors, and a
        record of which worker computed which shard (stored in the step and ``results.json``)."""
        from refusal_lab.run.config import DIRECTIONS

        ray = self.ray
        if not self.actors:
            self._start(inputs)
        src, rec = DIRECTIONS[direction]
        shards = split_spec(spec, len(self.actors), inputs.model.cfg.n_layers, inputs.prompts.seq_len)
        t0 = time.perf_counter()
        refs = [actor.patch.remote(src, rec, shard) for actor, shard in zip(self.actors, shards)]
        bar = tqdm(total=len(refs), desc=f"patch {grid} ({len(refs)} Ray workers)", unit="shard",
                   disable=not progress, leave=False)
        try:
            waiting = list(refs)
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                ray.get(done)  # raises a failed shard's error now, not after the others finish
                bar.update(len(done))
            results = ray.get(refs)
        except ray.exceptions.RayError as e:
            raise _unwrap(ray, e) from None
        finally:
            bar.close()
        vals = merge(spec, shards, [r[0] for r in results], inputs.batches[rec].n)
        axis = shard_axis(spec)
        return vals, {
            "backend": "ray", "address": self.address, "workers": len(shards), "shard_by": axis,
            "seconds": round(time.perf_counter() - t0, 3),
            "shards": [{"worker": k, "node": self.actor_info[k]["node"], "pid": self.actor_info[k]["pid"],
                        "device": self.actor_info[k]["device"], "threads": self.actor_info[k]["threads"],
                        axis: getattr(shard, axis),
                        "seconds": round(seconds, 3)}
                       for k, (shard, (_, seconds)) in enumerate(zip(shards, results))],
        }
