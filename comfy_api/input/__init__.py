"""ComfyUI's `comfy_api.input` import path for the VIDEO interface (custom node packs import it from here)."""

from comfy_api.video import VideoInput

__all__ = ["VideoInput"]
