import numpy as np
import pytest
import torch
from reference import reference_targets

from mmkd_core.errors import MmkdError
from mmkd_core.targets import make_targets, masked_mean, pool_targets, select_layers


def random_batch(b=3, t=7, d=5, n_layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(b, t, d, generator=g) * (i + 1) + i for i in range(n_layers)]
    lengths = torch.tensor([t, 4, 2][:b])
    mask = torch.arange(t)[None] < lengths[:, None]
    return hs, mask, lengths


def test_matches_independent_reference():
    hs, mask, lengths = random_batch()
    layers = [1, 2, 3]
    y = make_targets(hs, mask, layers)
    for b in range(3):
        ref = reference_targets([h[b].numpy() for h in hs], int(lengths[b]), layers)
        np.testing.assert_allclose(y[b, : lengths[b]].numpy(), ref, atol=1e-5)
        assert torch.all(y[b, lengths[b] :] == 0)


def test_golden_values():
    # fixed input, stored output: catches any silent change of the recipe (eps, variance, order of norms)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) ** 1.5 / 10
    hs = [x, (x.flip(1) + 1).sqrt() * torch.tensor([1.0, -1, 2, -2])]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    golden = torch.tensor(
        [
            [[1.0398, -0.9957, 0.9594, -1.0034], [-1.6848, 0.7059, 0.1993, 0.7796], [-0.9622, 0.9987, -1.0370, 1.0006]],
            [[0.9999, -0.9999, 1.0000, -1.0000], [-0.9999, 0.9999, -1.0000, 1.0000], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    golden_noln = torch.tensor(
        [
            [
                [1.2820, -1.2524, 1.2379, -1.2296],
                [-0.1241, 0.0575, -0.0268, 0.0098],
                [-1.1579, 1.1949, -1.2111, 1.2198],
            ],
            [[0.9999, -0.9999, 1.0000, -1.0000], [-0.9999, 0.9999, -1.0000, 1.0000], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    torch.testing.assert_close(make_targets(hs, mask, [0, 1]), golden, atol=1e-4, rtol=0)
    torch.testing.assert_close(make_targets(hs, mask, [1], layer_norm_targets=False), golden_noln, atol=1e-4, rtol=0)


def test_golden_values_layer_norm():
    g = torch.Generator().manual_seed(3)
    hs = [torch.randn(1, 3, 4, generator=g) for _ in range(2)]
    mask = torch.ones(1, 3, dtype=torch.bool)
    y = make_targets(hs, mask, [0, 1])
    golden = torch.tensor(
        [[[0.8477, 1.1304, -1.1427, -0.8354], [1.7312, -0.5682, -0.5399, -0.6231], [-1.3922, -0.5025, 1.0324, 0.8623]]]
    )
    torch.testing.assert_close(y, golden, atol=1e-4, rtol=0)


def test_independent_of_batch_and_padding():
    g = torch.Generator().manual_seed(1)
    one = [torch.randn(1, 5, 8, generator=g) for _ in range(3)]
    alone = make_targets(one, torch.ones(1, 5, dtype=torch.bool), [0, 1, 2])
    # the same sample padded to 11 steps with garbage, inside a batch of other samples
    padded = [torch.cat([h, torch.randn(1, 6, 8, generator=g) * 100], 1) for h in one]
    others = [torch.randn(3, 11, 8, generator=g) * 7 for _ in range(3)]
    batch = [torch.cat([o[:2], p, o[2:]], 0) for o, p in zip(others, padded, strict=True)]
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[2, 5:] = False
    y = make_targets(batch, mask, [0, 1, 2])
    torch.testing.assert_close(y[2, :5], alone[0], atol=1e-5, rtol=0)
    p = pool_targets("mean", y, batch, mask)
    torch.testing.assert_close(
        p[2], pool_targets("mean", alone, one, torch.ones(1, 5, dtype=torch.bool))[0], atol=1e-5, rtol=0
    )


def test_pools():
    hs, mask, lengths = random_batch()
    y = make_targets(hs, mask, [0, 3])
    torch.testing.assert_close(pool_targets("cls", y, hs, mask), y[:, 0])
    torch.testing.assert_close(pool_targets("teacher_cls", y, hs, mask), hs[-1][:, 0])
    tm = pool_targets("teacher_mean", y, hs, mask)
    torch.testing.assert_close(tm[1], hs[-1][1, :4].mean(0))
    torch.testing.assert_close(masked_mean(hs[-1], mask)[2], hs[-1][2, :2].mean(0))
    # the recipe's targets averaged over valid steps only: sample 2 has 2, its padded steps are 0 in y
    mean = pool_targets("mean", y, hs, mask)
    torch.testing.assert_close(mean[2], y[2, :2].mean(0))
    assert not torch.allclose(mean[2], y[2].mean(0))
    assert not torch.allclose(tm[2], hs[-1][2].mean(0)) and torch.allclose(tm[2], hs[-1][2, :2].mean(0))
    emb = torch.randn(3, 9).half()
    embed = pool_targets("teacher_embed", y, hs, mask, emb)
    assert embed.dtype == torch.float32 and torch.equal(embed, emb.float())
    with pytest.raises(MmkdError, match="teacher_embed"):
        pool_targets("teacher_embed", y, hs, mask, None)
    with pytest.raises(MmkdError, match="--pool"):
        pool_targets("max", y, hs, mask)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        (None, [0, 1, 2, 3, 4, 5]),
        ("last:2", [4, 5]),
        ("last3", [3, 4, 5]),
        (2, [4, 5]),
        ("0,5", [0, 5]),
        ([3, -1], [3, 5]),
        ("5, 1", [1, 5]),
    ],
)
def test_select_layers(spec, expected):
    assert select_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["last:0", "last:7", "6", "0,0", "x", ""])
def test_select_layers_errors(spec):
    with pytest.raises(MmkdError, match="--layers"):
        select_layers(spec, 6)
