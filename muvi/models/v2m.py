"""The video-to-music objective around its networks: one object for training and inference.

:class:`VideoToMusicFlow` takes the DiT (and, for video-to-music, the visual adaptor) as
arguments and owns everything between them and the rectified-flow maths of :mod:`muvi.flow`
(as F5-TTS's ``CFM`` wraps its backbone): building the condition from video tokens, the null
condition and its dropout for classifier-free guidance, the in-context prefix (partial
denoising, paper section 4.3), the loss, and guided sampling. ``recipes/train_dit.py`` trains
it and :class:`muvi.pipeline.MuviPipeline` samples from it, so the condition the DiT is trained
with and the one it is sampled with are made by the same code.

Shapes: B batch, T latent frames, C latent channels, D width, N token steps, (h, w, E) the
encoder's patch grid and width; ``cls`` (B, N, E): the encoder's CLS tokens (CLIP), which the
adaptor's ``attention`` and ``cls`` aggregations need and the others ignore.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from muvi import flow
from muvi.config import Config
from muvi.models.adaptor import VisualAdaptor, resample_time
from muvi.models.dit import DiT
from muvi.models.layers import packed_linears


@dataclasses.dataclass
class FlowObjective(Config):
    """Training-time choices of the objective (paper sections 4.1 and 4.3, appendix B)."""

    latent_rate: float = 10.0       # latent frames per second (prefix lengths are in seconds)
    cond_drop_prob: float = 0.2     # the condition is replaced by the null embedding (CFG)
    icl_prob: float = 0.8           # a clean prefix is given as context (partial denoising)
    icl_max_seconds: float = 14.0   # the prefix is the shorter of 14 s ...
    icl_max_fraction: float = 0.33  # ... and 33 % of the clip
    time_distribution: str = "uniform"


class VideoToMusicFlow(nn.Module):
    """``dit`` with, for video-to-music, ``adaptor`` (None: unconditional, the null embedding
    everywhere). ``forward`` is the training loss (so DDP sees one forward); :meth:`sample`
    solves the guided flow ODE."""

    #: sample on the CPU with MKL-packed DiT weights (:func:`muvi.models.layers.packed_linears`);
    #: False runs the plain products the packed ones are tested against.
    pack_weights: bool = True

    def __init__(self, dit: DiT, adaptor: Optional[VisualAdaptor] = None,
                 objective: Optional[FlowObjective] = None):
        super().__init__()
        self.dit, self.adaptor = dit, adaptor
        self.objective = objective or FlowObjective()
        if adaptor is not None and adaptor.config.width != (dit.config.cond_dim or dit.config.width):
            raise ValueError(f"the adaptor's width {adaptor.config.width} is not the DiT's condition width "
                             f"{dit.config.cond_dim or dit.config.width}")

    # ------------------------------------------------------------------ condition
    def condition(self, tokens: torch.Tensor, lengths: torch.Tensor,
                  token_lengths: Optional[torch.Tensor] = None, num_frames: Optional[int] = None, *,
                  cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Video tokens (B, N, h, w, E), with their CLS tokens ``cls`` (B, N, E) when the encoder
        has them → condition (B, num_frames or max(lengths), D): each item's token steps (its
        first ``token_lengths[b]``, default all) aggregated and resampled to its own
        ``lengths[b]`` latent frames; zero past them (padding)."""
        pooled = self.adaptor.aggregate(tokens, cls)  # (B, N, D)
        frames = int(lengths.max()) if num_frames is None else num_frames
        out = pooled.new_zeros(pooled.shape[0], frames, pooled.shape[-1])
        for b in range(pooled.shape[0]):
            n = pooled.shape[1] if token_lengths is None else int(token_lengths[b])
            out[b, :int(lengths[b])] = resample_time(pooled[b:b + 1, :n], int(lengths[b]))[0]
        return out

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.dit(x, t, cond, valid)

    # ------------------------------------------------------------------ training
    def forward(self, x1: torch.Tensor, valid: torch.Tensor, generator: torch.Generator,
                tokens: Optional[torch.Tensor] = None, token_lengths: Optional[torch.Tensor] = None,
                cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flow loss of clean latents ``x1`` (B, T, C) with ``valid`` (B, T) frames, every
        random draw (context prefix, time, noise, condition dropout) from ``generator``; the
        video as :meth:`condition` takes it (``cls``: the batch's padded CLS tokens, or None).

        With probability ``icl_prob`` an item gets a clean prefix (never noised, null condition,
        time 1, out of the loss); the condition is dropped with ``cond_drop_prob`` (always,
        without an adaptor)."""
        obj = self.objective
        b, n, _ = x1.shape
        lengths = valid.sum(1)
        draw = generator.device
        use_icl = torch.rand(b, generator=generator, device=draw) < obj.icl_prob
        prefix = torch.tensor([flow.prefix_frames(int(length), obj.latent_rate, max_seconds=obj.icl_max_seconds,
                                                  max_fraction=obj.icl_max_fraction) if icl else 0
                               for length, icl in zip(lengths, use_icl)], device=draw)
        context = flow.context_mask(prefix, n)
        t = flow.sample_time(b, generator=generator, device=draw, distribution=obj.time_distribution)
        x_t, t_frames, v_target = flow.training_pair(x1.to(draw), t, context=context, generator=generator)
        drop = torch.rand(b, generator=generator, device=draw) < (obj.cond_drop_prob if self.adaptor else 1.0)
        use_null = (drop[:, None] | context).to(x1.device)  # the context needs no condition (section 4.3)
        context = context.to(x1.device)
        cond = null = self.dit.null_condition(b, n)
        if self.adaptor is not None:
            cond = torch.where(use_null[..., None], null, self.condition(tokens, lengths, token_lengths, n, cls=cls))
        v_pred = self._velocity(x_t.to(x1.device), t_frames.to(x1.device), cond, valid)
        return flow.flow_loss(v_pred, v_target.to(x1.device), context, valid)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, num_steps: int = 25, cfg_scale: float = 4.0,
               seed: Union[int, Sequence[int], None] = None, prefix: Optional[torch.Tensor] = None,
               method: str = "euler", progress: bool = False,
               callback: Optional[Callable[[], object]] = None, prompt_scale: float = 0.0) -> torch.Tensor:
        """Solve the guided flow ODE for a condition (B, T, D) → latent (B, T, C). With ``prefix``
        (B, P, C) the prompt is prepended as clean context (null condition there, as in training)
        and cut off the result; ``prompt_scale`` > 0 adds guidance on the prompt
        (:func:`muvi.flow.prompt_guided_velocity`: one more pass, of the new frames alone).
        The noise is drawn on the CPU from ``seed``, so a seed gives the same music on every
        device; a list of seeds gives each item of the batch its own noise, so that a batch makes
        the music each item would make alone. ``callback()`` runs after
        each (guided) velocity evaluation (:func:`muvi.flow.evaluations` says how many)."""
        device = cond.device
        b, t, _ = cond.shape
        p = 0 if prefix is None else prefix.shape[1]
        null = self.dit.null_condition(b, p + t)
        if p:
            cond = torch.cat([null[:, :p], cond], dim=1)
        x0 = noise((b, p + t, self.dit.config.latent_channels), seed).to(device)
        context = context_latent = None
        if p:
            context = flow.context_mask(torch.full((b,), p, device=device), p + t)
            context_latent = torch.cat([prefix, torch.zeros_like(x0[:, p:])], dim=1)

        # bf16 autocast on CUDA (appendix A); weights stored in a half type run in that type
        weights = next(self.dit.parameters()).dtype
        half = weights if weights != torch.float32 else torch.bfloat16
        enabled = weights != torch.float32 or device.type == "cuda"

        def free_net(x: torch.Tensor, time: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=half, enabled=enabled):
                return self._velocity(x, time, c).float()

        def net(x: torch.Tensor, time: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            v = free_net(x, time, c)
            if callback is not None:
                callback()
            return v

        velocity = flow.prompt_guided_velocity(net, cond, null, cfg_scale, p, prompt_scale, free_net)
        with packed_linears(self.dit, enabled=self.pack_weights):
            latent = flow.sample(velocity, x0, num_steps=num_steps, method=method, context=context,
                                 context_latent=context_latent, progress=progress)
        return latent[:, p:]


def noise(shape: tuple[int, ...], seed: Union[int, Sequence[int], None]) -> torch.Tensor:
    """Standard normal noise on the CPU: from ``seed`` for the whole batch, from ``seed[i]`` for
    item ``i`` (each item as a batch of one would draw it), or from the global generator."""
    if seed is None or isinstance(seed, int):
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(shape, generator=generator)
    if len(seed) != shape[0]:
        raise ValueError(f"{len(seed)} seeds for a batch of {shape[0]}")
    return torch.cat([noise((1, *shape[1:]), s) for s in seed])
