"""CPU cost of saving a PNG: PIL (`Image.save(..., compress_level=N)`, one core) vs comfy/png_writer.py
(numpy filtering + zlib deflate in row bands on a thread pool), plus the filter-choice measurement quoted
in png_writer's docstring (adaptive per-row choice vs a fixed Up or Paeth filter).

    python benchmarks/bench_png_writer.py [--image some_photo.jpg] [--repeat 7]

Times are the best of --repeat wall-clock runs; on a shared machine other load inflates them.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy import png_writer  # noqa: E402


def best_of(fn, repeat: int, clock=time.perf_counter):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        result = fn()
        best = min(best, clock() - t0)
    return best, result


def pil_png(img: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def test_images(extra: str | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float32)
    smooth = np.stack([127.5 + 127.5 * np.sin(xx / 97.0 + yy / 151.0), 255.0 * xx / 1024,
                       127.5 + 127.5 * np.cos(np.hypot(xx - 400, yy - 600) / 60.0)], -1)
    images = {
        "noise": rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8),
        "smooth": np.clip(smooth, 0, 255).astype(np.uint8),
        # a stand-in for rendered images: smooth content with fine grain
        "smooth+noise(sd 4)": np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8),
    }
    if extra:
        images[os.path.basename(extra)] = np.asarray(Image.open(extra).convert("RGB").resize((1024, 1024)))
    return images


def fixed_filter(raw: np.ndarray, bpp: int, kind: str) -> np.ndarray:
    """Every row with the same filter (Up or Paeth), for comparison with the adaptive choice."""
    h, n = raw.shape
    pad = np.zeros((h + 1, n + bpp), np.uint8)
    pad[1:, bpp:] = raw
    x, a, b, c = pad[1:, bpp:], pad[1:, :-bpp], pad[:-1, bpp:], pad[:-1, :-bpp]
    out = np.empty((h, n + 1), np.uint8)
    if kind == "up":
        out[:, 0] = 2
        np.subtract(x, b, out=out[:, 1:])
        return out
    p16 = pad.astype(np.int16)
    a16, b16, c16 = p16[1:, :-bpp], p16[:-1, bpp:], p16[:-1, :-bpp]
    pb, pa = np.abs(a16 - c16), np.abs(b16 - c16)
    pc = np.abs((a16 - c16) + (b16 - c16))
    mask_a = np.negative(((pa <= pb) & (pa <= pc)).view(np.uint8))
    mask_b = np.negative((pb <= pc).view(np.uint8))
    pred = ((b ^ c) & mask_b) ^ c
    pred ^= (a ^ pred) & mask_a
    out[:, 0] = 4
    np.subtract(x, pred, out=out[:, 1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", help="also measure this image (resized to 1024x1024 RGB)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    images = test_images(args.image)
    threads = sorted({1, 2, png_writer.default_threads()})
    print(f"cpu_count={os.cpu_count()} default threads={png_writer.default_threads()} "
          f"zlib {zlib.ZLIB_RUNTIME_VERSION}; best of {args.repeat}, 1024x1024x3")

    print("\n== save to bytes: PIL vs png_writer ==")
    for name, img in images.items():
        for level in (1, 4):
            t_pil, d_pil = best_of(lambda: pil_png(img, level), args.repeat)
            line = f"{name:>20} level {level}: PIL {t_pil * 1e3:6.1f} ms {len(d_pil):>8} B"
            for th in threads:
                t, d = best_of(lambda: png_writer.encode_png(img, compress_level=level, threads=th), args.repeat)
                line += f" | ours {th}t {t * 1e3:6.1f} ms {len(d):>8} B ({t_pil / t:.1f}x)"
            print(line)

    print("\n== filter choice (one thread, CPU time of this thread; size = one deflate stream, level 4) ==")
    for name, img in images.items():
        raw = img.reshape(img.shape[0], -1)
        line = f"{name:>20}:"
        for label, fn in (("adaptive", lambda: png_writer._filter_rows(raw, 0, raw.shape[0], 3)),
                          ("fixed up", lambda: fixed_filter(raw, 3, "up")),
                          ("fixed paeth", lambda: fixed_filter(raw, 3, "paeth"))):
            t, filtered = best_of(fn, args.repeat, time.thread_time)
            co = zlib.compressobj(4, zlib.DEFLATED, 15, 8, png_writer._STRATEGY)
            size = len(co.compress(filtered) + co.flush())
            line += f" | {label} {t * 1e3:5.1f} ms {size:>8} B"
        print(line)


if __name__ == "__main__":
    main()
