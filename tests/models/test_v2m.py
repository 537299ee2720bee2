"""VideoToMusicFlow: the objective that training and inference share (muvi.models.v2m)."""
import pytest
import torch

from muvi import flow
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.v2m import FlowObjective, VideoToMusicFlow


def tiny(adaptor=True, **objective) -> VideoToMusicFlow:
    torch.manual_seed(0)
    dit = DiT(DiTConfig.preset("tiny"))
    torch.nn.init.normal_(dit.out.weight, std=0.5)  # a zero head would predict 0 everywhere
    ada = VisualAdaptor(AdaptorConfig.preset("tiny", width=dit.config.width)) if adaptor else None
    return VideoToMusicFlow(dit, ada, FlowObjective(**objective)).eval()


def batch(b=3, n=12):
    torch.manual_seed(1)
    x1 = torch.randn(b, n, 8)
    lengths = torch.tensor([n, n - 3, n - 5][:b])
    valid = torch.arange(n)[None] < lengths[:, None]
    tokens = torch.randn(b, (n + 1) // 2, 4, 4, 32)
    return x1 * valid[..., None], valid, tokens, (lengths + 1) // 2


def test_condition_is_the_adaptor_per_item_in_training_and_inference():
    model = tiny()
    x1, valid, tokens, token_lengths = batch()
    lengths = valid.sum(1)
    cond = model.condition(tokens, lengths, token_lengths)
    for b in range(3):  # one item alone, as inference sees it, through the adaptor's own forward
        n, t = int(token_lengths[b]), int(lengths[b])
        alone = model.adaptor(tokens[b:b + 1, :n], t)
        assert torch.equal(model.condition(tokens[b:b + 1, :n], lengths[b:b + 1]), alone)  # bit for bit
        # in a batch the convolutions round differently (float32), nothing else differs
        torch.testing.assert_close(cond[b, :t], alone[0], rtol=1e-5, atol=1e-6)
        assert cond[b, t:].abs().sum() == 0


def test_loss_equals_the_flow_maths_done_by_hand():
    """forward draws prefix, time, noise and dropout in a fixed order from the generator; the
    same draws composed from muvi.flow's functions give the same loss."""
    model = tiny(cond_drop_prob=0.5, icl_prob=0.5, icl_max_seconds=0.4)
    x1, valid, tokens, token_lengths = batch()
    with torch.no_grad():
        loss = model(x1, valid, torch.Generator().manual_seed(0), tokens, token_lengths)
        g = torch.Generator().manual_seed(0)
        b, n, _ = x1.shape
        lengths = valid.sum(1)
        icl = torch.rand(b, generator=g) < 0.5
        prefix = torch.tensor([min(4, int(0.33 * int(n_))) if i else 0 for n_, i in zip(lengths, icl)])
        context = flow.context_mask(prefix, n)
        t = torch.rand(b, generator=g)
        x0 = torch.randn(x1.shape, generator=g)
        t_frames = torch.where(context, torch.ones(b, n), t[:, None].expand(b, n))
        x_t = (1 - t_frames[..., None]) * x0 + t_frames[..., None] * x1
        drop = torch.rand(b, generator=g) < 0.5
        null = model.dit.null_condition(b, n)
        cond = torch.where((drop[:, None] | context)[..., None], null,
                           model.condition(tokens, lengths, token_lengths, n))
        v = model.dit(x_t, t_frames, cond, valid)
        weight = (~context & valid).float()
        want = (((v - (x1 - x0)) ** 2).mean(-1) * weight).sum() / weight.sum()
    assert icl.any() and not icl.all()  # both branches exercised with this seed
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)


def test_dropped_condition_ignores_the_video_and_unconditional_needs_none():
    x1, valid, tokens, token_lengths = batch()
    model = tiny(cond_drop_prob=1.0)
    with torch.no_grad():
        a = model(x1, valid, torch.Generator().manual_seed(0), tokens, token_lengths)
        b = model(x1, valid, torch.Generator().manual_seed(0), torch.randn_like(tokens), token_lengths)
        kept = tiny(cond_drop_prob=0.0, icl_prob=0.0)
        c = kept(x1, valid, torch.Generator().manual_seed(0), tokens, token_lengths)
        d = kept(x1, valid, torch.Generator().manual_seed(0), torch.randn_like(tokens), token_lengths)
        uncond = tiny(adaptor=False)
        e = uncond(x1, valid, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(c, d) and torch.isfinite(e)


def test_sampling_keeps_the_prompt_and_cuts_it_off():
    model = tiny()
    cond = torch.randn(1, 10, 64)
    prompt = torch.randn(1, 4, 8)
    plain = model.sample(cond, num_steps=3, seed=2)
    prompted = model.sample(cond, num_steps=3, seed=2, prefix=prompt)
    assert plain.shape == prompted.shape == (1, 10, 8)
    assert not torch.equal(plain, prompted)
    assert torch.equal(model.sample(cond, num_steps=3, seed=2), plain)  # the seed fixes the noise


def test_prompt_guidance_moves_only_prompted_sampling_and_counts_evaluations_once():
    model = tiny()
    cond = torch.randn(1, 10, 64)
    prompt = torch.randn(1, 4, 8)
    calls = []
    prompted = model.sample(cond, num_steps=3, seed=2, prefix=prompt)
    guided = model.sample(cond, num_steps=3, seed=2, prefix=prompt, prompt_scale=2.0,
                          callback=lambda: calls.append(1))
    assert len(calls) == 3  # one per guided evaluation, as the progress bar expects
    assert guided.shape == prompted.shape and not torch.allclose(guided, prompted)
    assert torch.equal(model.sample(cond, num_steps=3, seed=2, prompt_scale=2.0),
                       model.sample(cond, num_steps=3, seed=2))  # no prompt: nothing to guide on


def test_adaptor_width_must_match_the_dit():
    dit = DiT(DiTConfig.preset("tiny"))
    with pytest.raises(ValueError, match="condition width"):
        VideoToMusicFlow(dit, VisualAdaptor(AdaptorConfig.preset("tiny", width=dit.config.width * 2)))


@pytest.mark.parametrize("aggregation", ["cls", "attention"])
def test_cls_tokens_reach_the_adaptor_in_condition_and_loss(aggregation):
    torch.manual_seed(0)
    dit = DiT(DiTConfig.preset("tiny"))
    torch.nn.init.normal_(dit.out.weight, std=0.5)
    ada = VisualAdaptor(AdaptorConfig.preset("tiny", width=dit.config.width, aggregation=aggregation))
    model = VideoToMusicFlow(dit, ada, FlowObjective(cond_drop_prob=0.0, icl_prob=0.0))
    x1, valid, tokens, token_lengths = batch()
    cls = torch.randn(*tokens.shape[:2], 32)  # (B, N, E), padded like the tokens
    lengths = valid.sum(1)
    with torch.no_grad():
        cond = model.condition(tokens, lengths, token_lengths, cls=cls)
        for b in range(3):
            n, t = int(token_lengths[b]), int(lengths[b])
            alone = model.adaptor(tokens[b:b + 1, :n], t, cls=cls[b:b + 1, :n])
            torch.testing.assert_close(cond[b, :t], alone[0], rtol=1e-5, atol=1e-6)
            assert cond[b, t:].abs().sum() == 0
    with pytest.raises(ValueError, match="needs the encoder's CLS tokens"):
        model.condition(tokens, lengths, token_lengths)
    loss = model(x1, valid, torch.Generator().manual_seed(0), tokens, token_lengths, cls=cls)
    loss.backward()
    assert model.adaptor.cls_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        zeroed = model(x1, valid, torch.Generator().manual_seed(0), tokens, token_lengths, cls=torch.zeros_like(cls))
    assert torch.isfinite(loss) and not torch.allclose(loss, zeroed)
