"""Library versions recorded in every output's provenance."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("mmkd", "torch", "transformers", "timm", "zarr", "numcodecs", "numpy", "pillow")


def library_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
