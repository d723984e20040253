"""Example custom node: send images to the WebSocket client instead of saving them.

`SaveImageWebsocket` (ComfyUI's name for this example) pushes each image of its IMAGE input as a PNG
binary preview frame to the client that queued the prompt; nothing is written to disk. API clients use
it to get results without polling /history and /view. The frames go through the node's ProgressBar,
so the server turns them into preview frames (type 1, or type 4 with the node id for clients that
advertised `supports_preview_metadata`).
"""

import numpy as np
from PIL import Image

import comfy.utils


class SaveImageWebsocket:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "api node/image"
    DESCRIPTION = "Sends the images to the client over the WebSocket as PNG frames (nothing is saved)."

    def save_images(self, images):
        bar = comfy.utils.ProgressBar(images.shape[0])
        for step, image in enumerate(images):
            pixels = np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)
            # max_size None: the client gets the full-size image, not a preview-sized one.
            bar.update_absolute(step + 1, images.shape[0], ("PNG", Image.fromarray(pixels), None))
        return {}

    @classmethod
    def IS_CHANGED(cls, images):
        # Re-send on every run: a cached result would send nothing to the client.
        return float("nan")


NODE_CLASS_MAPPINGS = {"SaveImageWebsocket": SaveImageWebsocket}
