"""Measuring inference: stage timers with FLOP counts, peak memory and operator profiles.

Used by the benchmark recipes (``recipes/benchmark*.py``). A :class:`Stages` timer wraps each
stage of a run and records its wall time, the floating-point operations that
``torch.utils.flop_counter`` counts in it, the peak resident memory of the process during it,
the CPU time the process spent in the kernel during it and the page faults it took (the price of
first touching fresh memory), and (optionally) a ``torch.profiler`` table of its most expensive
operators. The FLOP total of a
run divided by this machine's dense matmul rate (:func:`matmul_rate`) is its *floor*: the time
it would take if every operation ran at the speed of the best large matrix product.

torch's counter has no formula for the fused CPU attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, what SDPA runs on the CPU), so it counts
CPU attention as free; :func:`count_cpu_attention` registers the same formula torch uses for
its GPU attention kernels (4·B·H·L·S·K for the two products), so a ViT's attention is counted
on every device alike.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils import flop_counter


def count_cpu_attention() -> None:
    """Count the FLOPs of torch's CPU flash attention as torch counts its GPU kernels'."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 7) -> float:
    """Dense (n × n) matmul throughput in FLOP/s: the best of ``repeats`` timed products (the
    best, so that a moment of contention on a shared machine does not lower the reference)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the process's resident high-water mark (Linux) and CUDA's allocator."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[float, Optional[float]]:
    """(peak resident MB since :func:`reset_peak_memory`, peak CUDA MB or None).

    Off Linux the resident figure is the whole process's peak (``ru_maxrss``), never reset."""
    rss = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return rss, cuda


@dataclasses.dataclass
class StageRecord:
    name: str
    seconds: float
    flops: int
    peak_rss_mb: float
    peak_cuda_mb: Optional[float] = None
    profile: Optional[str] = None
    #: CPU seconds the whole process spent in the kernel during the stage (all threads)
    system_seconds: float = 0.0
    #: page faults the process took during the stage (minor: no disk read)
    page_faults: int = 0


class Stages:
    """``with stages("vocoder"): ...`` times one stage; ``stages.rows`` holds the records.

    ``count_flops`` wraps the stage in a ``FlopCounterMode``, which costs Python time on every
    operator (time a run without it, count in another: :meth:`take_flops`); ``profile_rows`` > 0 also records a
    ``torch.profiler`` table of that many operators by self time.
    """

    def __init__(self, device: torch.device, *, count_flops: bool = True, profile_rows: int = 0):
        self.device, self.count_flops, self.profile_rows = device, count_flops, profile_rows
        self.rows: list[StageRecord] = []
        if count_flops:
            count_cpu_attention()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        counter = flop_counter.FlopCounterMode(display=False) if self.count_flops else None
        prof = None
        synchronize(self.device)
        reset_peak_memory(self.device)
        with ExitStack() as stack:
            if self.profile_rows:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
                prof = stack.enter_context(profile(activities=activities))
            if counter is not None:
                stack.enter_context(counter)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            yield
            synchronize(self.device)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
        rss, cuda = peak_memory(self.device)
        table = None
        if prof is not None:
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=self.profile_rows, max_name_column_width=60)
        self.rows.append(StageRecord(name, seconds, counter.get_total_flops() if counter else 0, rss, cuda, table,
                                     after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt))

    def take_flops(self, other: "Stages") -> None:
        """Copy the FLOP counts of ``other``'s stages of the same names (a counting pass)."""
        flops = {r.name: r.flops for r in other.rows}
        for r in self.rows:
            r.flops = flops.get(r.name, r.flops)

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.rows)

    def table(self, rate: float) -> str:
        """The stages as a text table against a matmul ``rate`` (FLOP/s)."""
        cuda = any(r.peak_cuda_mb is not None for r in self.rows)
        head = (f"{'stage':<16}{'time s':>9}{'GFLOP':>10}{'GFLOP/s':>9}{'% of mm':>9}{'floor x':>9}"
                f"{'peak RSS MB':>13}{'sys s':>8}{'faults k':>10}")
        lines = [head + (f"{'peak CUDA MB':>14}" if cuda else "")]
        total = StageRecord("total", self.total_seconds, self.total_flops, max(r.peak_rss_mb for r in self.rows),
                            max((r.peak_cuda_mb or 0.0) for r in self.rows) if cuda else None,
                            system_seconds=sum(r.system_seconds for r in self.rows),
                            page_faults=sum(r.page_faults for r in self.rows))
        for r in self.rows + [total]:
            achieved = r.flops / r.seconds if r.seconds else 0.0
            floor = r.flops / rate
            ratio = f"{r.seconds / floor:>9.2f}" if floor else f"{'-':>9}"
            line = (f"{r.name:<16}{r.seconds:>9.3f}{r.flops / 1e9:>10.1f}{achieved / 1e9:>9.1f}"
                    f"{100 * achieved / rate:>8.0f}%{ratio}{r.peak_rss_mb:>13.0f}{r.system_seconds:>8.2f}"
                    f"{r.page_faults / 1e3:>10.0f}")
            lines.append(line + (f"{r.peak_cuda_mb or 0.0:>14.0f}" if cuda else ""))
        return "\n".join(lines)


def generation_stages(pipe, stages: Stages, video, duration: float, *, num_steps: int = 25,
                      cfg_scale: float = 4.0, seed: int = 0) -> torch.Tensor:
    """One generation of ``duration`` seconds of ``video`` by ``pipe`` (a :class:`MuviPipeline`),
    stage by stage as :meth:`MuviPipeline.run` does it for one window: decode, video encoder,
    adaptor, sampling, VAE decode, vocoder. Returns the waveform."""
    from muvi import video as video_io

    cfg = pipe.config
    with torch.inference_mode():
        with stages("decode"):
            frames = video_io.read_frames(video, cfg.video_fps, duration=duration)
        num_latent = video_io.duration_frames(duration, cfg.latent_rate)
        with stages("video encoder"):
            tokens = pipe.encode_video(frames.to(pipe.device))
            pipe.stage_done(pipe.video_encoder)
        with stages("adaptor"):
            cond = pipe.condition(tokens, num_latent)
            pipe.stage_done(pipe.adaptor)
        with stages("sampling"):
            latent = pipe.sample_latent(cond, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed)
            pipe.stage_done(pipe.dit)
        with stages("VAE decode"):
            mel = pipe.vae.decode(pipe.vae.denormalize(latent.transpose(1, 2)))
            pipe.stage_done(pipe.vae)
        with stages("vocoder"):
            wave = pipe.vocoder(mel)
            pipe.stage_done(pipe.vocoder)
            return wave
