"""Helpers shared by node implementations (ComfyUI exposes this module under the same name; custom node
packs import `node_helpers.conditioning_set_values`)."""

from __future__ import annotations


def conditioning_set_values(conditioning, values: dict | None = None, append: bool = False):
    """A new CONDITIONING with `values` set (or, with append, list-appended) in every entry's options.

    The inputs are never mutated; the tensors are shared."""
    out = []
    for cond, extra in conditioning:
        extra = dict(extra)
        for k, v in (values or {}).items():
            extra[k] = list(extra.get(k) or []) + list(v) if append else v
        out.append([cond, extra])
    return out
