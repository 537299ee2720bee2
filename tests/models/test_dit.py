"""DiT velocity network: layers against torch references, presets, fusion, masking, precision."""
import pytest
import torch

from muvi.models.dit import DiT, DiTConfig
from muvi.models.layers import RMSNorm, RotaryEmbedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rmsnorm_matches_torch(dtype):
    ours, ref = RMSNorm(48, eps=1e-6), torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = 3 * torch.randn(4, 7, 48, dtype=torch.float64)
    out = ours(x.to(dtype))
    assert out.dtype == torch.float32  # the residual stream stays fp32 (appendix A)
    torch.testing.assert_close(out.double(), ref.double()(x.to(dtype).double()), rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16)
    q1, k1 = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    # Put the same q/k at positions (i, j) and (i + s, j + s): the scores must agree.
    seq_q, seq_k = torch.zeros(1, 1, 20, 16), torch.zeros(1, 1, 20, 16)
    seq_q[..., 3, :], seq_k[..., 7, :] = q1, k1
    seq_q[..., 12, :], seq_k[..., 16, :] = q1, k1
    q, k = rope(seq_q, seq_k)

    def score(i, j):
        return (q[0, 0, i] * k[0, 0, j]).sum()

    torch.testing.assert_close(score(3, 7), score(12, 16), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(3, 7), score(3, 16), atol=1e-3)
    torch.testing.assert_close(q.norm(dim=-1), seq_q.norm(dim=-1))  # a rotation


@pytest.mark.parametrize("preset,target", [("small", 85e6), ("base", 150e6), ("large", 330e6)])
def test_preset_sizes_match_the_paper(preset, target):
    cfg = DiTConfig.preset(preset)
    with torch.device("meta"):
        n = DiT(cfg).num_parameters()
    assert abs(n - target) / target < 0.10, n


def tiny():
    torch.manual_seed(0)
    net = DiT(DiTConfig.preset("tiny"))
    torch.nn.init.normal_(net.out.weight, std=0.2)
    return net.eval()


def test_condition_is_fused_frame_by_frame():
    # Changing the condition at one frame must change the input sum at that frame only, so the
    # velocity changes everywhere (attention) but the first-layer input only there.
    net = tiny()
    x, t, c = torch.randn(1, 6, 8), torch.rand(1), torch.randn(1, 6, 64)
    c2 = c.clone()
    c2[0, 2] += 1.0
    seen = []
    hook = net.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    net(x, t, c), net(x, t, c2)
    hook.remove()
    diff = (seen[0] - seen[1]).abs().sum(-1)[0]
    assert diff[2] > 0 and torch.all(diff[torch.arange(6) != 2] == 0)


def test_null_condition_is_the_default_and_learnable():
    net = tiny()
    x, t = torch.randn(2, 5, 8), torch.rand(2)
    torch.testing.assert_close(net(x, t), net(x, t, net.null_condition(2, 5)))
    assert net.null_cond.requires_grad
    net(x, t).sum().backward()
    assert net.null_cond.grad is not None and net.null_cond.grad.abs().sum() > 0


def test_padding_does_not_leak_into_valid_frames():
    net = tiny()
    x, c = torch.randn(1, 9, 8), torch.randn(1, 9, 64)
    valid = torch.arange(9)[None] < 6
    out = net(x, torch.rand(1), c, valid)
    x2, c2 = x.clone(), c.clone()
    x2[:, 6:], c2[:, 6:] = torch.randn(1, 3, 8), torch.randn(1, 3, 64)
    torch.testing.assert_close(net(x2, torch.rand(1).fill_(0) + 0, c2, valid)[:, :6],
                               net(x, torch.zeros(1), c, valid)[:, :6])
    assert out.shape == (1, 9, 8)


def test_per_frame_time_equals_broadcast_time():
    net = tiny()
    x, c = torch.randn(2, 5, 8), torch.randn(2, 5, 64)
    t = torch.tensor([0.3, 0.8])
    torch.testing.assert_close(net(x, t, c), net(x, t[:, None].expand(2, 5), c))


def test_residual_stream_is_fp32_under_autocast():
    net = tiny()
    dtypes = []
    net.blocks[1].register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 4, 8), torch.rand(1), torch.randn(1, 4, 64))
    assert dtypes == [torch.float32] and out.dtype == torch.float32


def test_condition_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="resample the condition"):
        tiny()(torch.randn(1, 5, 8), torch.rand(1), torch.randn(1, 4, 64))


def test_zero_initialised_output_gives_zero_velocity():
    net = DiT(DiTConfig.preset("tiny"))
    assert net(torch.randn(1, 3, 8), torch.rand(1)).abs().max() == 0
