"""ComfyUI's `comfy_api` package, the part of it this fork provides: the VIDEO type (`comfy_api.video`)."""
