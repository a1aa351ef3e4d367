"""One embedding interface over teachers and trained students, for evaluation.

``load_encoder(spec)`` takes a teacher registry name or a path (a training run directory holding
``student/``, or a student directory) and returns an :class:`Encoder` whose ``encode_text`` and
``encode_image`` give float32, L2-normalised (N, E) numpy arrays. What an embedding is:

- teacher, text: its own ``embed`` (a sentence-embedding model's pooled output) when it has one, else the
  masked mean of the last block's tokens;
- teacher, image: ``embed`` (CLIP's projection) when it has one, else the last block's CLS token;
- student: its ``pooled`` prediction (the whole-sample target, in the teacher's space).

Text goes through the teacher's tokenizer or the one saved beside the student; images through the eval
transform (view 0 of :mod:`mmkd_core.views`) at the size, mean and std the model records.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmkd.app.progress import progress_bar
from mmkd_core.errors import MmkdError
from mmkd_core.students import Student, load_student
from mmkd_core.students.export import META_FILE, StudentTokenizer, saved_image_preprocess, saved_max_length
from mmkd_core.targets import masked_mean
from mmkd_core.teachers import TEACHERS, ImagePreprocess, Teacher, create_teacher
from mmkd_core.teachers.hf_common import local_tokenizer
from mmkd_core.views import ViewSpec, eval_params, render, view_spec

logger = logging.getLogger(__name__)

STUDENT_SUBDIR = "student"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json")


class Encoder:
    """Embeds texts and images with one model; subclasses supply the model calls.

    Attributes:
        name: What was loaded (teacher name or student directory), for reports.
        modalities: The subset of {"text", "image"} this model embeds.
        image_spec: The eval transform images are rendered with (None without an image side).
        run_dir: The training run directory when the model was given as one, else None.
        show_progress: Draw a progress bar (on stderr) while encoding.
    """

    name: str = ""
    modalities: frozenset[str] = frozenset()
    image_spec: ViewSpec | None = None
    run_dir: Path | None = None

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.show_progress = False

    # hooks -----------------------------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance of the model, written next to evaluation results."""
        raise NotImplementedError

    # public ----------------------------------------------------------------------------------------------

    def require(self, modality: str, task: str) -> None:
        """Raise a one-line error when this model cannot embed ``modality`` (needed by ``task``)."""
        if modality not in self.modalities:
            has = " and ".join(sorted(self.modalities)) or "nothing"
            raise MmkdError(f"{task} needs {modality} embeddings but {self.name} embeds {has} only")

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts.

        Texts are deduplicated and batched in order of length (less padding); a text's embedding does not
        depend on its batch (the models mask padding), so neither changes the result.

        Args:
            texts: The texts.
            batch_size: Texts per forward pass.

        Returns:
            (N, E) float32, unit rows, in the order of ``texts``.
        """
        self.require("text", "encode_text")
        texts = list(texts)
        unique = sorted(set(texts), key=lambda t: (len(t), t))
        out: list[torch.Tensor] = []
        with (
            torch.inference_mode(),
            progress_bar("encode text", len(unique), unit="texts", enabled=self.show_progress) as advance,
        ):
            for start in range(0, len(unique), batch_size):
                batch = self._tokenize(unique[start : start + batch_size])
                emb = self._embed_text(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
                out.append(F.normalize(emb.float(), dim=-1).cpu())
                advance(len(batch["input_ids"]))
        if not unique:
            return np.zeros((0, 0), dtype=np.float32)
        emb = torch.cat(out).numpy()
        row = {t: i for i, t in enumerate(unique)}
        return emb[[row[t] for t in texts]]

    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Embed images through the eval transform.

        Args:
            images: PIL images (any sequence; read one batch at a time, so a lazy one keeps memory small).
            batch_size: Images per forward pass.

        Returns:
            (N, E) float32, unit rows.
        """
        self.require("image", "encode_image")
        spec = self.image_spec
        out: list[torch.Tensor] = []
        with (
            torch.inference_mode(),
            progress_bar("encode images", len(images), unit="images", enabled=self.show_progress) as advance,
        ):
            for start in range(0, len(images), batch_size):
                batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                pixels = torch.stack(
                    [render(im, eval_params(*im.size, spec.crop_pct, spec.crop_mode), spec) for im in batch]
                )
                out.append(F.normalize(self._embed_image(pixels.to(self.device)).float(), dim=-1).cpu())
                advance(len(batch))
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


class TeacherEncoder(Encoder):
    """A text teacher, an image teacher, or both (CLIP's two towers)."""

    def __init__(
        self, name: str, text: Teacher | None = None, image: Teacher | None = None, device: str = "cpu"
    ) -> None:
        super().__init__(device)
        self.name = name
        self.text_teacher, self.image_teacher = text, image
        self.modalities = frozenset(m for m, t in (("text", text), ("image", image)) if t is not None)
        if image is not None:
            self.image_spec = view_spec(image.preprocess)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.text_teacher.tokenize(texts)

    def _embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_teacher(input_ids=input_ids, attention_mask=attention_mask)
        return out.embed if out.embed is not None else masked_mean(out.hidden_states[-1], out.mask)

    def _embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.image_teacher(pixel_values=pixel_values)
        return out.embed if out.embed is not None else out.hidden_states[-1][:, 0]

    def describe(self) -> dict[str, Any]:
        towers = {m: t.describe() for m, t in (("text", self.text_teacher), ("image", self.image_teacher)) if t}
        return {
            "kind": "teacher",
            "name": self.name,
            "towers": towers,
            "image_preprocess": asdict(self.image_spec) if self.image_spec else None,
        }


class StudentEncoder(Encoder):
    """A trained student loaded from its directory, with the tokenizer / image preprocessing beside it."""

    def __init__(
        self,
        student: Student,
        directory: Path,
        tokenizer: Any = None,
        preprocess: ImagePreprocess | None = None,
        device: str = "cpu",
        run_dir: Path | None = None,
    ) -> None:
        super().__init__(device)
        self.student = student.to(self.device).eval()
        self.directory, self.run_dir = directory, run_dir
        self.name = str(run_dir or directory)
        kind = student.modality
        self.modalities = frozenset({"text", "image"} if kind == "multimodal" else {kind})
        self.tokenizer = tokenizer
        if "text" in self.modalities and tokenizer is not None:
            # the length the export records (sentence-transformers reads the same number), so the texts the
            # student sees here are those SentenceTransformer(directory) and load_multimodal feed it
            self._tokenize_fn = StudentTokenizer(tokenizer, saved_max_length(directory, student, tokenizer))
            self.max_length = self._tokenize_fn.max_length
        if "image" in self.modalities:
            self.image_spec = view_spec(preprocess)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            # only an error when text is needed: an image task on a multimodal student can do without
            raise MmkdError(
                f"{self.directory}: no tokenizer saved beside the student (save_student(..., "
                "tokenizer=...)); pass the teacher's tokenizer directory with --tokenizer"
            )
        return self._tokenize_fn(texts)

    def _embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if hasattr(self.student, "encode_text"):
            return self.student.encode_text(input_ids, attention_mask)
        return self.student(input_ids=input_ids, attention_mask=attention_mask).pooled

    def _embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.student, "encode_image"):
            return self.student.encode_image(pixel_values)
        return self.student(pixel_values=pixel_values).pooled

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "student",
            "directory": str(self.directory),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "student": self.student.describe(),
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else None,
            "image_preprocess": asdict(self.image_spec) if self.image_spec else None,
        }


def _load_tokenizer(directory: Path) -> Any:
    return local_tokenizer(directory, f"{directory}: cannot read the tokenizer saved there ({{reason}})")


def _find_tokenizer(dirs: Sequence[Path]) -> Any:
    for d in dirs:
        if any((d / f).is_file() for f in _TOKENIZER_FILES):
            return _load_tokenizer(d)
    return None


def _preprocess_override(base: ImagePreprocess, override: dict[str, Any] | None) -> ImagePreprocess:
    if not override:
        return base
    known = {f.name for f in fields(ImagePreprocess)}
    unknown = sorted(set(override) - known)
    if unknown:
        raise MmkdError(
            f"image preprocessing: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = {**asdict(base), **override}
    for key in ("mean", "std"):
        values[key] = tuple(values[key])
    return ImagePreprocess(**values)


def student_preprocess(student: Student, directory: Path) -> ImagePreprocess | None:
    """The image preprocessing a saved student records: a vit/beit student's timm ``pretrained_cfg``
    (``save_student(preprocess=...)`` writes it there); for multimodal and data2vec2 students, which have no
    timm config, what ``save_student(preprocess=...)`` recorded in ``mmkd_student.json``."""
    if student.modality == "text":
        return None
    if student.modality == "image" and (directory / "config.json").is_file():
        cfg = json.loads((directory / "config.json").read_text()).get("pretrained_cfg", {})
        size = int(cfg.get("input_size", [3, student.config.img_size, 0])[1])
        default = ImagePreprocess()
        return ImagePreprocess(
            size=size,
            mean=tuple(cfg.get("mean", default.mean)),
            std=tuple(cfg.get("std", default.std)),
            interpolation=cfg.get("interpolation", default.interpolation),
            crop_pct=float(cfg.get("crop_pct", default.crop_pct)),
            crop_mode=cfg.get("crop_mode", default.crop_mode),
        )
    preprocess = saved_image_preprocess(directory)
    if preprocess is None:
        raise MmkdError(
            f"{directory}: the saved student records no image preprocessing; pass --preprocess "
            "size=...,mean=...,std=..."
        )
    return preprocess


def _student_dir(path: Path) -> tuple[Path, Path | None] | None:
    """(student directory, run directory or None) when ``path`` is either, else None."""
    if (path / STUDENT_SUBDIR / META_FILE).is_file():
        return path / STUDENT_SUBDIR, path
    if (path / META_FILE).is_file():
        return path, None
    return None


def _student_encoder(
    directory: Path, run_dir: Path | None, tokenizer: str | None, preprocess: dict[str, Any] | None, device: str
) -> StudentEncoder:
    """The saved student in ``directory``, with its tokenizer (``tokenizer``, else the one saved beside it or
    in the run directory) and its recorded image preprocessing (overridden by ``preprocess``)."""
    student = load_student(directory)
    tok = None
    if student.modality != "image":
        tok = (
            _load_tokenizer(Path(tokenizer))
            if tokenizer
            else _find_tokenizer([directory] + ([run_dir] if run_dir else []))
        )
    pre = student_preprocess(student, directory)
    if pre is not None:
        pre = _preprocess_override(pre, preprocess)
    logger.info("evaluating the %s student in %s", student.name, directory)
    return StudentEncoder(student, directory, tok, pre, device=device, run_dir=run_dir)


def _teacher_encoder(
    name: str, weights: str | None, random_weights: bool, device: str, teacher_options: dict[str, Any]
) -> TeacherEncoder:
    """The registered teacher ``name``; ``clip`` without a ``tower`` option brings both towers."""
    if name == "clip" and "tower" not in teacher_options:
        towers = {
            t: create_teacher(name, weights, random_init=random_weights, device=device, tower=tower, **teacher_options)
            for t, tower in (("text", "text"), ("image", "vision"))
        }
        return TeacherEncoder(name, towers["text"], towers["image"], device=device)
    teacher = create_teacher(name, weights, random_init=random_weights, device=device, **teacher_options)
    if teacher.modality == "text":
        return TeacherEncoder(teacher.name, text=teacher, device=device)
    return TeacherEncoder(teacher.name, image=teacher, device=device)


def load_encoder(
    spec: str,
    weights: str | None = None,
    *,
    random_weights: bool = False,
    device: str = "cpu",
    tokenizer: str | None = None,
    preprocess: dict[str, Any] | None = None,
    **teacher_options: Any,
) -> Encoder:
    """Build the encoder a model specification names.

    Args:
        spec: A teacher registry name (``minilm-l6``, ``bert``, ``clip``, ``beitv2``, ...), a training run
            directory (holding ``student/``) or a saved student directory (holding ``mmkd_student.json``).
            ``clip`` without a ``tower`` option loads both towers, so it embeds text and images.
        weights: Teacher checkpoint (teachers only; None: the teacher's default weights).
        random_weights: Random teacher weights (tests only; ``weights`` may still give config and tokenizer).
        device: Torch device.
        tokenizer: Students: a tokenizer directory to use when none was saved beside the student.
        preprocess: Students: ImagePreprocess fields overriding what the student records (``size``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``).
        **teacher_options: Teacher options (see each teacher's factory).

    Raises:
        MmkdError: An unknown teacher or a path that is no student, missing weights or tokenizer.
    """
    path = Path(spec).expanduser()
    found = _student_dir(path) if path.is_dir() else None
    if found is not None:
        if weights is not None or random_weights or teacher_options:
            raise MmkdError(
                f"{spec} is a trained student: weights, random weights and teacher options apply to teachers only"
            )
        return _student_encoder(*found, tokenizer, preprocess, device)
    if spec not in TEACHERS:
        if path.exists():
            raise MmkdError(
                f"{path} is neither a training run directory (with {STUDENT_SUBDIR}/{META_FILE}) nor "
                f"a saved student ({META_FILE})"
            )
        raise MmkdError(
            f"--model {spec!r}: not a registered teacher ({', '.join(TEACHERS.names())}) and no such directory"
        )
    if tokenizer or preprocess:
        raise MmkdError("tokenizer and preprocess overrides apply to students only; a teacher brings its own")
    return _teacher_encoder(TEACHERS.canonical(spec), weights, random_weights, device, teacher_options)
