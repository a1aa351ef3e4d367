import zlib

import numpy as np
import pytest
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.metrics import (
    DEFAULT_GENDER_TERMS,
    DEFAULT_PROFESSIONS,
    bias_probe,
    compare_bias,
    image_text_retrieval,
    linear_probe,
    paraphrase_retrieval,
    plot_bias,
    prompt_embeddings,
    recall_at_k,
    summarize,
    zero_shot,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


# ---- recall@k ---------------------------------------------------------------------------------------


def test_identity_retrieval_is_perfect_for_every_positives_format():
    g = randn(40, 16)
    idx = np.arange(40)
    assert recall_at_k(g, g, idx) == {1: 1.0, 5: 1.0, 10: 1.0}
    assert recall_at_k(g.numpy(), g.numpy(), np.eye(40, dtype=bool), ks=(1,)) == {1: 1.0}
    assert recall_at_k(g, g, [{i} for i in range(40)], ks=(1,), block=7) == {1: 1.0}


def test_right_item_ranked_third():
    query = unit([1.0, 0, 0, 0])
    # cosine similarities 0.9, 0.8, 0.7 (correct), 0.0, −1.0
    gallery = unit([0.9, 0.436, 0, 0], [0.8, 0, 0.6, 0], [0.7, 0, 0, 0.714], [0, 1.0, 0, 0], [-1.0, 0, 0, 0])
    r = recall_at_k(query, gallery, np.array([2]), ks=(1, 2, 3, 5))
    assert r == {1: 0.0, 2: 0.0, 3: 1.0, 5: 1.0}
    # another correct item ranked first makes it a hit at 1
    assert recall_at_k(query, gallery, [{0, 2}], ks=(1,)) == {1: 1.0}


def test_blocks_give_the_same_answer():
    q, g = randn(53, 8, seed=1), randn(31, 8, seed=2)
    pos = np.arange(53) % 31
    assert recall_at_k(q, g, pos, block=5) == recall_at_k(q, g, pos, block=1000)


def test_ties_count_against_the_query():
    collapsed = torch.ones(20, 8)
    assert recall_at_k(collapsed, collapsed, np.arange(20), ks=(1, 5)) == {1: 0.0, 5: 0.0}


def test_padding_of_positive_lists_is_not_a_correct_item():
    query = unit([1.0, 0, 0], [0, 1.0, 0])
    gallery = unit([0.3, 0.9, 0], [1.0, 0, 0], [0, 0.5, 0.5])  # query 1: item 0 (wrong) 0.95, item 2 (right) 0.71
    pos = [{0, 1}, {2}]  # query 1's list is padded to width 2 with index 0
    assert recall_at_k(query, gallery, pos, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    matrix = np.array([[True, True, False], [False, False, True]])
    assert recall_at_k(query, gallery, matrix, ks=(1, 2)) == {1: 0.5, 2: 1.0}


def test_nan_embeddings_are_misses():
    g = randn(6, 8, seed=3)
    q = g.clone()
    q[2] = float("nan")  # one diverged query: a miss (it was a hit)
    assert recall_at_k(q, g, np.arange(6), ks=(1, 5)) == {1: pytest.approx(5 / 6), 5: pytest.approx(5 / 6)}
    # a diverged model scores 0, like a collapsed one (it scored 1)
    nan = torch.full((6, 8), float("nan"))
    assert recall_at_k(nan, nan, np.arange(6), ks=(1, 5)) == {1: 0.0, 5: 0.0}
    # a NaN gallery item is ahead of every query's answer, and no answer for its own query
    bad = g.clone()
    bad[4] = float("inf")  # normalises to NaN
    r = recall_at_k(g, bad, np.arange(6), ks=(1, 2, 5, 6))
    assert r == {1: 0.0, 2: pytest.approx(5 / 6), 5: pytest.approx(5 / 6), 6: 1.0}


def test_query_without_a_correct_item_is_an_error():
    with pytest.raises(MmkdError, match="query 1 has no correct gallery item"):
        recall_at_k(randn(2, 4), randn(3, 4), [{0}, set()])


# ---- paraphrase retrieval ---------------------------------------------------------------------------


def test_paraphrase_retrieval_perfect_and_keys():
    e1 = randn(30, 16)
    r = paraphrase_retrieval(e1, e1 + 0.01 * randn(30, 16, seed=5))
    assert r == {"s1_to_s2_r1": 1.0, "s1_to_s2_r5": 1.0, "s2_to_s1_r1": 1.0, "s2_to_s1_r5": 1.0}


def test_paraphrase_duplicates_need_texts_to_count():
    # pairs 0 and 1 are paraphrases of one sentence: both their second sentences read (and embed) the same
    emb = torch.eye(4)
    emb[1] = emb[0]
    texts2 = ["a cat sat", "a cat sat", "b", "c"]
    strict = paraphrase_retrieval(emb, emb.clone())
    # queries 0 and 1 tie between their partner and the other pair's identical sentence 2
    assert strict["s1_to_s2_r1"] == 0.5 and strict["s1_to_s2_r5"] == 1.0
    lenient = paraphrase_retrieval(emb, emb.clone(), texts2=texts2)
    assert lenient["s1_to_s2_r1"] == 1.0


def test_summarize_flattens_and_averages():
    out = summarize({"mrpc/train": {"s1_to_s2_r1": 0.5, "s1_to_s2_r5": 1.0}, "qqp/dev": {"s1_to_s2_r1": 0.0}})
    assert out == {
        "mrpc/train/s1_to_s2_r1": 0.5,
        "mrpc/train/s1_to_s2_r5": 1.0,
        "qqp/dev/s1_to_s2_r1": 0.0,
        "mean": 0.5,
    }


# ---- image–text retrieval ---------------------------------------------------------------------------


def test_image_text_retrieval_with_several_captions():
    img = randn(5, 12, seed=3)
    owner = np.repeat(np.arange(5), 3)  # three captions per image
    txt = img[owner] + 0.05 * randn(15, 12, seed=4)
    r = image_text_retrieval(img, txt, owner)
    assert r == {f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_image_text_retrieval_text_equality_hits():
    img = torch.eye(4)[:3]
    # c0 -> img0 ("a dog", cos 0.9 to img0); c1 -> img1; c2 -> img2; c3 -> img1 but also reads "a dog" and
    # sits exactly on img0
    txt = unit([0.9, 0, 0, 0.436], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0])
    owner = np.array([0, 1, 2, 1])
    strict = image_text_retrieval(img, txt, owner, ks=(1,))
    assert strict["i2t_r1"] == pytest.approx(2 / 3) and strict["t2i_r1"] == pytest.approx(3 / 4)
    lenient = image_text_retrieval(img, txt, owner, caption_texts=["a dog", "x", "y", "a dog"], ks=(1,))
    assert lenient["i2t_r1"] == 1.0 and lenient["t2i_r1"] == pytest.approx(3 / 4)
    with pytest.raises(MmkdError, match="txt_to_img"):
        image_text_retrieval(img, txt, np.array([0, 1, 2, 3]))


# ---- zero-shot and linear probe ---------------------------------------------------------------------


def test_zero_shot_separable_is_perfect():
    classes = torch.eye(10, 16)
    labels = torch.arange(60) % 10
    images = classes[labels] + 0.1 * randn(60, 16)
    assert zero_shot(images, classes, labels) == {"top1": 1.0, "top5": 1.0}
    assert zero_shot(images, classes, (labels + 1) % 10, ks=(1,)) == {"top1": 0.0}


def fake_encoder(dim=16):
    """Deterministic text 'encoder': a fixed random vector per word, summed over words."""

    def word(w):
        return torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    return lambda texts: torch.stack([sum(word(w) for w in t.replace(".", "").split()) for t in texts])


def test_prompt_embeddings_average_normalised_templates():
    enc = fake_encoder()
    classes = ["cat", "dog", "truck"]
    emb = prompt_embeddings(enc, classes, templates=("a photo of a {}.", "{}"))
    assert emb.shape == (3, 16)
    assert emb.norm(dim=1).tolist() == pytest.approx([1.0] * 3)
    a, b = (torch.nn.functional.normalize(enc([t]), dim=1)[0] for t in ("a photo of a dog.", "dog"))
    assert emb[1].tolist() == pytest.approx(((a + b) / (a + b).norm()).tolist(), abs=1e-6)
    # images embedded like their class name are classified correctly
    assert zero_shot(enc(classes), emb, torch.arange(3), ks=(1,)) == {"top1": 1.0}


def test_linear_probe_separable_and_deterministic():
    centers = 4 * randn(3, 8, seed=7)
    y = torch.arange(300) % 3
    x = centers[y] + randn(300, 8, seed=8) + 10  # offset and scale checks the standardisation
    acc = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=50)
    assert acc >= 0.95
    assert linear_probe(x[:200].numpy(), y[:200].numpy(), x[200:], y[200:], epochs=50) == acc


# ---- bias probe -------------------------------------------------------------------------------------


def biased_encoder(lean):
    """Gender terms on two fixed directions; each profession leans ``lean`` toward the male direction."""
    male, female = torch.eye(32)[0], torch.eye(32)[1]

    def embed(texts):
        out = []
        for i, t in enumerate(texts):
            noise = 0.02 * torch.randn(32, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
            if t in DEFAULT_GENDER_TERMS["male"]:
                out.append(male + noise)
            elif t in DEFAULT_GENDER_TERMS["female"]:
                out.append(female + noise)
            else:
                out.append((0.5 + lean) * male + (0.5 - lean) * female + torch.eye(32)[2 + i % 30] + noise)
        return torch.stack(out)

    return embed


def test_bias_probe_detects_lean_and_compares(tmp_path):
    teacher = bias_probe(biased_encoder(0.4))
    assert list(teacher) == DEFAULT_PROFESSIONS
    assert all(
        row["diff"] > 0.2 and row["diff"] == pytest.approx(row["male"] - row["female"]) for row in teacher.values()
    )
    neutral = bias_probe(biased_encoder(0.0))
    assert all(abs(row["diff"]) < 0.1 for row in neutral.values())

    same = compare_bias(teacher, teacher)
    assert same["diff_correlation"] == pytest.approx(1.0)
    other = compare_bias(teacher, neutral)
    assert other["mean_abs_diff_teacher"] > other["mean_abs_diff_student"]

    path = plot_bias(teacher, neutral, str(tmp_path / "bias.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_bias_known_correlation_and_strengths():
    def table(diffs):
        return {p: {"male": 0.0, "female": 0.0, "diff": d} for p, d in diffs.items()}

    teacher = table({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "only_teacher": 100.0})
    # deviations (−1.5, −0.5, 0.5, 1.5) and (1.5, −0.5, 0.5, −1.5)/2: r = −(2.25 − 0.25 − 0.25 + 2.25) / 5 = −0.8
    student = table({"a": -0.5, "b": -1.5, "c": -1.0, "d": -2.0})
    out = compare_bias(teacher, student)
    assert out["diff_correlation"] == pytest.approx(-0.8)
    assert out["mean_abs_diff_teacher"] == pytest.approx(2.5)  # over the shared professions only
    assert out["mean_abs_diff_student"] == pytest.approx(1.25)
    flat = compare_bias(teacher, table({"a": 0.3, "b": 0.3, "c": 0.3, "d": 0.3}))
    assert np.isnan(flat["diff_correlation"]) and flat["mean_abs_diff_student"] == pytest.approx(0.3)


def test_bias_probe_custom_groups_and_errors():
    table = bias_probe(fake_encoder(), {"a": ["x"], "b": ["y"]}, ["p", "q"])
    assert set(table) == {"p", "q"} and set(table["p"]) == {"a", "b", "diff"}
    with pytest.raises(MmkdError, match="two non-empty"):
        bias_probe(fake_encoder(), {"a": ["x"]})
    with pytest.raises(MmkdError, match="fewer than two"):
        compare_bias(table, {"p": table["p"]})


def test_positive_index_outside_gallery_is_an_error():
    with pytest.raises(MmkdError, match="outside the gallery"):
        recall_at_k(randn(2, 4), randn(3, 4), np.array([0, 3]))
