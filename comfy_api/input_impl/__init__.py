"""ComfyUI's `comfy_api.input_impl` import path for the VIDEO implementations."""

from comfy_api.video import VideoFromComponents, VideoFromFile

__all__ = ["VideoFromComponents", "VideoFromFile"]
