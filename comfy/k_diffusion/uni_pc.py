"""UniPC (Zhao et al. 2023): multistep predictor-corrector with the B(h) = h (bh1) or e^h - 1 (bh2) variants.

Runs as ComfyUI runs it: the VE latent is mapped to VP space (x / sqrt(1 + sigma^2)) with
alpha = 1/sqrt(1+sigma^2), sigma_vp = sigma/sqrt(1+sigma^2), lambda = -log(sigma); data prediction
(predict_x0), order min(3, steps - 1) with lower orders on the last steps, and a final sigma of 0
replaced by 0.001 (lambda must stay finite). Flow models go through the same mapping, as in ComfyUI.

No step reads a device value back: small constants are filled on the device rather than copied from the
host, and the order-2/3 coefficient systems are solved with `torch.linalg.solve_ex` (the same solver
without the singular-matrix check, which waits for the device every call).
"""

from __future__ import annotations

import torch
from tqdm.auto import trange


class _SigmaSchedule:
    """VP quantities of a VE sigma."""

    @staticmethod
    def log_alpha(sigma):
        return 0.5 * torch.log(1 / (sigma * sigma + 1))

    def alpha(self, sigma):
        return torch.exp(self.log_alpha(sigma))

    def std(self, sigma):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(sigma)))

    def lam(self, sigma):
        log_mean = self.log_alpha(sigma)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))
        return log_mean - log_std


def _weighted(coeffs, ds):
    """sum_k coeffs[k] * ds[k] over a list of latents."""
    return torch.tensordot(torch.stack(ds, dim=-1), coeffs.to(ds[0].dtype), dims=([-1], [0]))


class UniPC:
    def __init__(self, model, variant="bh1"):
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
        self.model = model  # x_ve, sigma[B] -> denoised
        self.variant = variant
        self.ns = _SigmaSchedule()

    def data_pred(self, x, t):
        # the eps round trip of ComfyUI's wrapper, kept for matching numerics
        sigma_in = t.expand(x.shape[0]) if t.ndim == 0 else t
        s = sigma_in.reshape(-1, *([1] * (x.ndim - 1)))
        x_in = x * ((s ** 2 + 1.0) ** 0.5)
        eps = (x_in - self.model(x_in, sigma_in)) / s
        return (x - self.ns.std(t) * eps) / self.ns.alpha(t)

    def update(self, x, model_prev_list, t_prev_list, t, order, use_corrector=True):
        ns = self.ns
        model_prev_0 = model_prev_list[-1]
        t_prev_0 = t_prev_list[-1]
        lambda_prev_0, lambda_t = ns.lam(t_prev_0), ns.lam(t)
        sigma_prev_0, sigma_t = ns.std(t_prev_0), ns.std(t)
        alpha_t = ns.alpha(t)
        h = lambda_t - lambda_prev_0

        rks, d1s = [], []
        for i in range(1, order):
            lambda_prev_i = ns.lam(t_prev_list[-(i + 1)])
            rk = (lambda_prev_i - lambda_prev_0) / h
            rks.append(rk)
            d1s.append((model_prev_list[-(i + 1)] - model_prev_0) / rk)
        rks.append(torch.ones_like(h))
        rks = torch.stack([torch.as_tensor(r, device=x.device) for r in rks])

        hh = -h  # data prediction integrates in -lambda
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        r_rows, b = [], []
        factorial_i = 1
        for i in range(1, order + 1):
            r_rows.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r_mat = torch.stack(r_rows)
        b = torch.stack([torch.as_tensor(v, device=x.device) for v in b])

        if d1s:
            rhos_p = torch.full((1,), 0.5, device=x.device) if order == 2 else \
                torch.linalg.solve_ex(r_mat[:-1, :-1], b[:-1])[0]
        if use_corrector:
            rhos_c = torch.full((1,), 0.5, device=x.device) if order == 1 else torch.linalg.solve_ex(r_mat, b)[0]

        x_t_ = sigma_t / sigma_prev_0 * x - alpha_t * h_phi_1 * model_prev_0
        pred_res = _weighted(rhos_p, d1s) if d1s else 0
        x_t = x_t_ - alpha_t * b_h * pred_res
        model_t = None
        if use_corrector:
            model_t = self.data_pred(x_t, t)
            corr_res = _weighted(rhos_c[:-1], d1s) if d1s else 0
            x_t = x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
        return x_t, model_t

    def sample(self, x, timesteps, order, lower_order_final=True, callback=None, disable=False):
        steps = len(timesteps) - 1
        t_0 = timesteps[0]
        t_prev_list = [t_0]
        model_prev_list = [self.data_pred(x, t_0)]
        for step in trange(1, steps + 1, disable=disable):
            t = timesteps[step]
            if step < order:
                step_order, use_corrector = step, True
            else:
                step_order = min(order, steps + 1 - step) if lower_order_final else order
                use_corrector = step != steps  # no model call at the final sigma
            x, model_x = self.update(x, model_prev_list, t_prev_list, t, step_order, use_corrector)
            if callback is not None:
                callback({"x": x, "i": step - 1, "sigma": timesteps[step - 1], "sigma_hat": timesteps[step - 1],
                          "denoised": model_prev_list[-1]})
            if step < steps and model_x is None:
                model_x = self.data_pred(x, t)
            t_prev_list.append(t)
            model_prev_list.append(model_x)
            if len(t_prev_list) > order:
                t_prev_list.pop(0)
                model_prev_list.pop(0)
        return x


@torch.no_grad()
def sample_unipc(model, noise, sigmas, extra_args=None, callback=None, disable=False, variant="bh1"):
    extra_args = {} if extra_args is None else extra_args
    timesteps = sigmas.clone()
    if sigmas[-1] == 0:  # the run's one read of a device value, before the first step
        timesteps[-1] = 0.001
    x = noise / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    order = min(3, len(timesteps) - 2)
    if order < 1:
        raise ValueError("uni_pc needs at least 2 steps")
    solver = UniPC(lambda inp, sigma: model(inp, sigma, **extra_args), variant=variant)
    x = solver.sample(x, timesteps, order=order, lower_order_final=True, callback=callback, disable=disable)
    return x / solver.ns.alpha(timesteps[-1])


@torch.no_grad()
def sample_unipc_bh2(model, noise, sigmas, extra_args=None, callback=None, disable=False):
    return sample_unipc(model, noise, sigmas, extra_args, callback, disable, variant="bh2")
