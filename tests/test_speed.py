"""The fast paths equal the plain ones, and the measuring tools measure what they say.

Speed itself is measured by the benchmark recipes (recipes/benchmark*.py), never timed here.
"""
from __future__ import annotations

import mmap
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.layers import mkl_packing_available, packed_linears
from muvi.pipeline import MuviPipeline
from muvi.profiling import Stages, count_cpu_attention, peak_memory, reset_peak_memory

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def vocoder(seed: int = 0, **overrides) -> HiFiGANGenerator:
    """A small V1-layout generator with weights large enough that every layer matters."""
    torch.manual_seed(seed)
    config = HiFiGANConfig(num_mels=20, upsample_initial_channel=64, **overrides)
    model = HiFiGANGenerator(config).eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            torch.nn.init.normal_(m.weight, 0.0, 0.5 / (m.weight[0].numel() ** 0.5))
    return model


def test_channels_last_vocoder_equals_conv1d():
    model, mel = vocoder(), torch.randn(2, 20, 37)
    with torch.no_grad():
        fast = model(mel)
        model.channels_last = False
        plain = model(mel)
    assert fast.shape == plain.shape == (2, 37 * model.hop_length)
    assert plain.abs().max() > 0.05  # not a silent output
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_fused_onednn_vocoder_equals_separate_ops(monkeypatch):
    """The oneDNN primitives with reordered weights and the sum / leaky ReLU fused in give the
    channels-last path's separate conv2d, add and activation; the weights are plain afterwards."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    fused_calls = []
    binary = torch.ops.mkldnn._convolution_pointwise.binary
    monkeypatch.setattr(torch.ops.mkldnn._convolution_pointwise, "binary",
                        lambda *a: fused_calls.append(a[8]) or binary(*a))
    model, mel = vocoder(seed=3), torch.randn(1, 20, 29)
    outputs = []
    with torch.inference_mode():
        for fused in (True, False):
            model.fused = fused
            outputs.append(model(mel))
    # every residual unit's second conv added its input inside the primitive, in the fused run only
    units = sum(len(block.convs2) for block in model.resblocks)
    assert fused_calls == ["add"] * units
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert all("_onednn" not in vars(m) for m in model.modules())


def test_fused_gelu_mlp_encoder_equals_timm_mlp(monkeypatch):
    """VideoMAE's encode with each MLP's first product and GELU as one oneDNN primitive gives
    timm's MLP; the fused path is taken in every block, and the MLPs are timm's again after."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    from dataclasses import replace

    from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder

    fused_calls = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: fused_calls.append(a[3]) or pointwise(*a))
    torch.manual_seed(0)
    encoder = VideoMAEEncoder(replace(VideoMAEConfig.preset("tiny"), depth=3)).eval()
    frames = torch.randn(1, 2 * encoder.config.num_frames + 3, 3, encoder.config.image_size, encoder.config.image_size)
    outputs = []
    with torch.inference_mode():
        for fuse in (True, False):
            encoder.fuse_mlp = fuse
            outputs.append(encoder.encode(frames, max_batch=2))
    assert fused_calls == ["gelu"] * 3 * 2  # 3 blocks x 2 batches of clips, the fused run only
    assert outputs[1].abs().mean() > 0.1
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in encoder.modules())


def test_channels_last_vocoder_trains_the_same():
    """Same gradients through the 2D path, with weight norm as the vocoder recipe trains it."""
    grads = []
    for channels_last in (True, False):
        model = vocoder(seed=1)
        model.apply_weight_norm()
        model.channels_last = channels_last
        model(torch.randn(1, 20, 11, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-7)


def test_chunked_vocoder_equals_one_pass():
    model, mel = vocoder(seed=2), torch.randn(1, 20, 131)
    with torch.inference_mode():
        model.chunk_frames = None
        whole = model(mel)
        for chunk in (16, 50, 130):
            model.chunk_frames = chunk
            torch.testing.assert_close(model(mel), whole, rtol=1e-5, atol=1e-6)


def test_vocoder_reorders_each_weight_once_per_call(monkeypatch):
    """Chunked, the oneDNN path reorders each convolution's weight once per call, not per chunk,
    and the result equals the unchunked one (the shared first activation and the in-place stage
    average change nothing)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    reorders = []
    reorder = torch.ops.mkldnn._reorder_convolution_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight",
                        lambda *a: reorders.append(a[0].shape) or reorder(*a))
    model, mel = vocoder(seed=4), torch.randn(1, 20, 131)
    with torch.inference_mode():
        model.chunk_frames = None
        whole = model(mel)
        model.chunk_frames = 30  # 5 chunks
        reorders.clear()
        chunked = model(mel)
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv1d]
    assert len(reorders) == len(convs)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_chunk_margin_is_needed(monkeypatch):
    """The check above can fail: with too little context the chunk edges differ."""
    model, mel = vocoder(seed=2), torch.randn(1, 20, 131)
    with torch.inference_mode():
        model.chunk_frames = None
        whole = model(mel)
        model.chunk_frames = 16
        monkeypatch.setattr(model, "receptive_margin", lambda: 1)
        assert (model(mel) - whole).abs().max() > 1e-3


def test_chunked_vocoder_keeps_gradients_whole():
    """Training (grad enabled) always runs one pass; chunking is for inference."""
    model = vocoder()
    model.chunk_frames = 4
    mel = torch.randn(1, 20, 9, requires_grad=True)
    model(mel).sum().backward()
    assert mel.grad.abs().sum() > 0


needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL")


@needs_mkl
def test_sampling_with_packed_dit_weights_equals_plain(monkeypatch):
    """25 guided Euler steps through MKL-packed weights give the plain products' latent, and the
    DiT's layers are their plain selves again afterwards."""
    packed_products = []
    mkl_linear = torch.ops.mkl._mkl_linear
    monkeypatch.setattr(torch.ops.mkl, "_mkl_linear", lambda *a: packed_products.append(a[-1]) or mkl_linear(*a))
    from dataclasses import replace

    from muvi.models.dit import DiT, DiTConfig
    from muvi.models.v2m import VideoToMusicFlow

    torch.manual_seed(0)
    dit = DiT(replace(DiTConfig.preset("tiny"), width=256, depth=2, num_heads=4)).eval()
    for m in dit.modules():
        if isinstance(m, torch.nn.Linear):  # the zero-initialised output layer too
            torch.nn.init.normal_(m.weight, 0.0, m.weight.shape[1] ** -0.5)
    flow, cond = VideoToMusicFlow(dit).eval(), torch.randn(1, 50, 256)
    outputs = []
    for pack in (True, False):
        flow.pack_weights = pack
        outputs.append(flow.sample(cond, num_steps=25, cfg_scale=4.0, seed=0))
    packed, plain = outputs
    assert plain.abs().mean() > 0.5  # a latent the DiT moved, not the noise scaled
    # every step: 5 products in each of 2 blocks, 5 around them (inputs, time MLP, output); CFG: 2 × 50 rows
    assert len(packed_products) == 25 * (5 * 2 + 5) and set(packed_products) == {100}
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in dit.modules())


@needs_mkl
def test_packed_linear_takes_the_plain_product_where_packing_does_not_apply():
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(2, 10, 64)
    with torch.no_grad(), packed_linears(linear):
        first = linear(x)  # packs for 20 rows
        assert vars(linear)["forward"].rows == 20
        torch.testing.assert_close(first, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)
        other = linear(torch.randn(3, 64))  # another row count: plain
        strided = linear(x.transpose(0, 1))  # not contiguous: plain
        assert other.shape == (3, 96) and strided.shape == (10, 2, 96)
        torch.testing.assert_close(strided, F.linear(x.transpose(0, 1), linear.weight, linear.bias))
    with packed_linears(linear):  # gradients needed: the plain, differentiable product
        linear(x).sum().backward()
    assert linear.weight.grad is not None and "forward" not in vars(linear)


def test_cpu_attention_flops_are_counted():
    count_cpu_attention()
    q, k, v = (torch.randn(2, 3, 50, 8) for _ in range(3))
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 4 * 2 * 3 * 50 * 50 * 8  # QKᵀ and AV, 2 FLOPs per multiply-add


def test_stages_record_time_flops_peak_memory_and_page_faults():
    device = torch.device("cpu")
    stages = Stages(device)
    with stages("matmul"):
        a = torch.ones(256, 512) @ torch.ones(512, 128)
    with stages("allocate"):  # 256 MB touched, then unmapped: what torch's allocator keeps is not the question
        block = mmap.mmap(-1, 256 << 20)
        for page in range(0, 256 << 20, mmap.PAGESIZE):
            block[page] = 1
        block.close()
    matmul, allocate = stages.rows
    assert matmul.flops == 2 * 256 * 512 * 128 and a[0, 0] == 512
    assert matmul.seconds > 0
    if Path("/proc/self/clear_refs").exists():  # peaks are per stage on Linux
        assert allocate.peak_rss_mb - matmul.peak_rss_mb > 200
        reset_peak_memory(device)
        assert peak_memory(device)[0] < allocate.peak_rss_mb - 200
    # the 256 MB of fresh pages are faulted in at first touch: 65536 faults, or 128 if the kernel maps huge pages
    assert allocate.page_faults >= 128 and allocate.page_faults > matmul.page_faults
    assert allocate.system_seconds >= 0 and matmul.system_seconds >= 0
    table = stages.table(rate=1e11).splitlines()
    assert table[0].endswith("sys s  faults k")
    assert table[-1].split()[-1] == f"{(matmul.page_faults + allocate.page_faults) / 1e3:.0f}"


def test_release_loads_mapped_and_can_be_saved_over(tmp_path):
    """Loading maps the weights from their files (no copy); saving a loaded release over its own
    folder replaces the files rather than truncating what is mapped, and the weights survive."""
    pipe = MuviPipeline.from_presets("tiny", seed=3)
    pipe.save_pretrained(tmp_path)
    loaded = MuviPipeline.from_pretrained(tmp_path)
    for (name, a), b in zip(pipe.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    loaded.save_pretrained(tmp_path)  # over the files it was loaded from
    again = MuviPipeline.from_pretrained(tmp_path)
    for (name, a), b in zip(pipe.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("*.partial"))


def _resident_file_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
def test_mapped_weights_are_paged_out_and_read_again_unchanged(tmp_path):
    """page_out_mapped drops the pages of weights mapped from a release file, never tensors in
    ordinary memory nor mapped ones written to since, and what is read afterwards is the same."""
    from dataclasses import replace

    from muvi.hub import load_component, save_component
    from muvi.memory import page_out_mapped
    from muvi.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    built = DiT(replace(DiTConfig.preset("tiny"), width=512, depth=4, num_heads=8)).eval()
    size = sum(p.numel() * p.element_size() for p in built.parameters())
    assert size > 40e6
    assert page_out_mapped(built) == 0  # built in memory: nothing mapped, nothing advised
    save_component(built, tmp_path, "dit")
    with open(tmp_path / "dit.safetensors", "rb") as written:  # the kernel does not reclaim pages
        os.fsync(written.fileno())                          # still waiting to be written back
    loaded = load_component(tmp_path, "dit")
    written = loaded.blocks[0].attn.qkv.weight
    written.data.mul_(2.0)  # a private copy of these pages now: dropping them would lose the write
    before = [p.clone() for p in loaded.parameters()]  # reads every page
    resident = _resident_file_bytes()
    dropped = page_out_mapped(loaded)
    kept = written.numel() * written.element_size()
    edges = 2 * 4096 * len(before)  # first and last pages, shared between neighbours
    assert size - kept - edges <= dropped <= size - kept + edges
    assert resident - _resident_file_bytes() > 0.8 * dropped  # the pages did leave
    for p, q in zip(loaded.parameters(), before):
        assert torch.equal(p, q)  # the written tensor kept its write, the others read back the file
    assert _resident_file_bytes() - resident > -0.2 * size  # read back in by that comparison


def test_generation_pages_out_each_stage_and_makes_the_same_music(tmp_path):
    from muvi.inputs import check_request

    MuviPipeline.from_presets("tiny", seed=2).save_pretrained(tmp_path)
    pipe = MuviPipeline.from_pretrained(tmp_path)
    frames = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    request = check_request(frames, fps=10, seed=5, num_steps=2, limits=pipe.limits)
    assert pipe.page_out_weights  # the default
    paged = [pipe.run(request, progress=False).waveform for _ in range(2)]  # the second reads them back
    pipe.page_out_weights = False
    kept = pipe.run(request, progress=False).waveform
    assert torch.equal(paged[0], paged[1]) and torch.equal(paged[0], kept)


def _recipe(name: str, *args: str, capsys) -> str:
    """Run ``recipes/name`` as ``python recipes/name args`` would, in this process (no second
    torch import: a subprocess costs seconds each); what it printed."""
    argv, path = sys.argv, list(sys.path)
    sys.argv, sys.path[:0] = [str(RECIPES / name), *args], [str(RECIPES)]
    try:
        runpy.run_path(str(RECIPES / name), run_name="__main__")
    except SystemExit as done:
        assert done.code in (0, None), capsys.readouterr().err[-3000:]
    finally:
        sys.argv, sys.path[:] = argv, path
    return capsys.readouterr().out


def test_benchmark_alternates_plain_and_optimised_paths(capsys):
    out = _recipe("benchmark.py", "--preset", "tiny", "--duration", "1", "--num-steps", "2", "--alternate",
                  "--threads", "2", capsys=capsys)
    plain, optimised = out.split("plain layouts")[1].split("optimised paths (the default):")
    for table in (plain, optimised):
        assert all(name in table for name in ("video encoder", "sampling", "vocoder", "total"))
    assert "x faster" in optimised and "x the floor" in optimised


def test_gpu_benchmark_runs_on_cpu(tmp_path, capsys):
    out = _recipe("benchmark_gpu.py", "--device", "cpu", "--preset", "tiny", "--durations", "1.5",
                  "--num-steps", "2", "--batch", "2", "--train-seconds", "2", "--train-steps", "1",
                  "--json", str(tmp_path / "gpu.json"), capsys=capsys)
    import json

    report = json.loads((tmp_path / "gpu.json").read_text())
    inference = report["inference"][0]
    assert inference["duration"] == 1.5 and set(inference["stages"]) >= {"sampling", "vocoder"}
    training = report["training"]
    assert training["batch"] == 2 and training["frames"] == 20 and 0 < training["mfu"] < 1
    assert "MFU" in out


def test_musicgen_peer_generates_with_cache_and_cfg():
    sys.path.insert(0, str(RECIPES))
    try:
        from benchmark_peers import NUM_CODEBOOKS, musicgen_decoder, musicgen_generate
    finally:
        sys.path.remove(str(RECIPES))
    model = musicgen_decoder("tiny")
    codes = musicgen_generate(model, 0.1, top_k=5)
    assert codes.shape == (NUM_CODEBOOKS, 5 + NUM_CODEBOOKS - 1)
    assert int(codes.max()) < model.config.vocab_size


@torch.inference_mode()
def test_musicgen_peer_cache_is_used():
    """The peer decodes one token per step; that is only a fair (and correct) MusicGen if the KV
    cache carries the earlier tokens and only them: the cached last-step logits equal a full
    forward's, the self-attention cache holds one entry per step and the cross-attention cache
    the condition once."""
    sys.path.insert(0, str(RECIPES))
    try:
        from benchmark_peers import NUM_CODEBOOKS, musicgen_cache, musicgen_decoder
    finally:
        sys.path.remove(str(RECIPES))
    model = musicgen_decoder("tiny")
    steps, condition = 6, 3
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (NUM_CODEBOOKS, steps), generator=generator)
    states = torch.randn(1, condition, model.config.hidden_size)
    cache, last = musicgen_cache(), None
    for t in range(steps):
        last = model(input_ids=tokens[:, t:t + 1], encoder_hidden_states=states, cache=cache, use_cache=True).logits
    full = model(input_ids=tokens, encoder_hidden_states=states).logits
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
    assert cache.self_attention_cache.get_seq_length() == steps
    assert cache.cross_attention_cache.get_seq_length() == condition
    uncached = model(input_ids=tokens[:, -1:], encoder_hidden_states=states).logits
    assert (uncached[:, -1] - full[:, -1]).abs().max() > 1e-3  # the first check can fail


@pytest.mark.parametrize("recipe", ["benchmark.py", "benchmark_peers.py", "benchmark_solvers.py"])
def test_benchmark_recipes_explain_themselves(recipe, capsys):
    assert "usage" in _recipe(recipe, "--help", capsys=capsys)
