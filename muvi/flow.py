"""Rectified flow: the training objective and the sampler, with no parameters.

Conventions, fixed here once (SPEC.md):

* time runs from noise to data: ``x_t = (1 - t) * x0 + t * x1`` with ``x0`` noise (t = 0) and
  ``x1`` data (t = 1);
* the target velocity is ``v = x1 - x0``;
* classifier-free guidance is ``v = v_null + s * (v_cond - v_null)``; ``s = 1`` is no guidance.

In-context prompting (paper section 4.3) is partial denoising: a clean prefix of the latent is
given as context, never noised, excluded from the loss, and held fixed while sampling. Context
frames are marked by a boolean ``context`` mask of shape (B, T); their time is reported to the
network as t = 1 (they *are* data), so one network serves prompted and unprompted generation.

Shapes: B batch, T latent frames, C latent channels; latents are (B, T, C).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

#: velocity(x_t (B,T,C), t (B,T)) -> (B,T,C)
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: every torchdiffeq solver: fixed-step ones take ``num_steps`` steps, adaptive ones ``rtol``/``atol``
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams",
                      "fixed_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
#: velocity evaluations per step of the fixed-step methods whose count is fixed (torchdiffeq)
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "heun2": 2, "heun3": 3}


def evaluations(method: str, num_steps: int) -> Optional[int]:
    """Velocity evaluations a solve takes (None: not known in advance, adaptive or multistep)."""
    return EVALS_PER_STEP[method] * num_steps if method in EVALS_PER_STEP else None


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The straight path between noise ``x0`` and data ``x1`` at time ``t`` ((B,) or (B, T))."""
    t = _frame_time(t, x0)
    return (1 - t) * x0 + t * x1


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x1 - x0


def sample_time(batch_size: int, *, generator: Optional[torch.Generator] = None,
                device: torch.device | str = "cpu", distribution: str = "uniform") -> torch.Tensor:
    """Training times in [0, 1): ``uniform`` or ``logit_normal`` (SD3's choice, an option)."""
    if distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if distribution == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator, device=device))
    raise ValueError(f"unknown time distribution {distribution!r}; use 'uniform' or 'logit_normal'")


def context_mask(prefix_lengths: torch.Tensor, total: int) -> torch.Tensor:
    """(B, T) bool mask, true on the first ``prefix_lengths[b]`` of ``total`` frames."""
    frames = torch.arange(total, device=prefix_lengths.device)
    return frames[None, :] < prefix_lengths[:, None]


def prefix_frames(num_frames: int, frame_rate: float, *, max_seconds: float = 14.0,
                  max_fraction: float = 0.33) -> int:
    """Context length of the paper: the shorter of 14 s and 33 % of the clip, in frames."""
    return int(min(max_seconds * frame_rate, max_fraction * num_frames))


def flow_time(t: torch.Tensor, context: Optional[torch.Tensor], num_frames: int) -> torch.Tensor:
    """Per-frame time (B, T): ``t`` everywhere, 1 on context frames."""
    t = t.reshape(t.shape[0], -1).expand(-1, num_frames) if t.dim() <= 1 or t.shape[-1] == 1 else t
    if context is not None:
        t = torch.where(context, torch.ones_like(t), t)
    return t


def training_pair(x1: torch.Tensor, t: torch.Tensor, *, context: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw noise and build the network input and target for data ``x1`` at times ``t`` (B,).

    Returns ``(x_t, t_frames, v_target)``; context frames of ``x_t`` equal ``x1`` exactly.
    """
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    t_frames = flow_time(t, context, x1.shape[1])
    return interpolate(x0, x1, t_frames), t_frames, target_velocity(x0, x1)


def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor,
              context: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between predicted and target velocity over the frames being generated.

    ``context`` (B, T) marks the clean prefix, ``valid`` (B, T) marks real (not padded) frames;
    both are excluded from the mean.
    """
    weight = torch.ones(v_pred.shape[:2], device=v_pred.device, dtype=torch.float32)
    if context is not None:
        weight = weight * (~context).float()
    if valid is not None:
        weight = weight * valid.float()
    err = (v_pred.float() - v_target.float()).pow(2).mean(-1)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def cfg_combine(v_cond: torch.Tensor, v_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``v_null + scale * (v_cond - v_null)``."""
    return v_null + scale * (v_cond - v_null)


def guided_velocity(net: Callable[..., torch.Tensor], cond: torch.Tensor, null_cond: torch.Tensor,
                    scale: float) -> VelocityFn:
    """Wrap ``net(x, t, cond)`` into a guided velocity field evaluated in ONE batched pass.

    ``cond`` and ``null_cond`` are (B, T, D). With ``scale == 1`` the null branch is skipped.
    """
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    both = torch.cat([cond, null_cond])
    return lambda x, t: _guided_pass(net, x, t, cond, both, scale)[1]


def _guided_pass(net: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 both: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional velocity, guided velocity) from one batched pass (``both``: cond and null)."""
    if scale == 1.0:
        v = net(x, t, cond)
        return v, v
    v_cond, v_null = net(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return v_cond, cfg_combine(v_cond, v_null, scale)


def prompt_guided_velocity(net: Callable[..., torch.Tensor], cond: torch.Tensor, null_cond: torch.Tensor,
                           scale: float, prefix: int, prompt_scale: float,
                           free_net: Optional[Callable[..., torch.Tensor]] = None) -> VelocityFn:
    """Guidance on the condition and on an in-context prompt of ``prefix`` frames, in the way of
    two-condition guidance (InstructPix2Pix): on the frames after the prompt

        v = v(∅, p) + scale · (v(c, p) − v(∅, p)) + prompt_scale · (v(c, p) − v(c, ∅))

    where ``v(c, ∅)`` runs the new frames alone with their condition, as the model runs
    without a prompt (the ICL training keeps 20 % of items prompt-free for this). The prompt's
    own frames keep ``v(∅, p)``'s value (the sampler holds them fixed). ``prompt_scale == 0``
    is :func:`guided_velocity`. ``free_net`` (default ``net``) runs the prompt-free branch, so
    that a caller can count guided evaluations once."""
    if prompt_scale == 0.0 or prefix == 0:
        return guided_velocity(net, cond, null_cond, scale)
    free_net = net if free_net is None else free_net
    both = torch.cat([cond, null_cond])
    free_cond = cond[:, prefix:]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v = _guided_pass(net, x, t, cond, both, scale)
        v_free = free_net(x[:, prefix:], t[:, prefix:], free_cond)
        new = v[:, prefix:] + prompt_scale * (v_cond[:, prefix:] - v_free)
        return torch.cat([v[:, :prefix], new], dim=1)

    return velocity


def sample(velocity: VelocityFn, x0: torch.Tensor, *, num_steps: int = 25, method: str = "euler",
           context: Optional[torch.Tensor] = None, context_latent: Optional[torch.Tensor] = None,
           rtol: float = 1e-5, atol: float = 1e-5, progress: bool = False) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from noise ``x0`` at t = 0 to data at t = 1.

    ``method="euler"`` (the paper's sampler, ``num_steps`` fixed steps) runs a plain loop with
    an optional progress bar; any other torchdiffeq method name is solved by
    ``torchdiffeq.odeint`` (fixed-step methods with step ``1/num_steps``; adaptive ones with
    ``rtol``/``atol``). With ``context`` (B, T) and ``context_latent`` (B, T, C), context frames
    start at the clean latent and their velocity is zero, so they are returned exactly.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if (context is None) != (context_latent is None):
        raise ValueError("context and context_latent must be given together")
    keep = None
    if context is not None:
        keep = context[..., None]
        x0 = torch.where(keep, context_latent.to(x0.dtype), x0)

    def field(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t_frames = flow_time(t.reshape(1).expand(x.shape[0]).to(x.dtype), context, x.shape[1])
        v = velocity(x, t_frames)
        return v.masked_fill(keep, 0.0) if keep is not None else v

    if method == "euler":
        x1 = euler(field, x0, num_steps, progress=progress)
    elif method in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
        import torchdiffeq

        times = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
        options = {"step_size": 1.0 / num_steps} if method in FIXED_STEP_METHODS else None
        x1 = torchdiffeq.odeint(field, x0, times, method=method, options=options,
                                rtol=rtol, atol=atol)[-1]
    else:
        raise ValueError(f"unknown ODE method {method!r}; choose from "
                         f"{FIXED_STEP_METHODS + ADAPTIVE_METHODS}")
    # Zero velocity keeps the context fixed up to the solver's output interpolation (dopri5
    # interpolates); put the prompt back bit for bit.
    return torch.where(keep, x0, x1) if keep is not None else x1


@torch.no_grad()
def euler(field: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
          num_steps: int, *, progress: bool = False) -> torch.Tensor:
    """Fixed-step Euler from t = 0 to t = 1; ``field(t, x)`` takes a scalar-tensor time."""
    x = x0
    dt = 1.0 / num_steps
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        t = torch.tensor(i * dt, device=x.device, dtype=x.dtype)
        x = x + dt * field(t, x)
    return x


def _frame_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast (B,) or (B, T) time against a (B, T, C) tensor."""
    return t.reshape(t.shape[0], -1, *([1] * (like.dim() - 2))) if t.dim() <= 2 else t
