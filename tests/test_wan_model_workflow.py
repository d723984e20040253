"""End to end through execution.PromptExecutor: the API-format equivalent of the text_to_video_wan and
image_to_video_wan templates on tiny random-weight files (Wan DiT, umT5 with embedded tokenizer, Wan VAE,
CLIP vision) placed in the models/ folders, loaded by the real loader nodes."""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors.torch import save_file

from tests.test_wan_model_clip_vision import tiny_clip_vision
from tests.test_wan_model_oracle import TINY, random_wan_state_dict

W, H, LENGTH = 64, 48, 5     # -> latent [1, 16, 2, 6, 8]: 2 x 3 x 4 = 24 video tokens


def write_umt5(base_dir) -> None:
    """A tiny umT5 encoder with its sentencepiece tokenizer embedded: models/text_encoders/umt5_tiny.safetensors."""
    import transformers as tr

    from comfy.text_encoders import tokenizers as tk

    models = base_dir / "models"
    (models / "text_encoders").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(12)
    d = TINY["text_dim"]
    te = tr.UMT5EncoderModel(tr.UMT5Config(vocab_size=160, d_model=d, d_kv=d // 2, num_heads=2, d_ff=2 * d,
                                           num_layers=2, feed_forward_proj="gated-gelu", dropout_rate=0.0))
    sd = {k: v.contiguous() for k, v in te.state_dict().items() if k != "encoder.embed_tokens.weight"}
    spm = tk.write_small_tokenizer("umt5", str(base_dir / "spm"))
    with open(spm, "rb") as f:
        sd["spiece_model"] = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    save_file(sd, str(models / "text_encoders" / "umt5_tiny.safetensors"))


def _write_models(base_dir, i2v: bool = False):
    from tests.test_wan_vae_oracle import wan_vae_sd

    models = base_dir / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "clip_vision"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    kind = "i2v" if i2v else "t2v"
    cfg = TINY if i2v else {k: v for k, v in TINY.items() if k != "in_dim_img"}
    save_file(random_wan_state_dict(kind, seed=11, **cfg), str(models / "diffusion_models" / f"wan_{kind}.safetensors"))
    write_umt5(base_dir)
    save_file(wan_vae_sd(seed=13), str(models / "vae" / "wan_2.1_vae.safetensors"))
    if i2v:
        _, cv = tiny_clip_vision(hidden=TINY["in_dim_img"], seed=14)
        save_file(cv, str(models / "clip_vision" / "clip_vision_tiny.safetensors"))


def t2v_prompt(seed: int = 7) -> dict:
    return {
        "37": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan_t2v.safetensors", "weight_dtype": "default"}},
        "38": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_tiny.safetensors", "type": "wan",
                                                      "device": "default"}},
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "48": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["37", 0], "shift": 8.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "a fox in the snow"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["38", 0], "text": "blurry, static"}},
        "40": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": W, "height": H, "length": LENGTH,
                                                                   "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["48", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["40", 0],
            "seed": seed, "steps": 3, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
        "50": {"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 16.0}},
        "49": {"class_type": "SaveVideo", "inputs": {"video": ["50", 0], "filename_prefix": "video/ComfyUI",
                                                     "format": "auto", "codec": "auto"}},
    }


def i2v_prompt(seed: int = 7) -> dict:
    p = t2v_prompt(seed)
    p["37"]["inputs"]["unet_name"] = "wan_i2v.safetensors"
    del p["40"]
    p.update({
        "49v": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_tiny.safetensors"}},
        "52": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "51": {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["49v", 0], "image": ["52", 0],
                                                            "crop": "none"}},
        "50i": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "vae": ["39", 0], "clip_vision_output": ["51", 0],
            "start_image": ["52", 0], "width": W, "height": H, "length": LENGTH, "batch_size": 1}},
    })
    p["3"]["inputs"].update({"positive": ["50i", 0], "negative": ["50i", 1], "latent_image": ["50i", 2]})
    return p


def run_prompt(prompt: dict, pid: str, output_node: str = "49") -> str:
    """Validate and execute `prompt`; the path of the one file `output_node` saved."""
    import execution
    import folder_paths
    from tests.fixtures.harness import FakeServer

    ok, err, outputs, node_errors = execution.validate_prompt(pid, prompt)
    assert ok, (err, node_errors)
    ex = execution.PromptExecutor(FakeServer())
    ex.execute(prompt, pid, {}, outputs)
    assert ex.success, ex.status_messages
    files = ex.history_result["outputs"][output_node]["images"]
    assert len(files) == 1
    return os.path.join(folder_paths.get_output_directory(), files[0]["subfolder"], files[0]["filename"])


def _frames(path: str) -> np.ndarray:
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_text_to_video_wan_workflow(base_dir):
    import nodes

    _write_models(base_dir)
    nodes.init_extra_nodes(init_custom_nodes=False)
    frames = _frames(run_prompt(t2v_prompt(), "wan-t2v-0"))
    assert frames.shape == (LENGTH, H, W, 3)
    assert len(np.unique(frames)) > 10      # random weights still give structure, not a flat colour
    # same seed, fresh executor (nothing cached) -> the same video; another seed -> a different one
    again = _frames(run_prompt(t2v_prompt(), "wan-t2v-1"))
    assert np.array_equal(frames, again)
    other = _frames(run_prompt(t2v_prompt(seed=8), "wan-t2v-2"))
    assert not np.array_equal(frames, other)


def test_image_to_video_wan_workflow(base_dir):
    from PIL import Image

    import folder_paths
    import nodes

    _write_models(base_dir, i2v=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        os.path.join(folder_paths.get_input_directory(), "start.png"))
    nodes.init_extra_nodes(init_custom_nodes=False)
    frames = _frames(run_prompt(i2v_prompt(), "wan-i2v-0"))
    assert frames.shape == (LENGTH, H, W, 3)
    assert len(np.unique(frames)) > 10
    # the start image reaches the model (c_concat and CLIP tokens): another image, another video
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
        os.path.join(folder_paths.get_input_directory(), "start.png"))
    other = _frames(run_prompt(i2v_prompt(), "wan-i2v-1"))
    assert not np.array_equal(frames, other)


def test_wan_image_to_video_node_conditioning(base_dir):
    import nodes
    from comfy_extras.nodes_wan import WanFirstLastFrameToVideo, WanImageToVideo

    _write_models(base_dir)
    (vae,) = nodes.VAELoader().load_vae("wan_2.1_vae.safetensors")
    pos = [[torch.ones(1, 3, 8), {"pooled_output": None}]]
    neg = [[torch.zeros(1, 3, 8), {}]]
    start = torch.rand(2, 40, 56, 3)
    p, n, latent = WanImageToVideo().execute(pos, neg, vae, 64, 48, 9, 2, start_image=start,
                                             clip_vision_output="cv")
    assert latent["samples"].shape == (2, 16, 3, 6, 8) and not latent["samples"].any()
    assert "concat_latent_image" not in pos[0][1]      # inputs are not mutated
    for c in (p, n):
        opts = c[0][1]
        assert opts["concat_latent_image"].shape == (1, 16, 3, 6, 8)
        # 2 start frames fit in the first latent frame: only it is known (0), the rest are generated (1)
        m = opts["concat_mask"]
        assert m.shape == (1, 1, 3, 6, 8) and not m[:, :, 0].any() and m[:, :, 1:].eq(1).all()
        assert opts["clip_vision_output"] == "cv"

    _, _, _ = WanImageToVideo().execute(pos, neg, vae, 64, 48, 9, 1)  # no image: plain empty latent
    p, _, _ = WanFirstLastFrameToVideo().execute(pos, neg, vae, 64, 48, 9, 1, start_image=start[:1],
                                                 end_image=start[1:])
    m = p[0][1]["concat_mask"]
    # 4 channels = the 4 pixel frames of each latent frame: frame 0 fills latent frame 0; the end image is the
    # last pixel frame, i.e. channel 3 of the last latent frame
    assert m.shape == (1, 4, 3, 6, 8)
    assert not m[:, :, 0].any() and m[:, :, 1].eq(1).all()
    assert m[:, :3, 2].eq(1).all() and not m[:, 3, 2].any()
