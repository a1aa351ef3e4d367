import math

import pytest
import torch

from mmkd_core.errors import MmkdError
from mmkd_core.losses import (
    LOSSES,
    build_loss,
    cls_mse,
    contrastive_kd,
    itc,
    msd_loss,
    msd_saliency,
    msd_weights,
    mse_cosine,
    parse_loss_spec,
    pooled_cosine,
    pooled_mse,
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
    same = torch.ones(5, 3)
    assert contrastive_kd(same, same, temperature=0.05).item() == pytest.approx(math.log(5), abs=1e-5)
    assert contrastive_kd(same, same, bank=torch.ones(3, 3)).item() == pytest.approx(math.log(8), abs=1e-5)
    assert contrastive_kd(same, same, symmetric=True).item() == pytest.approx(math.log(5), abs=1e-5)
    # two samples, τ = 1: −log(e / (e + 1))
    assert contrastive_kd(e[:2], e[:2], temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), 1e-5)


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

    with pytest.raises(MmkdError, match="--msd-weights"):
        msd_weights(sal, "fixed", fixed={"image": 1})
    with pytest.raises(MmkdError, match="--msd-weights"):
        msd_weights(sal, "fixed", fixed={"image": -1, "text": 1})
    with pytest.raises(MmkdError, match="--msd-weighting 'median'"):
        msd_weights(sal, "median")


def test_msd_loss_is_weighted_per_sample():
    t = {"image": torch.zeros(2, 4), "text": torch.zeros(2, 4)}
    s = {"image": torch.full((2, 4), 1.0), "text": torch.tensor([[2.0] * 4, [3.0] * 4])}
    # per-sample pooled MSE: image [1, 1], text [4, 9]
    w = {"image": torch.tensor([1.0, 0.5]), "text": torch.tensor([0.0, 0.5])}
    assert msd_loss(s, t, w).item() == pytest.approx((1.0 + 0.5 * 1 + 0.5 * 9) / 2)
    ones = {"image": torch.ones(2, 4), "text": torch.ones(2, 4)}
    assert msd_loss(s, ones, w, base="pooled_cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(MmkdError, match="--msd-base"):
        msd_loss(s, t, w, base="kl")
    with pytest.raises(MmkdError, match="same modalities"):
        msd_loss(s, {"image": t["image"]}, w)


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
    from mmkd_core.losses import contrastive_kd, itc, same_target

    t = torch.eye(4)[[0, 1, 0, 2]] * 3.0  # samples 0 and 2 share their target (one caption, two images)
    labels = same_target(t)
    torch.testing.assert_close(labels.sum(-1), torch.ones(4))
    assert labels[0, 2] == labels[0, 0] == 0.5 and labels[1, 1] == 1.0
    # a student that reproduces the targets: only the shared pair's ambiguity (ln 2) is left, at small tau
    loss = contrastive_kd(t, t, temperature=0.01)
    assert abs(float(loss) - 0.5 * float(torch.log(torch.tensor(2.0)))) < 1e-3
    assert abs(float(itc(t, t, temperature=0.01, targets=t)) - 0.5 * float(torch.log(torch.tensor(2.0)))) < 1e-3
    # hard labels would make candidate 2 a negative of sample 0: its target then carries all the mass on 0
    hard = contrastive_kd(t, t, temperature=0.01, positives=torch.arange(4))
    torch.testing.assert_close(hard, loss)  # same value at the tie, but the soft labels are what it is compared to
    assert labels[0].tolist() == [0.5, 0.0, 0.5, 0.0]
    ids = torch.tensor([[101, 7, 102], [101, 8, 102], [101, 7, 102], [101, 9, 0]])  # captions as token ids
    torch.testing.assert_close(same_target(ids), labels)
