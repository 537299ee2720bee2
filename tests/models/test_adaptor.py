"""Visual adaptor: each aggregation against a direct computation or torch's attention."""
import pytest
import torch
import torch.nn.functional as F

from muvi.models.adaptor import AGGREGATIONS, AdaptorConfig, VisualAdaptor, resample_time


def make(aggregation, seed=0):
    torch.manual_seed(seed)
    return VisualAdaptor(AdaptorConfig.preset("tiny", aggregation=aggregation)).eval()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_shapes(aggregation):
    out = make(aggregation)(torch.randn(2, 5, 14, 14, 32), 10, cls=torch.randn(2, 5, 32))
    assert out.shape == (2, 10, 64)


def gated_reference(m, tokens, use_softmax):
    grid = m.down(tokens.flatten(0, 1).permute(0, 3, 1, 2))            # (BN, D, 7, 7)
    assert grid.shape[-2:] == (7, 7)                                    # stride 2: 14×14 → 7×7
    logits = m.gate(grid).flatten(2)                                    # (BN, 4, 49)
    feats = grid.flatten(2)                                             # (BN, D, 49)
    groups = []
    for g in range(4):
        w = logits[:, g].softmax(-1) if use_softmax else torch.sigmoid(logits[:, g])
        avg = (feats * w[:, None]).sum(-1)
        groups.append(avg if use_softmax else avg / w.sum(-1, keepdim=True))
    return m.out(torch.stack(groups).mean(0)).view(*tokens.shape[:2], -1)


@pytest.mark.parametrize("aggregation", ["softmax", "sigmoid"])
def test_gated_aggregation_matches_the_paper_formula(aggregation):
    m = make(aggregation)
    tokens = torch.randn(2, 3, 14, 14, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.aggregate(tokens), gated_reference(m, tokens, aggregation == "softmax"),
                                   rtol=1e-5, atol=1e-5)


def test_attention_pooling_matches_torch_multihead_attention():
    m = make("attention")
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([m.query.weight, m.key.weight, m.value.weight]))
        mha.in_proj_bias.copy_(torch.cat([m.query.bias, m.key.bias, m.value.bias]))
        mha.out_proj.weight.copy_(m.out.weight)
        mha.out_proj.bias.copy_(m.out.bias)
        tokens, cls = torch.randn(2, 3, 14, 14, 32), torch.randn(2, 3, 32)
        patches = m.down(tokens.flatten(0, 1).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        ref, _ = mha(m.cls_proj(cls.flatten(0, 1))[:, None], patches, patches)
        torch.testing.assert_close(m.aggregate(tokens, cls), ref.view(2, 3, 64), rtol=1e-5, atol=1e-5)


def test_mean_and_cls():
    tokens, cls = torch.randn(1, 2, 14, 14, 32), torch.randn(1, 2, 32)
    m = make("mean")
    with torch.no_grad():
        grid = m.down(tokens.flatten(0, 1).permute(0, 3, 1, 2))
        torch.testing.assert_close(m.aggregate(tokens), m.out(grid.mean((2, 3))).view(1, 2, -1))
        m = make("cls")
        torch.testing.assert_close(m.aggregate(tokens, cls), m.out(m.cls_proj(cls)))
    with pytest.raises(ValueError, match="CLS"):
        m.aggregate(tokens)


def test_resample_time():
    x = torch.randn(2, 5, 3)
    assert resample_time(x, 5) is x
    torch.testing.assert_close(resample_time(torch.ones(1, 4, 2), 9), torch.ones(1, 9, 2))
    up = resample_time(x, 10)  # 5 Hz → 10 Hz: linear interpolation between neighbours
    torch.testing.assert_close(up, F.interpolate(x.transpose(1, 2), 10, mode="linear").transpose(1, 2))
    torch.testing.assert_close(up[:, 1], 0.75 * x[:, 0] + 0.25 * x[:, 1])


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="unknown aggregation"):
        AdaptorConfig(aggregation="max")
