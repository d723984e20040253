"""Model-sampling override nodes: ModelSamplingFlux / SD3 / AuraFlow / Discrete patch a MODEL clone's
`model_sampling` object (shift, multiplier, prediction type); the weights are shared."""

from __future__ import annotations

import comfy.model_sampling as ms

MAX_RESOLUTION = 16384


def _patched(model, schedule_cls, prediction_cls, **params):
    m = model.clone()
    sampling = ms.make_model_sampling(schedule_cls, prediction_cls, getattr(model.model, "model_config", None))
    sampling.set_parameters(**params)
    m.add_object_patch("model_sampling", sampling)
    return (m,)


class ModelSamplingFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01}),
                             "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01}),
                             "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
                             "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 8})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, max_shift, base_shift, width, height):
        # mu is linear in the number of 2x2 latent patches, from base_shift at 256 to max_shift at 4096
        mm = (max_shift - base_shift) / (4096 - 256)
        b = base_shift - mm * 256
        shift = (width * height / (8 * 8 * 2 * 2)) * mm + b
        return _patched(model, ms.ModelSamplingFlux, ms.CONST, shift=shift)


class ModelSamplingSD3:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, shift, multiplier=1000):
        return _patched(model, ms.ModelSamplingDiscreteFlow, ms.CONST, shift=shift, multiplier=multiplier)


class ModelSamplingAuraFlow(ModelSamplingSD3):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "shift": ("FLOAT", {"default": 1.73, "min": 0.0, "max": 100.0, "step": 0.01})}}

    FUNCTION = "patch_aura"

    def patch_aura(self, model, shift):
        return self.patch(model, shift, multiplier=1.0)


class ModelSamplingDiscrete:
    _TYPES = {"eps": ms.EPS, "v_prediction": ms.V_PREDICTION, "x0": ms.X0}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "sampling": (list(cls._TYPES),),
                             "zsnr": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"

    def patch(self, model, sampling, zsnr):
        m = model.clone()
        cls = type("ModelSamplingAdvanced", (ms.ModelSamplingDiscrete, self._TYPES[sampling]), {})
        m.add_object_patch("model_sampling", cls(getattr(model.model, "model_config", None), zsnr=zsnr))
        return (m,)


NODE_CLASS_MAPPINGS = {
    "ModelSamplingFlux": ModelSamplingFlux,
    "ModelSamplingSD3": ModelSamplingSD3,
    "ModelSamplingAuraFlow": ModelSamplingAuraFlow,
    "ModelSamplingDiscrete": ModelSamplingDiscrete,
}
