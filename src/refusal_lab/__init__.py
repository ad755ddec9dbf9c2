"""refusal-lab: mechanistic interpretability of refusal in chat language models."""

from refusal_lab.errors import RefusalLabError

__version__ = "0.1.0"

__all__ = ["RefusalLabError", "load_model", "__version__"]


def __getattr__(name):  # lazy: keep `import refusal_lab` cheap for the CLI's --help
    if name == "load_model":
        from refusal_lab.models.loading import load_model

        return load_model
    raise AttributeError(name)
