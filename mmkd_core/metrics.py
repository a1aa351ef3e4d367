"""Evaluation math: retrieval recall, zero-shot and linear-probe accuracy, and the gender–profession bias
probe. Inputs are embeddings (numpy arrays or tensors) and callables; nothing here loads models or files,
and only ``plot_bias`` writes one.

Ranking rule used throughout: a query's rank is the number of *incorrect* gallery items whose cosine
similarity is at least that of its best correct item, so ties count against the query. A collapsed model
that maps everything to one vector therefore scores 0, not 1; NaN similarities count against the query
too, so a diverged model (NaN embeddings) scores 0 as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MmkdError

ArrayLike = np.ndarray | torch.Tensor
Positives = ArrayLike | Sequence[Iterable[int]]
BiasTable = Mapping[str, Mapping[str, float]]

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
)
DEFAULT_GENDER_TERMS = {
    "male": ["he", "him", "his", "man", "men", "boy", "father", "son", "brother", "husband"],
    "female": ["she", "her", "hers", "woman", "women", "girl", "mother", "daughter", "sister", "wife"],
}
DEFAULT_PROFESSIONS = [
    "doctor", "nurse", "engineer", "teacher", "programmer", "homemaker", "scientist", "secretary",
    "carpenter", "librarian", "pilot", "receptionist", "mechanic", "hairdresser", "lawyer", "dancer",
    "surgeon", "nanny", "architect", "cashier", "firefighter", "designer",
]  # fmt: skip


def _unit(x: ArrayLike) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x).detach().to(torch.float32), dim=-1)


def _positive_index(positives: Positives, rows: slice, num_gallery: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The correct gallery items of the queries in ``rows`` as a padded (rows, P) index and validity mask."""
    if isinstance(positives, np.ndarray | torch.Tensor) and torch.as_tensor(positives).dim() == 1:
        idx = torch.as_tensor(positives)[rows].long()[:, None]
        valid = torch.ones_like(idx, dtype=torch.bool)
    else:
        if isinstance(positives, np.ndarray | torch.Tensor):
            lists = [r.nonzero().flatten().tolist() for r in torch.as_tensor(positives)[rows].bool()]
        else:
            lists = [sorted(set(s)) for s in positives[rows]]
        width = max(1, *map(len, lists))
        idx = torch.zeros(len(lists), width, dtype=torch.long)
        valid = torch.zeros(len(lists), width, dtype=torch.bool)
        for i, items in enumerate(lists):
            idx[i, : len(items)] = torch.tensor(items, dtype=torch.long)
            valid[i, : len(items)] = True
    if not valid.any(dim=1).all():
        first = rows.start + int((~valid.any(dim=1)).nonzero()[0])
        raise MmkdError(f"recall_at_k: query {first} has no correct gallery item")
    if (idx[valid] < 0).any() or (idx[valid] >= num_gallery).any():
        raise MmkdError(f"recall_at_k: a positive index is outside the gallery of {num_gallery} items")
    return idx, valid


def recall_at_k(
    query: ArrayLike, gallery: ArrayLike, positives: Positives, ks: Sequence[int] = (1, 5, 10), block: int = 512
) -> dict[int, float]:
    """Fraction of queries with a correct gallery item among their k most cosine-similar ones.

    Args:
        query: (Q, E) embeddings.
        gallery: (G, E) embeddings.
        positives: The correct gallery items of each query: a (Q,) index of the single one, a (Q, G) bool
            matrix, or a sequence of Q sets of indices.
        ks: Cut-offs.
        block: Queries per similarity block; memory is block × G float32 (Q = G = 25,000 fits easily).

    Returns:
        {k: recall in [0, 1]}.
    """
    q, g = _unit(query), _unit(gallery)
    if len(positives) != len(q):
        raise MmkdError(f"recall_at_k: {len(positives)} positives for {len(q)} queries")
    ranks = []
    for start in range(0, len(q), block):
        rows = slice(start, start + block)
        sim = q[rows] @ g.T
        idx, valid = _positive_index(positives, rows, len(g))
        # a NaN similarity (a diverged model's embedding) is a miss: never the best correct item, always ahead
        pos_sim = sim.gather(1, idx).nan_to_num(nan=float("-inf")).masked_fill(~valid, float("-inf"))
        best = pos_sim.max(dim=1, keepdim=True).values
        correct = torch.zeros_like(sim, dtype=torch.bool)
        correct[torch.arange(len(idx))[:, None].expand_as(idx)[valid], idx[valid]] = True
        # incorrect items at least as similar as the best correct one
        ranks.append((((sim >= best) | sim.isnan()) & ~correct).sum(dim=1))
    rank = torch.cat(ranks)
    return {k: float((rank < k).float().mean()) for k in ks}


def _same_text_sets(texts: Sequence[str], anchors: Iterable[Iterable[int]]) -> list[set[int]]:
    """For each group of anchor indices: every index whose text equals one of the anchors' texts."""
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_text.setdefault(t, []).append(i)
    return [{j for a in group for j in by_text[texts[a]]} for group in anchors]


def paraphrase_retrieval(
    emb1: ArrayLike, emb2: ArrayLike, texts1: Sequence[str] | None = None, texts2: Sequence[str] | None = None
) -> dict[str, float]:
    """Paraphrase retrieval on one split: sentence 1 of each pair queries all sentence 2s, and the reverse.

    A hit is the true partner (same index). Sentences repeated in the corpus make that strict: their
    duplicates are equally good answers but count as misses. Pass the gallery side's texts
    (``texts2`` for s1→s2, ``texts1`` for s2→s1) to count any gallery item with the partner's text as a hit.

    Args:
        emb1: (N, E) embeddings of each pair's sentence 1.
        emb2: (N, E) embeddings of sentence 2.
        texts1: Optional sentence-1 texts.
        texts2: Optional sentence-2 texts.

    Returns:
        ``s1_to_s2_r1``, ``s1_to_s2_r5``, ``s2_to_s1_r1``, ``s2_to_s1_r5`` in [0, 1].
    """
    n = len(emb1)
    if len(emb2) != n:
        raise MmkdError(f"paraphrase_retrieval: {n} first sentences but {len(emb2)} second sentences")
    out = {}
    for name, q, g, texts in (("s1_to_s2", emb1, emb2, texts2), ("s2_to_s1", emb2, emb1, texts1)):
        pos = np.arange(n) if texts is None else _same_text_sets(texts, ([i] for i in range(n)))
        r = recall_at_k(q, g, pos, ks=(1, 5))
        out[f"{name}_r1"], out[f"{name}_r5"] = r[1], r[5]
    return out


def summarize(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flatten {"mrpc/train": {"s1_to_s2_r1": ...}, ...} to {"mrpc/train/s1_to_s2_r1": ...} plus ``mean``,
    the mean of all the numbers (the headline of the paraphrase protocol)."""
    flat = {f"{split}/{k}": float(v) for split, metrics in results.items() for k, v in metrics.items()}
    if not flat:
        raise MmkdError("summarize: no results to summarize")
    flat["mean"] = float(np.mean(list(flat.values())))
    return flat


def image_text_retrieval(
    img: ArrayLike,
    txt: ArrayLike,
    txt_to_img: ArrayLike,
    caption_texts: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image→text and text→image recall@k (COCO/Flickr30k protocol: several captions per image).

    Args:
        img: (N, E) image embeddings.
        txt: (M, E) caption embeddings.
        txt_to_img: (M,) the image index of each caption.
        caption_texts: Optional (M,) caption texts; an image→text hit then also counts any caption whose
            text equals one of the image's own captions.
        ks: Cut-offs.

    Returns:
        ``i2t_r{k}`` and ``t2i_r{k}`` for each k, in [0, 1].
    """
    owner = np.asarray(torch.as_tensor(txt_to_img).long())
    if len(owner) != len(txt) or owner.min(initial=0) < 0 or owner.max(initial=0) >= len(img):
        raise MmkdError("image_text_retrieval: txt_to_img must give an image index in [0, N) for every caption")
    captions: list[list[int]] = [[] for _ in range(len(img))]
    for j, i in enumerate(owner):
        captions[i].append(j)
    pos = captions if caption_texts is None else _same_text_sets(caption_texts, captions)
    i2t = recall_at_k(img, txt, pos, ks)
    t2i = recall_at_k(txt, img, owner, ks)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def zero_shot(
    image_emb: ArrayLike, class_emb: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Zero-shot classification accuracy: the predicted classes are the most cosine-similar class
    embeddings. Returns ``top{k}`` in [0, 1] for each k (k ≥ number of classes gives 1)."""
    return {f"top{k}": v for k, v in recall_at_k(image_emb, class_emb, torch.as_tensor(labels), ks).items()}


def prompt_embeddings(
    encode_fn: Callable[[list[str]], ArrayLike], classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """One embedding per class: the mean of its normalised prompt embeddings, renormalised (as CLIP).

    Args:
        encode_fn: Maps a list of texts to their (n, E) embeddings.
        classes: Class names.
        templates: Prompt templates with one ``{}`` for the class name.

    Returns:
        (C, E) float32, unit norm.
    """
    return torch.stack([_unit(_unit(encode_fn([t.format(c) for t in templates])).mean(0)) for c in classes])


def linear_probe(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
) -> float:
    """Top-1 test accuracy of a multinomial logistic regression on standardised features.

    Trained full-batch with L-BFGS from zero weights: the objective is convex and nothing is sampled, so the
    result is deterministic without a seed.

    Args:
        train_x: (N, E) training features.
        train_y: (N,) integer labels.
        test_x: (M, E) test features, standardised with the training statistics.
        test_y: (M,) integer labels.
        epochs: L-BFGS iterations.
        lr: L-BFGS step size (a strong-Wolfe line search adapts it).
        weight_decay: L2 penalty on the weights (not the bias).
    """
    x, xt = (torch.as_tensor(a).detach().to(torch.float32) for a in (train_x, test_x))
    y, yt = (torch.as_tensor(a).long() for a in (train_y, test_y))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mean) / std, (xt - mean) / std
    num_classes = int(max(y.max(), yt.max())) + 1
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=lr, max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b).argmax(1) == yt).float().mean())


def bias_probe(
    embed_fn: Callable[[list[str]], ArrayLike],
    gender_terms: Mapping[str, Sequence[str]] | None = None,
    professions: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean cosine similarity of each profession to each group of gender terms.

    Args:
        embed_fn: Maps a list of texts to their (n, E) embeddings.
        gender_terms: Exactly two groups, name -> terms; default ``DEFAULT_GENDER_TERMS`` (male, female).
        professions: Default ``DEFAULT_PROFESSIONS``.

    Returns:
        {profession: {group1: sim, group2: sim, "diff": sim to group1 − sim to group2}}; a positive
        ``diff`` means the profession sits closer to the first group.
    """
    groups = dict(DEFAULT_GENDER_TERMS if gender_terms is None else gender_terms)
    professions = list(DEFAULT_PROFESSIONS if professions is None else professions)
    if len(groups) != 2 or "diff" in groups or not all(groups.values()):
        raise MmkdError("bias probe: gender_terms must be two non-empty named groups of terms")
    terms = [t for ts in groups.values() for t in ts]
    emb = _unit(embed_fn(terms + professions))
    sim = emb[len(terms) :] @ emb[: len(terms)].T  # (professions, terms)
    (first, a), (second, b) = ((name, len(ts)) for name, ts in groups.items())
    m1, m2 = sim[:, :a].mean(1).tolist(), sim[:, a : a + b].mean(1).tolist()
    return {p: {first: m1[i], second: m2[i], "diff": m1[i] - m2[i]} for i, p in enumerate(professions)}


def compare_bias(table_teacher: BiasTable, table_student: BiasTable) -> dict[str, float]:
    """How closely the student reproduces the teacher's bias, over the professions both tables share.

    Returns:
        ``diff_correlation`` (Pearson r of the per-profession differences; NaN when either is constant),
        ``mean_abs_diff_teacher`` and ``mean_abs_diff_student`` (overall strength of the bias).
    """
    common = [p for p in table_teacher if p in table_student]
    if len(common) < 2:
        raise MmkdError("bias probe: the teacher and student tables share fewer than two professions")
    t = np.array([table_teacher[p]["diff"] for p in common])
    s = np.array([table_student[p]["diff"] for p in common])
    r = float(np.corrcoef(t, s)[0, 1]) if t.std() > 0 and s.std() > 0 else float("nan")
    return {
        "diff_correlation": r,
        "mean_abs_diff_teacher": float(np.abs(t).mean()),
        "mean_abs_diff_student": float(np.abs(s).mean()),
    }


def plot_bias(table_teacher: BiasTable, table_student: BiasTable, path: str) -> str:
    """Write a PNG bar chart of each profession's gender difference, teacher next to student.

    Returns:
        ``path``.
    """
    # the object API with the Agg canvas: no pyplot state, no global backend switch, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    common = [p for p in table_teacher if p in table_student]
    y = np.arange(len(common))
    fig = Figure(figsize=(6, 0.3 * len(common) + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(y - 0.2, [table_teacher[p]["diff"] for p in common], height=0.4, label="teacher")
    ax.barh(y + 0.2, [table_student[p]["diff"] for p in common], height=0.4, label="student")
    ax.set_yticks(y, common)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("cos(profession, first group) − cos(profession, second group)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def _neighbours(emb: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """(n, k) indices of each row's k most cosine-similar other rows (itself excluded), in order."""
    out = []
    for start in range(0, emb.shape[0], block):
        sim = emb[start : start + block] @ emb.T
        rows = torch.arange(start, start + sim.shape[0])
        sim[torch.arange(sim.shape[0]), rows] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def embedding_agreement(
    model: ArrayLike, reference: ArrayLike, ks: Sequence[int] = (1, 10), block: int = 1024
) -> dict[str, float]:
    """How closely one model's embeddings of n texts reproduce a reference model's (a student's its
    teacher's), both (n, E) in the same space.

    Returns:
        ``cosine_mean`` and ``cosine_p05`` (row-wise cosine of model and reference embedding, its mean and
        5th percentile); ``nn_agree`` (share of texts whose nearest other text is the same under both);
        ``own_nearest`` (share of texts whose embedding's nearest reference embedding is that of the same text);
        ``nn{k}_overlap`` for each k > 1 (mean share of the k nearest others both agree on).

    Raises:
        MmkdError: Shapes differ (an embedding in another space has no cosine to the reference), or fewer
            than ``max(ks) + 1`` texts.
    """
    a, b = _unit(model), _unit(reference)
    if a.shape != b.shape or a.dim() != 2:
        raise MmkdError(
            f"embedding agreement: the model embeds as {tuple(a.shape)}, the reference as {tuple(b.shape)}; "
            "both must embed the same texts in the same space"
        )
    kmax = max(ks)
    if a.shape[0] <= kmax:
        raise MmkdError(f"embedding agreement: {a.shape[0]} texts; give more than {kmax}")
    cos = (a * b).sum(1)
    na, nb = _neighbours(a, kmax, block), _neighbours(b, kmax, block)
    out = {"cosine_mean": float(cos.mean()), "cosine_p05": float(torch.quantile(cos, 0.05))}
    out["nn_agree"] = float((na[:, 0] == nb[:, 0]).float().mean())
    own = [
        (a[i : i + block] @ b.T).argmax(1) == torch.arange(i, min(i + block, len(a))) for i in range(0, len(a), block)
    ]
    out["own_nearest"] = float(torch.cat(own).float().mean())
    for k in ks:
        if k > 1:
            hits = (na[:, :k, None] == nb[:, None, :k]).any(2).float().sum(1) / k
            out[f"nn{k}_overlap"] = float(hits.mean())
    return out
