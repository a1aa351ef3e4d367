"""`labelled-captions`: any labelled image dataset of the registry as image-caption pairs.

Each image gets the caption ``template.format(class name)`` ("a photo of a sandal."), so a text teacher can
give caption targets for real labelled images (Fashion-MNIST, CIFAR, an ImageNet folder) and a multimodal
student can be scored by zero-shot classification against the prompts of all classes (``prompts``).

Class names are put in the template lower-cased, with underscores as spaces and runs of whitespace
collapsed ("aquarium_fish" -> "aquarium fish", "T-shirt/top" -> "t-shirt/top"). Hyphens and slashes are
kept: they are part of the words ("t-shirt") where they occur in the built-in class lists.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

from mmkd_core.errors import MmkdError

from .base import DATASETS, BaseDataset, create_dataset

NAME = "labelled-captions"
DEFAULT_TEMPLATE = "a photo of a {}."
# Bump when the captions made from the same base and template change (e.g. the class-name rules).
CAPTIONS_VERSION = "labelled-captions-1"


def class_text(name: str) -> str:
    """A class name as it reads in a caption: lower-case, underscores as spaces, single spaces."""
    return " ".join(name.replace("_", " ").lower().split())


def check_template(template: Any) -> str:
    """``template`` if it is a string with exactly one bare ``{}`` field, else MmkdError."""
    if not isinstance(template, str):
        raise MmkdError(f"dataset {NAME!r}: option template must be a string, got {template!r}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise MmkdError(f"dataset {NAME!r}: bad template {template!r} ({e})") from None
    if fields != [("", "", None)]:
        raise MmkdError(
            f"dataset {NAME!r}: template {template!r} must contain exactly one '{{}}' for the class name "
            "(write literal braces as '{{' and '}}')"
        )
    return template


class LabelledCaptionsDataset(BaseDataset):
    """A labelled image dataset whose samples also have the caption ``template.format(class name)``.

    Args:
        base: The labelled image dataset (its images, labels and classes are used as they are).
        base_name: The base's registry name, for ``describe`` (rebuilding) and messages.
        template: Caption template with one ``{}`` for the class name.
        base_options: The options the base was built with (besides root and split).
    """

    name = NAME
    modality = "image_text"

    def __init__(
        self,
        base: BaseDataset,
        base_name: str,
        template: str = DEFAULT_TEMPLATE,
        base_options: dict[str, Any] | None = None,
    ) -> None:
        if not base.classes:
            raise MmkdError(f"dataset {NAME!r}: base dataset {base_name!r} has no class labels to caption")
        if base.modality not in ("image", "image_text"):
            raise MmkdError(f"dataset {NAME!r}: base dataset {base_name!r} has no images ({base.modality} data)")
        self.base, self.base_name = base, base_name
        self.template = check_template(template)
        self.base_options = dict(base_options or {})
        self.split = base.split
        self.classes = list(base.classes)
        self.prompts = [self.template.format(class_text(c)) for c in self.classes]
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.base)

    def image(self, i: int):
        return self.base.image(i)

    def label(self, i: int) -> int:
        y = self.base.label(i)
        if y is None:
            raise MmkdError(f"dataset {NAME!r}: sample {i} of {self.base_name!r} has no label")
        return y

    def text(self, i: int) -> str:
        """Sample i's caption: the prompt of its class, e.g. "a photo of a t-shirt/top."."""
        return self.prompts[self.label(i)]

    def fingerprint(self) -> str:
        """sha256 of the base's fingerprint, the template and the class names."""
        if self._fingerprint is None:
            key = {
                "version": CAPTIONS_VERSION,
                "base": self.base.fingerprint(),
                "template": self.template,
                "classes": self.classes,
            }
            self._fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def options(self) -> dict[str, Any]:
        """The keyword options that rebuild this dataset with ``create_dataset(NAME, root, split, **options)``."""
        return {"base": self.base_name, "template": self.template, **self.base_options}

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "name": NAME, "options": self.options()}


@DATASETS.register(NAME, "label-captions")
def labelled_captions(root: str | None = None, split: str = "train", **options: Any) -> LabelledCaptionsDataset:
    """Captions ``template.format(class name)`` for a labelled image dataset.

    Options: ``base`` (required registered dataset name, e.g. ``fashion-mnist``), ``template`` (default
    "a photo of a {}."); every other option, and ``root`` and ``split``, go to the base dataset.
    """
    options = dict(options)
    base_name = options.pop("base", None)
    template = options.pop("template", DEFAULT_TEMPLATE)
    if not base_name:
        raise MmkdError(
            f"dataset {NAME!r} needs the labelled image dataset to caption: --dataset-option base=NAME "
            "(e.g. base=fashion-mnist)"
        )
    base_name = DATASETS.canonical(str(base_name))
    if base_name == NAME:
        raise MmkdError(f"dataset {NAME!r}: base cannot be {NAME!r} itself")
    check_template(template)  # before the base, which may be slow to load
    base = create_dataset(base_name, root, split, **options)
    return LabelledCaptionsDataset(base, base_name, template, options)
