"""Video nodes with ComfyUI's names and inputs: CreateVideo, GetVideoComponents, SaveVideo, LoadVideo,
SaveWEBM and SaveAnimatedWEBP.

Files go to the output folder (`folder_paths.get_save_image_path`, names `<prefix>_<counter:05>_.<ext>`),
carry the prompt / workflow as metadata unless --disable-metadata (MP4/WebM container tags; WebP EXIF
Model/Make tags, as ComfyUI writes them), and the UI result is `{"images": [{filename, subfolder, type}],
"animated": [True]}`, which is how the frontend knows to show a video / animation.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from PIL import Image

import folder_paths
from comfy_api.video import (
    VideoCodec,
    VideoComponents,
    VideoContainer,
    VideoFromComponents,
    VideoFromFile,
    frames_to_uint8,
    to_fraction,
)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif")


def _metadata(prompt, extra_pnginfo) -> dict | None:
    from comfy.cli_args import args

    if args.disable_metadata:
        return None
    meta = dict(extra_pnginfo or {})
    if prompt is not None:
        meta["prompt"] = prompt
    return meta


def _output_path(prefix: str, width: int, height: int, ext: str) -> tuple[str, dict]:
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    file = f"{filename}_{counter:05}_.{ext}"
    return os.path.join(folder, file), {"filename": file, "subfolder": subfolder, "type": "output"}


class CreateVideo:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"images": ("IMAGE", {"tooltip": "The images to create a video from."}),
                             "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0})},
                "optional": {"audio": ("AUDIO", {"tooltip": "The audio to add to the video."})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "create"
    CATEGORY = "image/video"
    DESCRIPTION = "Create a video from images."

    def create(self, images, fps, audio=None):
        return (VideoFromComponents(VideoComponents(images=images, frame_rate=to_fraction(fps), audio=audio)),)


class GetVideoComponents:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"video": ("VIDEO", {"tooltip": "The video to extract components from."})}}

    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("images", "audio", "fps")
    FUNCTION = "get_components"
    CATEGORY = "image/video"
    DESCRIPTION = "Extracts all components from a video: frames, audio, and framerate."

    def get_components(self, video):
        c = video.get_components()
        return (c.images, c.audio, float(c.frame_rate))


class SaveVideo:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "video": ("VIDEO", {"tooltip": "The video to save."}),
            "filename_prefix": ("STRING", {"default": "video/ComfyUI", "tooltip": "The prefix for the file to save. "
                                           "This may include formatting information such as %date:yyyy-MM-dd% "
                                           "or %Empty Latent Image.width% to include values from nodes."}),
            "format": (VideoContainer.as_input(), {"default": "auto", "tooltip": "The format to save the video as."}),
            "codec": (VideoCodec.as_input(), {"default": "auto", "tooltip": "The codec to use for the video."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_video"
    OUTPUT_NODE = True
    CATEGORY = "image/video"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_video(self, video, filename_prefix="video/ComfyUI", format="auto", codec="auto", prompt=None,
                   extra_pnginfo=None):
        width, height = video.get_dimensions()
        path, result = _output_path(filename_prefix, width, height, VideoContainer.get_extension(format))
        video.save_to(path, format=format, codec=codec, metadata=_metadata(prompt, extra_pnginfo))
        return {"ui": {"images": [result], "animated": [True]}}


class LoadVideo:
    @classmethod
    def INPUT_TYPES(s):
        root = folder_paths.get_input_directory()
        files = sorted(f for f in (os.listdir(root) if os.path.isdir(root) else [])
                       if os.path.isfile(os.path.join(root, f)) and f.lower().endswith(VIDEO_EXTENSIONS))
        return {"required": {"file": (files, {"video_upload": True})}}

    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load_video"
    CATEGORY = "image/video"

    def load_video(self, file):
        return (VideoFromFile(folder_paths.get_annotated_filepath(file)),)

    @classmethod
    def IS_CHANGED(s, file):
        m = hashlib.sha256()
        with open(folder_paths.get_annotated_filepath(file), "rb") as f:
            m.update(f.read())
        return m.digest().hex()

    @classmethod
    def VALIDATE_INPUTS(s, file):
        if not folder_paths.exists_annotated_filepath(file):
            return f"Invalid video file: {file} (put it in the input folder or upload it)"
        return True


class SaveWEBM:
    CODECS = {"vp9": "libvpx-vp9", "av1": "libsvtav1"}

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "codec": (list(s.CODECS),),
            "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            "crf": ("FLOAT", {"default": 32.0, "min": 0, "max": 63.0, "step": 1,
                              "tooltip": "Higher crf means lower quality with a smaller file size, lower crf "
                                         "means higher quality higher filesize."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/video"

    def save_images(self, images, codec, fps, filename_prefix="ComfyUI", crf=32.0, prompt=None, extra_pnginfo=None):
        import av

        encoder = self.CODECS[codec]
        if encoder not in av.codecs_available and codec == "av1":
            encoder = "libaom-av1"  # the other AV1 encoder FFmpeg builds ship
        if encoder not in av.codecs_available:
            raise ValueError(f"this PyAV/FFmpeg build has no {codec} encoder ({encoder}): use codec 'vp9'")
        frames = frames_to_uint8(images)
        h, w = frames.shape[1:3]
        path, result = _output_path(filename_prefix, w, h, "webm")
        with av.open(path, mode="w") as out:
            for key, value in (_metadata(prompt, extra_pnginfo) or {}).items():
                out.metadata[key] = json.dumps(value)
            stream = out.add_stream(encoder, rate=to_fraction(fps))
            stream.width, stream.height = w - w % 2, h - h % 2  # 4:2:0 chroma needs even sizes
            stream.pix_fmt = "yuv420p10le" if codec == "av1" else "yuv420p"
            stream.bit_rate = 0  # constant-quality mode: crf alone sets the quality
            stream.options = {"crf": str(int(crf))}
            for frame in frames[:, :stream.height, :stream.width]:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    out.mux(packet)
            out.mux(stream.encode(None))
        return {"ui": {"images": [result], "animated": [True]}}


class SaveAnimatedWEBP:
    METHODS = {"default": 4, "fastest": 0, "slowest": 6}

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "images": ("IMAGE",),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
            "lossless": ("BOOLEAN", {"default": True}),
            "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
            "method": (list(s.METHODS),)},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image/animation"

    def save_images(self, images, fps, filename_prefix, lossless, quality, method, num_frames=0, prompt=None,
                    extra_pnginfo=None):
        frames = [Image.fromarray(a) for a in frames_to_uint8(images)]
        exif = frames[0].getexif()
        meta = _metadata(prompt, extra_pnginfo)
        if meta is not None:
            # ComfyUI's WebP convention: EXIF Model (0x0110) holds "prompt:<json>", Make (0x010f) and the tags
            # below it hold "<key>:<json>" for each extra_pnginfo entry (the workflow)
            if "prompt" in meta:
                exif[0x0110] = "prompt:" + json.dumps(meta.pop("prompt"))
            for tag, (key, value) in zip(range(0x010f, 0, -1), meta.items()):
                exif[tag] = f"{key}:{json.dumps(value)}"
        per_file = num_frames or len(frames)
        results = []
        for start in range(0, len(frames), per_file):
            path, result = _output_path(filename_prefix, frames[0].width, frames[0].height, "webp")
            chunk = frames[start:start + per_file]
            chunk[0].save(path, save_all=True, duration=int(1000.0 / fps), append_images=chunk[1:], exif=exif,
                          lossless=lossless, quality=quality, method=self.METHODS[method])
            results.append(result)
        return {"ui": {"images": results, "animated": [per_file != 1]}}


NODE_CLASS_MAPPINGS = {
    "CreateVideo": CreateVideo,
    "GetVideoComponents": GetVideoComponents,
    "SaveVideo": SaveVideo,
    "LoadVideo": LoadVideo,
    "SaveWEBM": SaveWEBM,
    "SaveAnimatedWEBP": SaveAnimatedWEBP,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "CreateVideo": "Create Video",
    "GetVideoComponents": "Get Video Components",
    "SaveVideo": "Save Video",
    "LoadVideo": "Load Video",
    "SaveWEBM": "SaveWEBM",
    "SaveAnimatedWEBP": "SaveAnimatedWEBP",
}
