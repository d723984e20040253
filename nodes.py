"""Core nodes and the node registry.

`NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS` are ComfyUI's registry interface: the server's
/object_info, the executor and custom node packs all read them. Built-in feature nodes live in
`comfy_extras/nodes_<feature>.py`; third-party packs in `custom_nodes/` load the same way ComfyUI loads
them (a module or package exporting NODE_CLASS_MAPPINGS, optionally NODE_DISPLAY_NAME_MAPPINGS and
WEB_DIRECTORY). A pack that fails to import is logged and skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import sys
import time
import traceback

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy.png_writer import keyword_problem, save_png

MAX_RESOLUTION = 16384

# ---------------------------------------------------------------------------------------------------
# Core node classes
# ---------------------------------------------------------------------------------------------------

# (core node classes are defined here)

# --- Loaders, text encoding, latents, VAE and images (Flux slice) -----------------------------------


def _clip_model_options(device: str | None) -> dict:
    return {"load_device": torch.device("cpu"), "offload_device": torch.device("cpu")} if device == "cpu" else {}


class CheckpointLoaderSimple:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                                           {"tooltip": "The name of the checkpoint (model) to load."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."

    def load_checkpoint(self, ckpt_name):
        ckpt_path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        out = comfy.sd.load_checkpoint_guess_config(
            ckpt_path, output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return out[:3]


class UNETLoader:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"

    def load_unet(self, unet_name, weight_dtype):
        model_options = {}
        if weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
            model_options["dtype"] = torch.float8_e4m3fn
            if weight_dtype == "fp8_e4m3fn_fast":
                model_options["fp8_optimizations"] = True
        elif weight_dtype == "fp8_e5m2":
            model_options["dtype"] = torch.float8_e5m2
        unet_path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return (comfy.sd.load_diffusion_model(unet_path, model_options=model_options),)


CLIP_LOADER_TYPES = ["stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart",
                     "cosmos", "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image",
                     "hunyuan_image", "flux2", "ovis"]
DUAL_CLIP_LOADER_TYPES = ["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image",
                          "hunyuan_video_15", "kandinsky5", "kandinsky5_image", "newbie"]


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": (CLIP_LOADER_TYPES,)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "[Recipes]\n\nstable_diffusion: clip-l\nsd3: t5 xxl/ clip-g / clip-l\nwan: umt5 xxl"

    def load_clip(self, clip_name, type="stable_diffusion", device="default"):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        return (comfy.sd.load_clip([path], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type=type, model_options=_clip_model_options(device)),)


class DualCLIPLoader:
    @classmethod
    def INPUT_TYPES(s):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,), "type": (DUAL_CLIP_LOADER_TYPES,)},
                "optional": {"device": (["default", "cpu"], {"advanced": True})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\nflux: clip-l, t5"

    def load_clip(self, clip_name1, clip_name2, type, device="default"):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        return (comfy.sd.load_clip(paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type=type, model_options=_clip_model_options(device)),)


class TripleCLIPLoader:
    @classmethod
    def INPUT_TYPES(s):
        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,), "clip_name3": (names,)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "[Recipes]\n\nsd3: clip-l, clip-g, t5"

    def load_clip(self, clip_name1, clip_name2, clip_name3):
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n)
                 for n in (clip_name1, clip_name2, clip_name3)]
        return (comfy.sd.load_clip(paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type="sd3"),)


class VAELoader:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"

    def load_vae(self, vae_name):
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        sd = comfy.utils.load_torch_file(path)
        from comfy.vae import VAE

        try:
            # the VAE keeps the file name so a latent of another family is refused naming this file
            return (VAE(sd=sd, name=vae_name),)
        except ValueError as e:
            if vae_name in str(e):
                raise
            raise ValueError(f"'{vae_name}': {e}") from e


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = "Encodes a text prompt using a CLIP model into an embedding that can be used to guide " \
                  "the diffusion model towards generating specific images."

    def encode(self, clip, text):
        if clip is None:
            raise RuntimeError("CLIPTextEncode got no CLIP (None): the checkpoint has no text encoder. Load the "
                               "text encoders with CLIPLoader / DualCLIPLoader and connect that CLIP instead.")
        tokens = clip.tokenize(text)
        return (clip.encode_from_tokens_scheduled(tokens),)


class ConditioningZeroOut:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    def zero_out(self, conditioning):
        out = []
        for cond, extra in conditioning:
            extra = dict(extra)
            pooled = extra.get("pooled_output")
            if pooled is not None:
                extra["pooled_output"] = torch.zeros_like(pooled)
            out.append([torch.zeros_like(cond), extra])
        return (out,)


class EmptyLatentImage:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."})}}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."

    def generate(self, width, height, batch_size=1):
        latent = torch.zeros([batch_size, 4, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return ({"samples": latent},)


class VAEDecode:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
            "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."

    def decode(self, vae, samples):
        images = vae.decode(samples["samples"])
        if images.ndim == 5:  # video: fold frames into the batch
            images = images.reshape(-1, *images.shape[-3:])
        return (images,)


class VAEEncode:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"

    def encode(self, vae, pixels):
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)


class SaveImage:
    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.type = "output"
        self.prefix_append = ""
        self.compress_level = 4

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to save."}),
            "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. "
                                           "This may include formatting information such as %date:yyyy-MM-dd% "
                                           "or %Empty Latent Image.width% to include values from nodes."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        from comfy.cli_args import args

        filename_prefix += self.prefix_append
        full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])
        results = []
        for batch_number, image in enumerate(images):
            arr = image_to_uint8(image)
            metadata = None
            if not args.disable_metadata:
                metadata = {}
                if prompt is not None:
                    metadata["prompt"] = json.dumps(prompt)
                for key, value in (extra_pnginfo or {}).items():
                    problem = keyword_problem(key)
                    if problem is None:
                        metadata[key] = json.dumps(value)
                    else:  # the image is still saved; only this item stays out of the file
                        logging.warning("SaveImage: extra_pnginfo item left out of the PNG: %s", problem)
            name = filename.replace("%batch_num%", str(batch_number))
            file = f"{name}_{counter:05}_.png"
            # comfy/png_writer: multi-threaded encoder writing the same tEXt/iTXt chunks as PngInfo.add_text;
            # in a multi-GPU job the ranks (which all run this node, with the same image) encode it together
            save_png(os.path.join(full_output_folder, file), arr, text=metadata, compress_level=self.compress_level,
                     share=_png_share())
            results.append({"filename": file, "subfolder": subfolder, "type": self.type})
            counter += 1
        return {"ui": {"images": results}}


def image_to_uint8(image: torch.Tensor) -> np.ndarray:
    """One IMAGE [H, W, C] (float, 0..1) as the uint8 array a saved file holds: 255 * x in float32, clipped to
    0..255 and truncated, the same bytes as doing it in numpy. Torch passes over blocks of rows (a cache-sized
    float32 temporary each) on the PNG encoder's threads, instead of three numpy passes over the whole image
    with a fresh temporary each: 9-12 ms at 1024² on an H200 host, 12 ms one torch pass under torchrun's one
    intra-op thread (bench_vae_parallel.py, calls s37 and s39; the fork path's profile)."""
    from comfy.png_writer import run_row_blocks

    image = image.cpu()
    height = image.shape[0]
    out = np.empty(tuple(image.shape), dtype=np.uint8)
    rows = max(1, (256 << 10) // max(1, image[0].numel() * 4))  # ~256 KiB of float32 per pass

    def block(r0: int, r1: int) -> None:
        # pool threads are not in the executor's inference mode: write through a tensor made here, not one
        # made by the calling thread (an inference tensor, which only inference mode may update in place)
        target = torch.from_numpy(out)
        for a in range(r0, r1, rows):
            b = min(a + rows, r1)
            target[a:b] = (image[a:b].float() * 255.0).clamp_(0.0, 255.0)  # a new temporary: the IMAGE stays

    run_row_blocks(height, block, min_rows=rows)
    return out


def _png_share():
    from comfy.taco_dit.core.execution_engine import png_share

    return png_share()


class PreviewImage(SaveImage):
    def __init__(self):
        self.output_dir = folder_paths.get_temp_directory()
        self.type = "temp"
        self.prefix_append = "_temp_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
        self.compress_level = 1

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}


class LoadImage:
    @classmethod
    def INPUT_TYPES(s):
        input_dir = folder_paths.get_input_directory()
        files = [f for f in os.listdir(input_dir) if os.path.isfile(os.path.join(input_dir, f))] \
            if os.path.isdir(input_dir) else []
        return {"required": {"image": (sorted(files), {"image_upload": True})}}

    CATEGORY = "image"
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"

    def load_image(self, image):
        image_path = folder_paths.get_annotated_filepath(image)
        img = Image.open(image_path)
        output_images, output_masks = [], []
        w = h = None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda i: i * (1 / 255))
            rgb = frame.convert("RGB")
            if w is None:
                w, h = rgb.size
            if rgb.size != (w, h):
                continue  # frames of another size cannot be batched
            output_images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                output_masks.append((1.0 - torch.from_numpy(alpha))[None])
            else:
                output_masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
            if img.format == "MPO":
                break  # MPO's extra frames are depth/preview images, not animation
        if len(output_images) > 1:
            return (torch.cat(output_images, dim=0), torch.cat(output_masks, dim=0))
        return (output_images[0], output_masks[0])

    @classmethod
    def IS_CHANGED(s, image):
        image_path = folder_paths.get_annotated_filepath(image)
        m = hashlib.sha256()
        with open(image_path, "rb") as f:
            m.update(f.read())
        return m.digest().hex()

    @classmethod
    def VALIDATE_INPUTS(s, image):
        if not folder_paths.exists_annotated_filepath(image):
            return f"Invalid image file: {image}"
        return True


_FLUX_SLICE_NODES = {
    "CheckpointLoaderSimple": (CheckpointLoaderSimple, "Load Checkpoint"),
    "UNETLoader": (UNETLoader, "Load Diffusion Model"),
    "CLIPLoader": (CLIPLoader, "Load CLIP"),
    "DualCLIPLoader": (DualCLIPLoader, "DualCLIPLoader"),
    "TripleCLIPLoader": (TripleCLIPLoader, "TripleCLIPLoader"),
    "VAELoader": (VAELoader, "Load VAE"),
    "CLIPTextEncode": (CLIPTextEncode, "CLIP Text Encode (Prompt)"),
    "ConditioningZeroOut": (ConditioningZeroOut, "ConditioningZeroOut"),
    "EmptyLatentImage": (EmptyLatentImage, "Empty Latent Image"),
    "VAEDecode": (VAEDecode, "VAE Decode"),
    "VAEEncode": (VAEEncode, "VAE Encode"),
    "SaveImage": (SaveImage, "Save Image"),
    "PreviewImage": (PreviewImage, "Preview Image"),
    "LoadImage": (LoadImage, "Load Image"),
}


# -- sampling (KSampler, KSamplerAdvanced): ComfyUI's inputs, comfyui-compat.md §3 / §7 -----------------


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0,
                    disable_noise=False, start_step=None, last_step=None, force_full_denoise=False):
    """Seeded noise (ComfyUI's CPU draw, honouring batch_index), then comfy.sample.sample with progress."""
    import torch

    import comfy.sample
    import comfy.utils
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                            device="cpu")
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, disable_noise=disable_noise,
                                  start_step=start_step, last_step=last_step,
                                  force_full_denoise=force_full_denoise, noise_mask=latent.get("noise_mask"),
                                  callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                  seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return (out,)


def _sampler_names():
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


class KSampler:
    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_names()
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance scale; 1.0 skips the negative prompt."}),
            "sampler_name": (samplers, {"tooltip": "The sampling algorithm."}),
            "scheduler": (schedulers, {"tooltip": "How the noise levels are spaced over the steps."}),
            "positive": ("CONDITIONING", {"tooltip": "What to include in the image."}),
            "negative": ("CONDITIONING", {"tooltip": "What to exclude from the image."}),
            "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "How much of the latent is replaced by noise (1.0 = all)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0):
        return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise)


class KSamplerAdvanced:
    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = _sampler_names()
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                   "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (samplers,),
            "scheduler": (schedulers,),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, start_at_step, end_at_step, return_with_leftover_noise, denoise=1.0):
        return common_ksampler(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise=denoise, disable_noise=add_noise == "disable",
                               start_step=start_at_step, last_step=end_at_step,
                               force_full_denoise=return_with_leftover_noise != "enable")


# -- LoRA and ControlNet (comfy.lora, comfy.controlnet): ComfyUI's inputs ---------------------------


class LoraLoader:
    def __init__(self):
        # (path, state dict): a strength change re-patches without re-reading the file
        self.loaded_lora = None

    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to modify the diffusion model."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to modify the CLIP model."})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are " \
                  "denoised such as applying styles. Multiple LoRA nodes can be linked together."

    def _lora_sd(self, lora_name):
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if self.loaded_lora is None or self.loaded_lora[0] != path:
            self.loaded_lora = (path, comfy.utils.load_torch_file(path, safe_load=True))
        return self.loaded_lora[1]

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        import comfy.lora

        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        m, c = comfy.lora.load_lora_for_models(model, clip, self._lora_sd(lora_name), strength_model,
                                               strength_clip, name=lora_name)
        return (m, c)


class LoraLoaderModelOnly(LoraLoader):
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_lora_model_only"

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


class ControlNetLoader:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"control_net_name": (folder_paths.get_filename_list("controlnet"),)}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"

    def load_controlnet(self, control_net_name):
        import comfy.controlnet

        path = folder_paths.get_full_path_or_raise("controlnet", control_net_name)
        return (comfy.controlnet.load_controlnet(path),)


class ControlNetApplyAdvanced:
    @classmethod
    def INPUT_TYPES(s):
        return {"required": {"positive": ("CONDITIONING",),
                             "negative": ("CONDITIONING",),
                             "control_net": ("CONTROL_NET",),
                             "image": ("IMAGE",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                             "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                             "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
                "optional": {"vae": ("VAE",)}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"

    def apply_controlnet(self, positive, negative, control_net, image, strength, start_percent, end_percent,
                         vae=None, extra_concat=None):
        if strength == 0:
            return (positive, negative)
        hint = image.movedim(-1, 1)
        # one copy per previous controlnet, so positive and negative share it and batch together
        made = {}
        out = []
        for conditioning in (positive, negative):
            entries = []
            for t in conditioning:
                d = t[1].copy()
                prev = d.get("control", None)
                key = id(prev)
                if key not in made:
                    made[key] = control_net.copy().set_cond_hint(hint, strength, (start_percent, end_percent),
                                                                 vae=vae, extra_concat=extra_concat or [])
                    made[key].set_previous_controlnet(prev)
                d["control"] = made[key]
                d["control_apply_to_uncond"] = False
                entries.append([t[0], d])
            out.append(entries)
        return (out[0], out[1])


NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _name, (_cls, _title) in _FLUX_SLICE_NODES.items():
    NODE_CLASS_MAPPINGS[_name] = _cls
    NODE_DISPLAY_NAME_MAPPINGS[_name] = _title
NODE_CLASS_MAPPINGS.update({"KSampler": KSampler, "KSamplerAdvanced": KSamplerAdvanced})
NODE_DISPLAY_NAME_MAPPINGS.update({"KSampler": "KSampler", "KSamplerAdvanced": "KSampler (Advanced)"})
NODE_CLASS_MAPPINGS.update({"LoraLoader": LoraLoader, "LoraLoaderModelOnly": LoraLoaderModelOnly,
                            "ControlNetLoader": ControlNetLoader, "ControlNetApplyAdvanced": ControlNetApplyAdvanced})
NODE_DISPLAY_NAME_MAPPINGS.update({"LoraLoader": "Load LoRA", "LoraLoaderModelOnly": "LoraLoaderModelOnly",
                                   "ControlNetLoader": "Load ControlNet Model",
                                   "ControlNetApplyAdvanced": "Apply ControlNet"})

# ---------------------------------------------------------------------------------------------------
# Loading comfy_extras and custom_nodes
# ---------------------------------------------------------------------------------------------------

EXTENSION_WEB_DIRS: dict[str, str] = {}
LOADED_MODULE_DIRS: dict[str, str] = {}
# name -> error text for packs that failed to import (shown in the log and by tests)
FAILED_CUSTOM_NODES: dict[str, str] = {}

_BUILTIN_EXTRAS_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "comfy_extras")


def _module_name_for(module_path: str) -> str:
    base = os.path.basename(module_path)
    if os.path.isfile(module_path):
        base = os.path.splitext(base)[0]
    return base


def load_custom_node(module_path: str, ignore: set[str] | frozenset[str] = frozenset(),
                     module_parent: str = "custom_nodes") -> bool:
    """Import one node module or package and merge its nodes into the registry. False on failure."""
    name = _module_name_for(module_path)
    if os.path.isfile(module_path):
        module_dir = os.path.dirname(module_path)
        spec = importlib.util.spec_from_file_location(f"{module_parent}.{name}", module_path)
    else:
        module_dir = module_path
        init = os.path.join(module_path, "__init__.py")
        spec = importlib.util.spec_from_file_location(f"{module_parent}.{name}", init,
                                                      submodule_search_locations=[module_path])
    try:
        if spec is None or spec.loader is None:
            raise ImportError(f"no importable module at {module_path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        LOADED_MODULE_DIRS[name] = os.path.abspath(module_dir)

        web_dir = getattr(module, "WEB_DIRECTORY", None)
        if web_dir is not None:
            web_dir = os.path.abspath(os.path.join(module_dir, web_dir))
            if os.path.isdir(web_dir):
                EXTENSION_WEB_DIRS[name] = web_dir

        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if mappings is None:
            raise AttributeError(f"{module_path} has no NODE_CLASS_MAPPINGS")
        for node_name, node_cls in mappings.items():
            if node_name in ignore:
                continue
            node_cls.RELATIVE_PYTHON_MODULE = f"{module_parent}.{name}"
            NODE_CLASS_MAPPINGS[node_name] = node_cls
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
        for node_name, title in display.items():
            if node_name not in ignore:
                NODE_DISPLAY_NAME_MAPPINGS[node_name] = title
        return True
    except Exception as e:  # a broken pack must never take the server down
        sys.modules.pop(spec.name if spec else "", None)
        tb = traceback.format_exc()
        FAILED_CUSTOM_NODES[name] = f"{type(e).__name__}: {e}"
        logging.warning("Cannot import %s module for custom nodes: %s\n%s", module_path, e, tb)
        return False


def _candidate_modules(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    out = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.startswith(".") or entry == "__pycache__" or entry.endswith(".disabled"):
            continue
        if os.path.isfile(path) and entry.endswith(".py"):
            out.append(path)
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            out.append(path)
    return out


def init_builtin_extra_nodes() -> list[str]:
    """Load comfy_extras/nodes_*.py. Returns the names that failed (a bug in our code)."""
    failed = []
    for path in _candidate_modules(_BUILTIN_EXTRAS_DIR):
        if not os.path.basename(path).startswith("nodes_"):
            continue
        if not load_custom_node(path, module_parent="comfy_extras"):
            failed.append(os.path.basename(path))
    return failed


def init_external_custom_nodes(whitelist: list[str] | None = None, disable_all: bool = False) -> None:
    base_node_names = set(NODE_CLASS_MAPPINGS)
    for directory in folder_paths.get_folder_paths("custom_nodes"):
        for path in _candidate_modules(directory):
            name = _module_name_for(path)
            if disable_all and name not in (whitelist or []):
                logging.info("Skipping custom node pack %s (--disable-all-custom-nodes)", name)
                continue
            t0 = time.perf_counter()
            ok = load_custom_node(path, ignore=base_node_names)
            logging.info("Import %s custom nodes %s (%.1fs)", "of" if ok else "FAILED for", path,
                         time.perf_counter() - t0)


def init_extra_nodes(init_custom_nodes: bool = True, disable_all_custom_nodes: bool = False,
                     whitelist: list[str] | None = None) -> None:
    failed = init_builtin_extra_nodes()
    if failed:
        logging.warning("Built-in node modules failed to import: %s", ", ".join(failed))
    if init_custom_nodes:
        init_external_custom_nodes(whitelist=whitelist, disable_all=disable_all_custom_nodes)
