"""The VIDEO type that flows between nodes (ComfyUI's `comfy_api` video interface, kept small).

Owns `VideoComponents` (frames IMAGE [T,H,W,C] 0..1, frame rate, optional AUDIO), the `VideoInput`
interface (`get_components`, `save_to`, `get_dimensions`, `get_duration`, `get_frame_count`,
`get_frame_rate`, `get_container_format`), `VideoFromComponents` (built by CreateVideo) and `VideoFromFile`
(a file decoded lazily with PyAV), plus the container / codec choices SaveVideo offers. AUDIO is ComfyUI's
`{"waveform": [B, channels, samples] float, "sample_rate": int}`.

Writing: H.264 in MP4 (yuv420p), AAC audio when present, the prompt / workflow as container metadata tags
(JSON strings, as ComfyUI writes them so "open workflow from video" works).
"""

from __future__ import annotations

import io
import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction

import numpy as np
import torch

logger = logging.getLogger(__name__)


class VideoContainer(str, Enum):
    AUTO = "auto"
    MP4 = "mp4"

    @classmethod
    def as_input(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def get_extension(cls, value: str | VideoContainer) -> str:
        # "auto" writes MP4, the only container offered
        return "mp4"


class VideoCodec(str, Enum):
    AUTO = "auto"
    H264 = "h264"

    @classmethod
    def as_input(cls) -> list[str]:
        return [m.value for m in cls]


@dataclass
class VideoComponents:
    images: torch.Tensor
    frame_rate: Fraction
    audio: dict | None = None
    metadata: dict | None = None


def to_fraction(fps: float | Fraction) -> Fraction:
    """Frame rates as exact rationals (containers store time bases); 23.976 -> 23976/1000."""
    if isinstance(fps, Fraction):
        return fps
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"frame rate must be a positive number, got {fps}")
    return Fraction(round(fps * 1000), 1000)


def frames_to_uint8(images: torch.Tensor) -> np.ndarray:
    """IMAGE [T,H,W,C] 0..1 -> uint8 RGB [T,H,W,3]; same truncating quantisation as SaveImage."""
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"video frames must be an IMAGE [frames, height, width, channels], got {tuple(images.shape)}")
    arr = np.clip(255.0 * images[..., :3].float().cpu().numpy(), 0, 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def write_video(dest, images: torch.Tensor, frame_rate: float | Fraction, audio: dict | None = None,
                metadata: dict | None = None, codec: str = "h264", container_format: str = "mp4") -> None:
    """Encode frames (and audio) to `dest` (a path or a writable binary file object)."""
    import av

    frames = frames_to_uint8(images)
    rate = to_fraction(frame_rate)
    t, h, w = frames.shape[:3]
    if h % 2 or w % 2:
        # yuv420p stores chroma per 2x2 block: H.264 refuses odd sizes, so the last row/column goes
        logger.warning("video is %dx%d; H.264 (yuv420p) needs even sizes, writing %dx%d", w, h, w - w % 2, h - h % 2)
        frames = frames[:, :h - h % 2, :w - w % 2]
        h, w = h - h % 2, w - w % 2
    # use_metadata_tags: keep arbitrary keys ("prompt", "workflow") in the MP4's metadata
    with av.open(dest, mode="w", format=container_format, options={"movflags": "use_metadata_tags"}) as out:
        for key, value in (metadata or {}).items():
            out.metadata[key] = json.dumps(value)
        stream = out.add_stream({"h264": "libx264"}.get(codec, codec), rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        astream = None
        if audio is not None:
            astream = _add_audio(out, audio)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        out.mux(stream.encode(None))
        if astream is not None:
            _write_audio(out, astream, audio, duration=t / rate)


def _add_audio(out, audio: dict):
    channels = audio["waveform"].shape[1]
    return out.add_stream("aac", rate=int(audio["sample_rate"]), layout="mono" if channels == 1 else "stereo")


def _write_audio(out, astream, audio: dict, duration: Fraction) -> None:
    import av

    rate = int(audio["sample_rate"])
    wave = audio["waveform"][0].float().cpu()  # first item of the batch: one video has one track
    wave = wave[:2] if wave.shape[0] > 1 else wave
    wave = wave[:, :int(math.ceil(duration * rate))]  # no audio past the last frame
    layout = "mono" if wave.shape[0] == 1 else "stereo"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave.numpy()), format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    for packet in astream.encode(frame):
        out.mux(packet)
    out.mux(astream.encode(None))


class VideoInput(ABC):
    """What a VIDEO input offers to nodes (ComfyUI's VideoInput)."""

    @abstractmethod
    def get_components(self) -> VideoComponents: ...

    @abstractmethod
    def save_to(self, path, format: str = VideoContainer.AUTO, codec: str = VideoCodec.AUTO,
                metadata: dict | None = None) -> None: ...

    def get_stream_source(self):
        buf = io.BytesIO()
        self.save_to(buf)
        buf.seek(0)
        return buf

    def get_dimensions(self) -> tuple[int, int]:
        images = self.get_components().images
        return int(images.shape[2]), int(images.shape[1])

    def get_frame_count(self) -> int:
        return int(self.get_components().images.shape[0])

    def get_frame_rate(self) -> Fraction:
        return self.get_components().frame_rate

    def get_duration(self) -> float:
        c = self.get_components()
        return float(c.images.shape[0] / c.frame_rate)

    def get_container_format(self) -> str:
        return VideoContainer.MP4.value


class VideoFromComponents(VideoInput):
    def __init__(self, components: VideoComponents):
        self.components = components

    def get_components(self) -> VideoComponents:
        return self.components

    def save_to(self, path, format: str = VideoContainer.AUTO, codec: str = VideoCodec.AUTO,
                metadata: dict | None = None) -> None:
        fmt, cod = str(getattr(format, "value", format)), str(getattr(codec, "value", codec))
        if fmt not in VideoContainer.as_input():
            raise ValueError(f"unsupported video container '{fmt}': use one of {VideoContainer.as_input()}")
        if cod not in VideoCodec.as_input():
            raise ValueError(f"unsupported video codec '{cod}': use one of {VideoCodec.as_input()}")
        c = self.components
        write_video(path, c.images, c.frame_rate, audio=c.audio, metadata=metadata, codec="h264",
                    container_format=VideoContainer.get_extension(fmt))


class VideoFromFile(VideoInput):
    """A video file (path or binary file object), decoded with PyAV on first use."""

    def __init__(self, file):
        self.file = file
        self._components: VideoComponents | None = None

    def _open(self):
        import av

        if hasattr(self.file, "seek"):
            self.file.seek(0)
        return av.open(self.file, mode="r")

    def get_components(self) -> VideoComponents:
        if self._components is None:
            with self._open() as container:
                if not container.streams.video:
                    raise ValueError(f"'{self.file}' has no video stream")
                stream = container.streams.video[0]
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                rate = stream.average_rate or stream.guessed_rate or Fraction(1)
                meta = dict(container.metadata)
            images = torch.from_numpy(np.stack(frames)).float() / 255.0
            self._components = VideoComponents(images=images, frame_rate=Fraction(rate), audio=self._audio(),
                                               metadata=meta)
        return self._components

    def _audio(self) -> dict | None:
        with self._open() as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            chunks = [f.to_ndarray() for f in container.decode(stream)]
            if not chunks:
                return None
            layout_channels = stream.codec_context.channels
            # planar formats give [channels, n]; packed ones [1, n*channels]
            wave = np.concatenate([c.reshape(layout_channels, -1) for c in chunks], axis=1)
            return {"waveform": torch.from_numpy(wave.astype(np.float32))[None], "sample_rate": stream.rate}

    def get_container_format(self) -> str:
        with self._open() as container:
            return container.format.name

    def save_to(self, path, format: str = VideoContainer.AUTO, codec: str = VideoCodec.AUTO,
                metadata: dict | None = None) -> None:
        c = self.get_components()
        write_video(path, c.images, c.frame_rate, audio=c.audio, metadata=metadata)
