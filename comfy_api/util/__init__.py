"""ComfyUI's `comfy_api.util` import path for the video helper types."""

from comfy_api.video import VideoCodec, VideoComponents, VideoContainer

__all__ = ["VideoCodec", "VideoComponents", "VideoContainer"]
