"""Video nodes: CreateVideo -> SaveVideo writes an MP4 (H.264, metadata, audio) that decodes back to the
right frames; LoadVideo / GetVideoComponents read it; SaveWEBM and SaveAnimatedWEBP files decode back to
the right frame count and size; EmptyHunyuanLatentVideo's latent shape; a Wan VAE decode saved as video."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
from comfy_extras.nodes_video import (
    CreateVideo,
    GetVideoComponents,
    LoadVideo,
    SaveAnimatedWEBP,
    SaveVideo,
    SaveWEBM,
)

PROMPT = {"1": {"class_type": "SaveVideo", "inputs": {"filename_prefix": "video/ComfyUI"}}}
WORKFLOW = {"workflow": {"nodes": [{"id": 1, "type": "SaveVideo"}], "version": 0.4}}


def frames(t: int = 7, h: int = 24, w: int = 32) -> torch.Tensor:
    """Smooth moving gradients: lossy codecs keep them close, and every frame differs."""
    ys = torch.linspace(0, 1, h)[:, None]
    xs = torch.linspace(0, 1, w)[None, :]
    out = []
    for i in range(t):
        out.append(torch.stack([(xs + 0.1 * i + 0 * ys) % 1.0 * 0.8 + 0.1,
                                (ys + 0.05 * i + 0 * xs) % 1.0 * 0.8 + 0.1,
                                torch.full((h, w), 0.2 + 0.08 * i)], dim=-1))
    return torch.stack(out)


def _decode(path: str):
    with av.open(path) as c:
        meta = dict(c.metadata)
        rate = c.streams.video[0].average_rate
        imgs = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return torch.from_numpy(np.stack(imgs)).float() / 255, meta, rate


def test_save_video_mp4_roundtrip(base_dir):
    images = frames()
    (video,) = CreateVideo().create(images, 8.0)
    assert video.get_dimensions() == (32, 24) and video.get_frame_count() == 7
    assert video.get_duration() == pytest.approx(7 / 8)
    ui = SaveVideo().save_video(video, "video/ComfyUI", "auto", "auto", prompt=PROMPT, extra_pnginfo=WORKFLOW)["ui"]
    assert ui["animated"] == [True]
    (entry,) = ui["images"]
    assert entry == {"filename": "ComfyUI_00001_.mp4", "subfolder": "video", "type": "output"}
    path = os.path.join(str(base_dir), "output", "video", entry["filename"])
    decoded, meta, rate = _decode(path)
    assert decoded.shape == (7, 24, 32, 3) and rate == 8
    # H.264 (lossy, 4:2:0 chroma) on tiny frames: close, not exact, and each frame is its own source frame
    assert (decoded - images).abs().mean() < 0.05
    dist = ((decoded[:, None] - images[None]).abs().mean(dim=(2, 3, 4)))
    assert torch.equal(dist.argmin(dim=1), torch.arange(7))
    assert json.loads(meta["prompt"]) == PROMPT and json.loads(meta["workflow"]) == WORKFLOW["workflow"]
    # a second save takes the next counter
    ui2 = SaveVideo().save_video(video, "video/ComfyUI", "mp4", "h264")["ui"]
    assert ui2["images"][0]["filename"] == "ComfyUI_00002_.mp4"


def test_audio_is_muxed_and_read_back(base_dir):
    sr = 16000
    t = torch.arange(sr) / sr
    wave = torch.stack([torch.sin(2 * math.pi * 440 * t), torch.sin(2 * math.pi * 220 * t)])[None] * 0.5
    (video,) = CreateVideo().create(frames(8), 8.0, audio={"waveform": wave, "sample_rate": sr})
    SaveVideo().save_video(video, "clip", "auto", "auto")
    path = os.path.join(str(base_dir), "output", "clip_00001_.mp4")
    os.replace(path, os.path.join(str(base_dir), "input", "clip.mp4"))
    assert "clip.mp4" in LoadVideo.INPUT_TYPES()["required"]["file"][0]
    assert LoadVideo.VALIDATE_INPUTS("clip.mp4") is True and LoadVideo.VALIDATE_INPUTS("nope.mp4") is not True
    (loaded,) = LoadVideo().load_video("clip.mp4")
    images, audio, fps = GetVideoComponents().get_components(loaded)
    assert images.shape == (8, 24, 32, 3) and fps == 8.0
    assert audio["sample_rate"] == sr and audio["waveform"].shape[:2] == (1, 2)
    # one second of audio for one second of video (AAC adds priming / padding of a frame or two)
    assert abs(audio["waveform"].shape[-1] - sr) < 3 * 1024
    assert audio["waveform"].abs().max() > 0.3  # the tone survived, not silence


def test_odd_sizes_and_frame_rate_fraction(base_dir):
    (video,) = CreateVideo().create(frames(3, h=25, w=33), 23.976)
    assert video.get_frame_rate() == Fraction(23976, 1000)
    ui = SaveVideo().save_video(video, "odd", "auto", "auto")["ui"]
    decoded, _, rate = _decode(os.path.join(str(base_dir), "output", ui["images"][0]["filename"]))
    assert decoded.shape == (3, 24, 32, 3)  # yuv420p needs even sizes: last row and column dropped
    assert float(rate) == pytest.approx(23.976, abs=1e-3)


def test_save_webm_vp9(base_dir):
    images = frames(5)
    ui = SaveWEBM().save_images(images, "vp9", 12.0, filename_prefix="webm/x", crf=10.0, prompt=PROMPT)["ui"]
    assert ui["animated"] == [True] and ui["images"][0]["filename"].endswith(".webm")
    decoded, meta, rate = _decode(os.path.join(str(base_dir), "output", "webm", ui["images"][0]["filename"]))
    assert decoded.shape == (5, 24, 32, 3) and rate == 12
    assert (decoded - images).abs().mean() < 0.05
    assert json.loads(meta.get("prompt") or meta.get("PROMPT")) == PROMPT


def test_save_animated_webp(base_dir):
    images = frames(5)
    ui = SaveAnimatedWEBP().save_images(images, 10.0, "anim", True, 80, "default", prompt=PROMPT,
                                        extra_pnginfo=WORKFLOW)["ui"]
    assert ui["animated"] == [True]
    with Image.open(os.path.join(str(base_dir), "output", ui["images"][0]["filename"])) as im:
        assert im.format == "WEBP" and im.n_frames == 5 and im.size == (32, 24)
        im.load()
        assert im.info.get("duration") == 100  # 1000 ms / fps
        exif = im.getexif()
        assert exif[0x0110] == "prompt:" + json.dumps(PROMPT)
        assert exif[0x010F] == "workflow:" + json.dumps(WORKFLOW["workflow"])
        im.seek(3)
        got = torch.from_numpy(np.array(im.convert("RGB"))).float()
    # lossless: exactly the uint8-quantised frame
    assert torch.equal(got, (images[3] * 255).floor().clamp(0, 255))
    one = SaveAnimatedWEBP().save_images(images[:1], 6.0, "single", False, 50, "fastest")["ui"]
    assert one["animated"] == [False]


def test_empty_hunyuan_latent_video_shapes():
    node = EmptyHunyuanLatentVideo()
    for length, t in [(1, 1), (4, 1), (5, 2), (25, 7), (81, 21)]:
        (lat,) = node.generate(848, 480, length, 2)
        assert lat["samples"].shape == (2, 16, t, 60, 106)
        assert lat["samples"].abs().sum() == 0 and lat["samples"].device.type == "cpu"
    spec = EmptyHunyuanLatentVideo.INPUT_TYPES()["required"]
    assert list(spec) == ["width", "height", "length", "batch_size"] and spec["length"][1]["step"] == 4


def test_wan_vae_decode_to_video_file(base_dir):
    import nodes
    from comfy.vae import VAE
    from tests.test_wan_vae_oracle import wan_vae_sd

    vae = VAE(wan_vae_sd(seed=7), device=torch.device("cpu"), dtype=torch.float32)
    (latent,) = EmptyHunyuanLatentVideo().generate(32, 16, 9, 1)
    latent["samples"].normal_()
    (images,) = nodes.VAEDecode().decode(vae, latent)
    assert images.shape == (9, 16, 32, 3)  # the length asked for: 9 frames <- 3 latent frames
    (video,) = CreateVideo().create(images, 16.0)
    ui = SaveVideo().save_video(video, "video/wan", "auto", "auto")["ui"]
    decoded, _, _ = _decode(os.path.join(str(base_dir), "output", "video", ui["images"][0]["filename"]))
    assert decoded.shape == (9, 16, 32, 3)


def test_nodes_are_registered():
    import nodes

    nodes.init_extra_nodes(init_custom_nodes=False)
    for name in ("CreateVideo", "SaveVideo", "GetVideoComponents", "LoadVideo", "SaveWEBM", "SaveAnimatedWEBP",
                 "EmptyHunyuanLatentVideo"):
        assert name in nodes.NODE_CLASS_MAPPINGS, name
    assert nodes.NODE_CLASS_MAPPINGS["SaveVideo"].OUTPUT_NODE is True
    save = nodes.NODE_CLASS_MAPPINGS["SaveVideo"].INPUT_TYPES()["required"]
    assert save["filename_prefix"][1]["default"] == "video/ComfyUI"
    assert save["format"][0] == ["auto", "mp4"] and save["codec"][0] == ["auto", "h264"]


def test_comfy_api_import_paths():
    # the paths custom node packs import the VIDEO types from, as in ComfyUI
    from comfy_api.input import VideoInput
    from comfy_api.input_impl import VideoFromComponents, VideoFromFile
    from comfy_api.util import VideoCodec, VideoComponents, VideoContainer

    video = VideoFromComponents(VideoComponents(images=frames(2), frame_rate=Fraction(5)))
    assert isinstance(video, VideoInput) and issubclass(VideoFromFile, VideoInput)
    assert VideoContainer.as_input() == ["auto", "mp4"] and VideoCodec.H264 == "h264"
    with pytest.raises(ValueError, match="unsupported video codec 'vp9'"):
        video.save_to("unused.mp4", codec="vp9")
