"""Library versions recorded in every output's provenance.

Recorded, not compared: they say what produced a store when a result has to be explained. Besides the
libraries that compute targets, the ones that decide inputs are here too — ``tokenizers`` (an upgrade can
change token ids under a cached store), ``torchvision`` (renders image views), ``safetensors`` and
``huggingface_hub`` (read the weights).
"""

from __future__ import annotations

from importlib import metadata

PACKAGES = (
    "mmkd",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "timm",
    "zarr",
    "numcodecs",
    "numpy",
    "pillow",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
