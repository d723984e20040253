"""Our own samplers with ComfyUI / k-diffusion numerics (`comfy.k_diffusion.sampling`)."""
