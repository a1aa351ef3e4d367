import math

import pytest
import torch
import torch.nn.functional as F

from mmkd_core.errors import MmkdError
from mmkd_core.losses import (
    LOSSES,
    build_loss,
    cls_mse,
    contrastive_kd,
    identical_targets,
    itc,
    msd_loss,
    msd_saliency,
    msd_weights,
    mse_cosine,
    parse_loss_spec,
    pooled_cosine,
    pooled_mse,
    same_target,
    token_mse,
    triplet,
)


def eye(n, d=None):
    return torch.eye(n, d or n)


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 5, 4, generator=g)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 1])[:, None]
    return target, mask


# ---- regression losses ------------------------------------------------------------------------------


def test_token_mse_is_exactly_one_and_ignores_garbage_padding():
    target, mask = padded_batch()
    pred = target + 1
    pred[~mask] = float("nan")
    target[~mask] = 1e6
    pred.requires_grad_(True)
    loss = token_mse(pred, target, mask)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad[~mask] == 0)


def test_token_mse_all_padding_is_zero_and_differentiable():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = token_mse(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_cls_mse_uses_step_zero_only():
    target, _ = padded_batch()
    pred = target.clone()
    pred[:, 0] += 2
    pred[:, 1:] = 1e6
    assert cls_mse(pred, target).item() == pytest.approx(4.0)


def test_pooled_mse_and_cosine_known_values():
    a, b = eye(4)[:2], eye(4)[2:]
    assert pooled_mse(a, a + 3).item() == pytest.approx(9.0)
    assert pooled_cosine(a, b).item() == pytest.approx(1.0)
    assert pooled_cosine(a, -a).item() == pytest.approx(2.0)
    assert pooled_cosine(a, 5 * a, reduction="none").tolist() == pytest.approx([0.0, 0.0])


def test_mse_cosine_all_padding_is_zero_and_differentiable():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = mse_cosine(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()  # the mean over no valid step was NaN
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)
    assert mse_cosine(pred, pred.detach(), torch.zeros(2, 3), reduction="none").shape == (0,)
    with pytest.raises(MmkdError, match="reduction 'sum'"):
        pooled_mse(pred[:, 0], pred[:, 0], reduction="sum")  # was silently the per-sample vector


def test_mse_cosine_pooled_and_masked():
    target, mask = padded_batch()
    # pred = 2·target: cosine term is 0, MSE term is mean(target²)
    pooled = mse_cosine(2 * target[:, 0], target[:, 0])
    assert pooled.item() == pytest.approx((target[:, 0] ** 2).mean().item(), rel=1e-5)
    pred = 2 * target
    pred[~mask] = float("nan")
    masked = mse_cosine(pred, target, mask, cos_weight=0.5)
    assert masked.item() == pytest.approx((target[mask] ** 2).mean().item(), rel=1e-5)
    # orthogonal: MSE of unit vectors e_i vs e_j is 2/E, cosine term 1·cos_weight
    assert mse_cosine(eye(4)[:2], eye(4)[2:], cos_weight=0.5).item() == pytest.approx(2 / 4 + 0.5)


# ---- contrastive, ITC, triplet ----------------------------------------------------------------------


def test_contrastive_kd_known_answers():
    e = eye(4)
    assert contrastive_kd(e, e.clone(), temperature=0.01).item() < 1e-6
    # a collapsed student (cos 1/2 to every target) faces B equally likely candidates: ln B, ln(B + M) with a bank
    collapsed = torch.ones(4, 6)
    targets = eye(6)
    assert contrastive_kd(collapsed, targets[:4]).item() == pytest.approx(math.log(4), abs=1e-5)
    assert contrastive_kd(collapsed, targets[:4], bank=targets[4:]).item() == pytest.approx(math.log(6), abs=1e-5)
    # symmetric: each target also picks among 4 identical students (ln 4); the bank is not in that direction
    both = contrastive_kd(collapsed, targets[:4], bank=targets[4:], symmetric=True).item()
    assert both == pytest.approx(0.5 * (math.log(6) + math.log(4)), abs=1e-5)
    # two samples, τ = 1: −log(e / (e + 1))
    assert contrastive_kd(e[:2], e[:2], temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), 1e-5)


def test_contrastive_kd_one_target_for_all_leaves_nothing_to_contrast():
    same = torch.ones(5, 3)
    # every candidate is the sample's own target: none is a negative (the old rule gave ln 5, ln 8 with the bank)
    assert contrastive_kd(same, same).item() == 0.0
    assert contrastive_kd(same, same, bank=torch.ones(3, 3)).item() == 0.0
    # nor, in the other direction, are the students of that one target
    assert contrastive_kd(same, same, symmetric=True).item() == 0.0


def test_contrastive_kd_bank_only_with_positives():
    bank = eye(6)
    pos = torch.tensor([4, 1, 3])
    assert contrastive_kd(bank[pos], None, temperature=0.01, bank=bank, positives=pos).item() < 1e-6
    wrong = torch.tensor([0, 2, 5])
    assert contrastive_kd(bank[pos], None, temperature=0.01, bank=bank, positives=wrong).item() > 10
    with pytest.raises(MmkdError, match="positives"):
        contrastive_kd(bank[pos], None, bank=bank)
    with pytest.raises(MmkdError, match="symmetric"):
        contrastive_kd(bank[pos], None, bank=bank, positives=pos, symmetric=True)


def test_itc_known_answers_and_logit_scale():
    e = eye(4)
    assert itc(e, e.clone(), temperature=0.01).item() < 1e-6
    same = torch.ones(4, 8)
    assert itc(same, same).item() == pytest.approx(math.log(4), abs=1e-5)
    img, txt = torch.randn(6, 8), torch.randn(6, 8)
    fixed = itc(img, txt, temperature=0.1)
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    learnt = itc(img, txt, logit_scale=scale)
    assert learnt.item() == pytest.approx(fixed.item(), rel=1e-5)
    learnt.backward()
    assert scale.grad is not None and scale.grad != 0
    capped = itc(img, txt, logit_scale=torch.tensor(math.log(1000.0)))
    assert capped.item() == pytest.approx(itc(img, txt, temperature=0.01).item(), rel=1e-5)


def test_triplet_zero_when_margin_satisfied_exact_when_not():
    e = eye(3)
    assert triplet(e[:1], e[:1], e[1:2], margin=0.2).item() == 0.0
    pos = torch.tensor([[1.0, 1.0, 0.0]])  # d(a, p) = 1 − 1/√2
    assert triplet(e[:1], pos, e[:1], margin=0.2).item() == pytest.approx(1 - 1 / math.sqrt(2) + 0.2, abs=1e-6)


def test_triplet_hardest_in_batch_negative():
    anchor = eye(3)
    positive = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0, 0.8]])
    # anchor 0's hardest other positive is row 2 (cos 0.6): 0 − 0.4 + 0.5 = 0.1; anchor 2: d_pos 0.2, hardest
    # negative cos 0 → 0.2 − 1 + 0.5 < 0; anchor 1: 0 − 1 + 0.5 < 0.
    assert triplet(anchor, positive, margin=0.5).item() == pytest.approx(0.1 / 3, abs=1e-6)
    with pytest.raises(MmkdError, match="at least 2"):
        triplet(anchor[:1], positive[:1])


def test_triplet_identical_targets_are_not_negatives():
    targets = eye(3)[[0, 1, 0]]  # samples 0 and 2 share their target
    perfect = targets.clone().requires_grad_(True)
    loss = triplet(perfect, targets, margin=0.2)
    # the old rule took the twin as the hardest negative: d_neg = 0, hinge 0.2 for anchors 0 and 2 → 0.4 / 3
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(perfect.grad == 0)
    # not perfect: anchor 2 sits at cos 0.8 to its target and 0.6 to e1 (row 1, a true negative):
    # 0.2 − 0.4 + 0.5 = 0.3; anchors 0, 1, 3 are 1 from every negative. The twin rule gives (0.5 + 0.5) / 4.
    positive = eye(3)[[0, 1, 0, 2]]
    anchor = positive.clone()
    anchor[2] = torch.tensor([0.8, 0.6, 0.0])
    assert triplet(anchor, positive, margin=0.5).item() == pytest.approx(0.3 / 4, abs=1e-6)
    # no negative at all (one target for the whole batch): 0, and a finite gradient
    x = torch.randn(3, 4, requires_grad=True)
    lone = triplet(x, torch.ones(3, 4), margin=0.2)
    lone.backward()
    assert lone.item() == 0.0 and torch.isfinite(x.grad).all()


# ---- MSD --------------------------------------------------------------------------------------------


def test_msd_saliency():
    t = eye(3)
    sal = msd_saliency(t, {"image": t.clone(), "text": torch.roll(t, 1, dims=1)})
    assert sal["image"].tolist() == pytest.approx([0, 0, 0], abs=1e-6)
    assert sal["text"].tolist() == pytest.approx([1, 1, 1], abs=1e-6)


def test_msd_weights_modes():
    sal = {"image": torch.tensor([0.2, 0.0, 0.5, 0.0]), "text": torch.tensor([0.6, 0.3, 0.5, 0.0])}
    w = msd_weights(sal, "sample")
    assert (w["image"] + w["text"]).tolist() == pytest.approx([1.0] * 4)
    assert w["image"].tolist() == pytest.approx([0.25, 0.0, 0.5, 0.5])  # equal saliencies / all zero → equal

    d = msd_weights(sal, "dataset")
    assert (d["image"] + d["text"]).tolist() == pytest.approx([1.0] * 4)
    assert d["image"].tolist() == pytest.approx([0.7 / 2.1] * 4)

    f = msd_weights(sal, "fixed", fixed={"image": 3, "text": 1})
    assert f["image"].tolist() == pytest.approx([0.75] * 4) and f["text"].tolist() == pytest.approx([0.25] * 4)

    with pytest.raises(MmkdError, match="--loss-option msd_fixed"):
        msd_weights(sal, "fixed", fixed={"image": 1})
    with pytest.raises(MmkdError, match="--loss-option msd_fixed"):
        msd_weights(sal, "fixed", fixed={"image": -1, "text": 1})
    with pytest.raises(MmkdError, match="--loss-option msd_mode='median'"):
        msd_weights(sal, "median")


def test_msd_loss_is_weighted_per_sample():
    t = {"image": torch.zeros(2, 4), "text": torch.zeros(2, 4)}
    s = {"image": torch.full((2, 4), 1.0), "text": torch.tensor([[2.0] * 4, [3.0] * 4])}
    # per-sample pooled MSE: image [1, 1], text [4, 9]
    w = {"image": torch.tensor([1.0, 0.5]), "text": torch.tensor([0.0, 0.5])}
    assert msd_loss(s, t, w).item() == pytest.approx((1.0 + 0.5 * 1 + 0.5 * 9) / 2)
    ones = {"image": torch.ones(2, 4), "text": torch.ones(2, 4)}
    assert msd_loss(s, ones, w, base="pooled_cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MmkdError, match="--loss-option msd_base"):
        msd_loss(s, t, w, base="kl")
    with pytest.raises(MmkdError, match="same modalities"):
        msd_loss(s, {"image": t["image"]}, w)


def test_msd_term_uses_cos_weight_for_mse_cosine_base():
    g = torch.Generator().manual_seed(5)
    s = {m: torch.randn(3, 4, generator=g) for m in ("image", "text")}
    t = {m: torch.randn(3, 4, generator=g) for m in ("image", "text")}
    w = {"image": torch.full((3,), 0.25), "text": torch.full((3,), 0.75)}
    batch = {"pooled": s, "teacher_by_modality": t, "msd_weights": w}
    _, v = build_loss("msd", msd_base="mse_cosine", cos_weight=0.5)(batch)
    want = sum(w[m] * (pooled_mse(s[m], t[m], "none") + 0.5 * pooled_cosine(s[m], t[m], "none")) for m in s)
    assert v["msd"] == pytest.approx(want.mean().item(), rel=1e-6)  # cos_weight 1 gives another value
    assert abs(msd_loss(s, t, w, "mse_cosine").item() - v["msd"]) > 0.05


# ---- gradients --------------------------------------------------------------------------------------


def _grad_cases():
    g = torch.Generator().manual_seed(1)
    tok_t, mask = padded_batch()
    emb_t = torch.randn(4, 6, generator=g)
    msd_w = {"image": torch.full((4,), 0.3), "text": torch.full((4,), 0.7)}
    return {
        "token_mse": ((3, 5, 4), lambda p: token_mse(p, tok_t, mask)),
        "cls_mse": ((3, 5, 4), lambda p: cls_mse(p, tok_t)),
        "mse_cosine_tokens": ((3, 5, 4), lambda p: mse_cosine(p, tok_t, mask)),
        "mse_cosine": ((4, 6), lambda p: mse_cosine(p, emb_t)),
        "pooled_mse": ((4, 6), lambda p: pooled_mse(p, emb_t)),
        "pooled_cosine": ((4, 6), lambda p: pooled_cosine(p, emb_t)),
        "contrastive_kd": ((4, 6), lambda p: contrastive_kd(p, emb_t, bank=torch.randn(5, 6), symmetric=True)),
        "itc": ((4, 6), lambda p: itc(p, emb_t)),
        "triplet": ((4, 6), lambda p: triplet(p, emb_t, margin=2.0)),
        "msd": ((4, 6), lambda p: msd_loss({"image": p, "text": p * 2}, {"image": emb_t, "text": -emb_t}, msd_w)),
    }


@pytest.mark.parametrize("name", list(_grad_cases()))
def test_gradient_flows(name):
    shape, fn = _grad_cases()[name]
    pred = torch.randn(*shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = fn(pred)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_half_precision_inputs_give_float32_loss():
    target, mask = padded_batch()
    assert token_mse(target.half(), target.bfloat16(), mask).dtype == torch.float32


# ---- spec parsing and the combined loss -------------------------------------------------------------


def test_parse_loss_spec():
    assert parse_loss_spec("token_mse=1,pooled_cosine=0.5") == {"token_mse": 1.0, "pooled_cosine": 0.5}
    assert parse_loss_spec(" token_mse , pooled_mse=2 ") == {"token_mse": 1.0, "pooled_mse": 2.0}
    with pytest.raises(MmkdError, match="must be a number"):
        parse_loss_spec("token_mse=abc")
    with pytest.raises(MmkdError, match="given twice"):
        parse_loss_spec("token_mse=1,token_mse=2")


def test_build_loss_rejects_bad_specs():
    with pytest.raises(MmkdError, match=r"unknown term 'tokn_mse'; known: .*token_mse"):
        build_loss("tokn_mse=1")
    with pytest.raises(MmkdError, match="positive"):
        build_loss({"token_mse": 0.0})
    with pytest.raises(MmkdError, match="at least one"):
        build_loss("")
    with pytest.raises(MmkdError, match="given twice"):
        build_loss({"pooled_mse": 1.0, "mse": 1.0})
    with pytest.raises(MmkdError, match="'temprature'"):
        build_loss("contrastive_kd", temprature=0.1)


def test_combined_loss_sums_weighted_terms():
    target, mask = padded_batch()
    pooled_t = target[:, 0]
    batch = {
        "tokens": target + 1,
        "tokens_target": target,
        "mask": mask,
        "pooled": pooled_t + 2,
        "pooled_target": pooled_t,
    }
    total, values = build_loss("token_mse=1,pooled_mse=0.5")(batch)
    assert values == pytest.approx({"token_mse": 1.0, "pooled_mse": 4.0})
    assert total.item() == pytest.approx(1.0 + 0.5 * 4.0)
    with pytest.raises(MmkdError, match="--loss cls_mse: the batch lacks tokens"):
        build_loss("cls_mse")({"pooled": pooled_t})


def test_combined_multimodal_terms_all_run_and_backpropagate():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(4, 8, generator=g, requires_grad=True)
    txt = torch.randn(4, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 8, generator=g)
    t_img, t_txt = t + 0.1 * torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    batch = {
        "pooled": {"image": img, "text": txt},
        "pooled_target": t,
        "bank": torch.randn(16, 8, generator=g),
        "logit_scale": torch.tensor(math.log(1 / 0.07), requires_grad=True),
        "teacher_by_modality": {"image": t_img, "text": t_txt},
        "teacher_without": {"image": t_txt, "text": t_img},  # removing the image leaves the text-only output
    }
    terms = ["pooled_mse", "pooled_cosine", "mse_cosine", "contrastive_kd", "triplet", "itc", "msd"]
    assert set(terms) <= set(LOSSES.names())
    loss = build_loss(",".join(terms), msd_mode="dataset", symmetric=True, margin=1.0)
    total, values = loss(batch)
    assert set(values) == set(terms) and all(math.isfinite(v) for v in values.values())
    assert total.item() == pytest.approx(sum(values.values()), rel=1e-5)
    total.backward()
    for x in (img, txt, batch["logit_scale"]):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the pooled term averages over the student's modalities
    assert values["pooled_mse"] == pytest.approx(0.5 * (pooled_mse(img, t) + pooled_mse(txt, t)).item(), rel=1e-5)


def test_itc_term_needs_both_towers():
    with pytest.raises(MmkdError, match="--loss itc"):
        build_loss("itc")({"pooled": torch.randn(2, 3)})


def test_identical_targets_are_positives_not_negatives():
    t = torch.eye(4)[[0, 1, 0, 2]] * 3.0  # samples 0 and 2 share their target (one caption, two images)
    labels = same_target(t)
    assert labels.tolist() == [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]]
    ids = torch.tensor([[101, 7, 102], [101, 8, 102], [101, 7, 102], [101, 9, 0]])  # captions as token ids
    torch.testing.assert_close(same_target(ids), labels)
    # a student that reproduces the targets: the twin is no negative, so nothing is left at small τ (the old
    # rule, twin in the softmax, left ln 2 for samples 0 and 2: 0.347)
    assert contrastive_kd(t, t, temperature=0.01).item() < 1e-6
    # τ = 1: sample 0 picks e0 among {e0, e1, e2} without its twin, samples 1 and 3 among all four
    want = (2 * (math.log(math.e + 2) - 1) + 2 * (math.log(math.e + 3) - 1)) / 4  # twin kept: ln(2e + 2) − 1
    assert contrastive_kd(t, t, temperature=1.0).item() == pytest.approx(want, abs=1e-6)
    # the other direction: target 0 picks student 0 without student 2 (and target 2 student 2): 0 as well
    assert contrastive_kd(t, t, temperature=0.01, symmetric=True).item() < 1e-6
    # twins' students that differ (τ = 1): each direction leaves the twin out of row 0's and row 2's softmax
    g = torch.Generator().manual_seed(2)
    student = t + torch.randn(4, 4, generator=g)
    twin = {0: 2, 2: 0}

    def without_twins(logits):
        return torch.stack(
            [torch.logsumexp(logits[i, [j for j in range(4) if j != twin.get(i)]], 0) - logits[i, i] for i in range(4)]
        ).mean()

    logits = F.normalize(student.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T
    want = 0.5 * (without_twins(logits) + without_twins(logits.T))
    got = contrastive_kd(student, t, temperature=1.0, symmetric=True)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    # twins kept in the other direction, as negatives or sharing the label (the same sum): another value
    kept = 0.5 * (without_twins(logits) + F.cross_entropy(logits.T, torch.arange(4)))
    assert abs(kept.item() - got.item()) > 0.05
    # itc with the targets as caption keys and towers that agree: ln 2 for the two pairs of the shared caption
    assert itc(t, t, temperature=0.01, targets=t).item() == pytest.approx(0.5 * math.log(2), abs=1e-5)


def test_identical_targets_within_the_promised_cosine():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(64, dtype=torch.float64, generator=g), dim=0)
    u = torch.randn(64, dtype=torch.float64, generator=g)
    u = F.normalize(u - (u @ x) * x, dim=0)  # orthogonal to x

    def at(one_minus_cos):  # a vector whose cosine to x is exactly 1 − one_minus_cos
        c = 1 - one_minus_cos
        return 3 * (c * x + math.sqrt(1 - c * c) * u)

    # float32 rounding of a cosine is ~1e-7, far from both sides of the 1e-6 bound
    others = torch.stack([at(0.0), at(4e-7), at(4e-6), at(0.5)]).float()
    assert identical_targets(x[None].float(), others).tolist() == [[True, True, False, False]]
    ids = torch.tensor([[1, 2, 0], [1, 2, 3]])
    assert identical_targets(ids, torch.tensor([[1, 2, 0], [1, 2, 3], [1, 2, 4]])).tolist() == [
        [True, False, False],
        [False, True, False],
    ]


def test_contrastive_kd_bank_copies_of_batch_targets_are_not_negatives():
    g = torch.Generator().manual_seed(0)
    targets, others = torch.randn(3, 64, generator=g), torch.randn(2, 64, generator=g)
    # the bank holds other samples' targets and two of a repeated caption whose target is sample 1's (one
    # scaled, one rounded through float16 as a store keeps it)
    bank = torch.cat([2 * targets[1:2], others, targets[1:2].half().float()])
    # τ = 1, student = targets; the copies are negatives of samples 0 and 2 (another target), not of sample 1
    loss = contrastive_kd(targets, targets, temperature=1.0, bank=bank)
    s = F.normalize(targets, dim=-1)
    cand = F.normalize(torch.cat([targets, bank]), dim=-1)
    logits = s @ cand.T
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[1, [3, 6]] = False  # the copies, dropped for sample 1 only
    want = torch.stack([torch.logsumexp(logits[i][keep[i]], 0) - logits[i, i] for i in range(3)]).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    wrong = F.cross_entropy(logits, torch.arange(3))  # copies as negatives (or as soft positives: the same)
    assert wrong.item() - loss.item() > 0.15
    # the perfect student at small τ: 0; copies as negatives leave ln 3 for sample 1 (0.37 over the batch)
    assert contrastive_kd(targets, targets, temperature=0.01, bank=bank).item() < 1e-6
    # bank alone: copies of the designated positive are dropped the same way
    pos = torch.tensor([0])
    alone = contrastive_kd(bank[pos], None, temperature=1.0, bank=bank, positives=pos)
    assert alone.item() == pytest.approx(
        contrastive_kd(bank[pos], None, temperature=1.0, bank=bank[:3], positives=pos).item(), abs=1e-6
    )
    kept = F.cross_entropy(F.normalize(bank[pos], dim=-1) @ F.normalize(bank, dim=-1).T, pos)  # copy as negative
    assert kept.item() - alone.item() > 0.3
    # the training loop hands the bank to the registered term
    batch = {"pooled": targets, "pooled_target": targets, "bank": bank}
    _, values = build_loss("contrastive_kd", temperature=1.0)(batch)
    assert values["contrastive_kd"] == pytest.approx(loss.item(), abs=1e-6)


def test_itc_repeated_captions_are_matches_with_distinct_embeddings():
    # pairs 0 and 1 share a caption; the towers disagree (img 0 = txt 1, img 1 = txt 0), τ = 1:
    # logits [[0, 1, 0], [1, 0, 0], [0, 0, 1]], labels [[½, ½, 0], [½, ½, 0], [0, 0, 1]] in both directions
    img, txt = eye(3), eye(3)[[1, 0, 2]]
    ids = torch.tensor([[101, 7, 102, 0], [101, 7, 102, 0], [101, 9, 102, 0]])
    want = math.log(math.e + 2) - 2 / 3  # one-hot labels: ln(e + 2) − 1/3
    assert itc(img, txt, temperature=1.0, targets=ids).item() == pytest.approx(want, abs=1e-6)
    assert itc(img, txt, temperature=1.0).item() == pytest.approx(math.log(math.e + 2) - 1 / 3, abs=1e-6)
    # random towers, a caption repeated three times (rows 0, 2, 5) and one twice (1, 4): float64 reference
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    keys = [0, 1, 0, 2, 1, 0]
    ids = torch.tensor([[101, 10 + k, 102] for k in keys])
    logits = (F.normalize(img.double(), dim=-1) @ F.normalize(txt.double(), dim=-1).T) / 0.1
    same = torch.tensor([[float(a == b) for b in keys] for a in keys], dtype=torch.float64)
    y = same / same.sum(1, keepdim=True)
    ref = 0.5 * (-(y * logits.log_softmax(1)).sum(1).mean() - (y * logits.T.log_softmax(1)).sum(1).mean())
    got = itc(img, txt, temperature=0.1, targets=ids)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert abs(itc(img, txt, temperature=0.1).item() - ref.item()) > 0.1  # the one-hot rule differs
    # the registered term reads the caption ids from the batch
    batch = {"pooled": {"image": img, "text": txt}, "caption_ids": ids}
    _, values = build_loss("itc", itc_temperature=0.1)(batch)
    assert values["itc"] == pytest.approx(ref.item(), rel=1e-5)


def test_pooled_target_norm_regresses_the_normalised_target():
    from mmkd_core.losses import CombinedLoss

    torch.manual_seed(0)
    t = 3.0 * torch.randn(8, 16)
    s = torch.nn.functional.normalize(t, dim=-1)  # the teacher_embed of teacher_mean t
    batch = {"pooled": s, "pooled_target": t}
    plain, _ = CombinedLoss({"pooled_mse": 1})(batch)
    normed, _ = CombinedLoss({"pooled_mse": 1}, pooled_target_norm=True)(batch)
    assert float(normed) < 1e-12 < 0.5 < float(plain)  # the wrong target is far from the normalised one
    with pytest.raises(MmkdError, match="give true or false"):
        CombinedLoss({"pooled_mse": 1}, pooled_target_norm="maybe")
