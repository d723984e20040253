"""Multi-threaded PNG encoder for 8-bit images (used by SaveImage / PreviewImage).

PIL encodes a PNG on one core: filtering and deflate run serially, which made saving a 1024x1024 image a
fixed cost in end-to-end latency. This encoder does the same work in row bands on a thread pool; numpy's
array loops and zlib's deflate both release the GIL, so the bands really run in parallel.

Layout of the output: signature, IHDR (bit depth 8, colour type 0/4/2/6 for 1/2/3/4 channels, no
interlace), one tEXt chunk per text item in the order given (iTXt, uncompressed UTF-8, when the value
is not Latin-1 encodable -- the same rule as PIL's ``PngInfo.add_text``), IDAT chunk(s), IEND.

Filtering (vectorised with numpy over blocks of rows, no per-pixel Python): every scanline gets
the filter among None/Sub/Up/Average/Paeth whose output has the smallest sum of absolute values read
as signed bytes (the usual adaptive heuristic). Rows are filtered in blocks of ~64 KiB with scratch
arrays reused between blocks (cache-resident, no page faults from fresh temporaries). Measured with
benchmarks/bench_png_writer.py on the 2-core dev machine, 1024x1024 RGB, one thread: the adaptive
choice costs ~7 ms of CPU, a fixed Paeth filter ~4 ms and a fixed Up filter ~0.2 ms, next to 25-110 ms
of deflate at level 4. Sizes at level 4 (adaptive / fixed Up / fixed Paeth): smooth synthetic gradient
425 / 402 / 425 KB, the same with fine noise (sd 4, like a rendered image) 1718 / 1792 / 1821 KB, a
photograph 1573 / 1786 / 1573 KB. Adaptive is kept: it is never much worse, while each fixed filter
loses 4-14 % on some content, and the few ms it costs (split over the threads) are small next to deflate.

Compression: the filtered rows are cut into bands of whole rows (about one per thread, at least
128 KiB each: 256 KiB bands left the 4 ranks of a 4-GPU job 3 bands each at 1024², so only 3 of their
threads compressed; 128 KiB bands change the size of a 1024² render by 0.03 %). Every band is compressed
independently as raw deflate (``zlib.compressobj(level, DEFLATED, -15)``); bands after the first are
primed with the previous 32 KiB of filtered data as ``zdict`` (each band filters the few rows of context
it needs itself, so bands do not wait for each other), so matches across a cut are still found: the
output is within ~0.1 % of a single stream. Every band but the last ends with ``Z_SYNC_FLUSH``
(byte-aligned, not final), the last with ``Z_FINISH``; the
concatenation is one valid deflate stream, wrapped with a 2-byte zlib header for the level and the
Adler-32 of all filtered data (per-band checksums combined arithmetically). Each band goes in its own
IDAT chunk. Images below 1 MiB of raw data, or ``threads=1``, are compressed as one zlib stream.
The deflate strategy is Z_FILTERED (PIL's sizes at levels >= 4 are only reproduced with it).

Shared encoding (`share`, a BandShare): in a multi-GPU job every rank holds the saved image, so SaveImage
lets them encode it together: each rank compresses its run of count * threads bands on its own threads,
one gather gives every rank all bands, and each assembles the same file (a CRC-32 of the image checks
first that they all hold the same one).

Speed (same benchmark, 1024x1024 RGB, best of 15 on a quiet 2-core machine; noise / smooth / smooth
with fine noise / a JPEG photograph resized to 1024x1024, passed with --image): level 4 -- PIL 103 / 55 /
162 / 118 ms, this encoder on one thread 58 / 42 / 114 / 92 ms, on two threads 30 / 22 / 61 / 48 ms
(2.5-3.4x PIL); level 1 (PreviewImage) --
PIL 95 / 37 / 88 / 66 ms, two threads 29 / 13 / 21 / 21 ms. Sizes are within 0.1 % of PIL's except on
the smooth+noise image, where this one is 4 % (level 4) and 3 % (level 1) smaller.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["encode_png", "save_png", "default_threads", "run_row_blocks", "BandShare"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)
_MIN_SPLIT_BYTES = 1 << 20  # raw images smaller than this are compressed as one stream
_MIN_CHUNK_BYTES = 128 << 10  # each parallel band holds at least this much filtered data
_WINDOW = 32 << 10  # deflate window: how much earlier data primes the next band
_BLOCK_BYTES = 64 << 10  # rows are filtered (and fed to deflate) in blocks of about this many bytes
_MAX_IDAT = 1 << 30  # split IDAT payloads above this (chunk lengths must stay below 2**31)
_ADLER_MOD = 65521
# Z_FILTERED (libpng's default for filtered data; PIL's sizes are only reproduced with it): at levels >= 4
# it drops short matches in favour of literals, which on filtered photos / noisy renders gave 5-10 %
# smaller files than the default strategy for ~55-60 % more deflate time; levels 1-3 ignore it
_STRATEGY = zlib.Z_FILTERED

_POOL_PREFIX = "png_writer"
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def default_threads() -> int:
    # 8: one process's threads share its GIL (the filter's numpy calls hold it between loops), so more of
    # them were slower, not faster: a 1024² SaveImage took ~100 ms on 32 threads against 44-62 ms on 8 (H200
    # host, 64 cores, calls s39 / s40). A multi-GPU job's ranks each bring their own 8.
    return min(8, os.cpu_count() or 1)


def run_row_blocks(height: int, work, threads: int | None = None, min_rows: int = 1) -> None:
    """work(r0, r1) over consecutive row blocks [r0, r1) covering [0, height), at most `threads` at a time on the
    shared pool (this thread takes the first block). For per-row passes whose loops release the GIL (numpy,
    torch), e.g. SaveImage's float -> uint8 step."""
    threads = default_threads() if threads is None else threads
    blocks = max(1, min(threads, height // max(1, min_rows)))
    edges = [height * i // blocks for i in range(blocks + 1)]
    if blocks == 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
        work(0, height)
        return
    futures = [_get_pool(blocks - 1).submit(work, edges[i], edges[i + 1]) for i in range(1, blocks)]
    work(edges[0], edges[1])
    for f in futures:
        f.result()


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The shared encoder pool, created on first use and grown if a call asks for more workers."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool_size = max(workers, default_threads())
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix=_POOL_PREFIX)
            if old is not None:
                old.shutdown(wait=False)
        return _pool


# ---------------------------------------------------------------------------------------------------
# chunks


def _chunk(kind: bytes, payload) -> list:
    """One PNG chunk as a list of buffers: length, type, payload, CRC-32 of type + payload."""
    crc = zlib.crc32(payload, zlib.crc32(kind))
    return [struct.pack(">I", len(payload)), kind, payload, struct.pack(">I", crc)]


def _keyword(key) -> bytes:
    """A tEXt/iTXt keyword: 1-79 printable Latin-1 bytes, no leading, trailing or doubled spaces."""
    if isinstance(key, str):
        try:
            kb = key.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"PNG text keyword must be Latin-1: {key!r}") from None
    elif isinstance(key, (bytes, bytearray)):
        kb = bytes(key)
    else:
        raise TypeError(f"PNG text keyword must be str, not {type(key).__name__}")
    if not 1 <= len(kb) <= 79:
        raise ValueError(f"PNG text keyword must be 1 to 79 bytes long: {key!r}")
    if any(not (32 <= ch <= 126 or 161 <= ch <= 255) for ch in kb):
        raise ValueError(f"PNG text keyword has a character outside printable Latin-1: {key!r}")
    if kb[0] == 32 or kb[-1] == 32 or b"  " in kb:
        raise ValueError(f"PNG text keyword has leading, trailing or consecutive spaces: {key!r}")
    return kb


def keyword_problem(key) -> str | None:
    """Why `key` cannot be a PNG text keyword, or None when it can."""
    try:
        _keyword(key)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _text_chunk(key, value) -> list:
    kb = _keyword(key)
    if isinstance(value, (bytes, bytearray)):
        vb = bytes(value)
        if b"\0" in vb:
            raise ValueError(f"PNG text value for {key!r} contains a NUL byte")
        return _chunk(b"tEXt", kb + b"\0" + vb)
    if not isinstance(value, str):
        raise TypeError(f"PNG text value for {key!r} must be str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"PNG text value for {key!r} contains a NUL character")
    try:
        return _chunk(b"tEXt", kb + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt: keyword NUL, compression flag 0, method 0, empty language tag NUL, empty translated
        # keyword NUL, then the UTF-8 text
        return _chunk(b"iTXt", kb + b"\0\0\0\0\0" + value.encode("utf-8"))


def _zlib_header(level: int) -> bytes:
    """CMF/FLG for a 32 KiB-window deflate stream, FLEVEL as zlib itself would write for `level`."""
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    cmf, flg = 0x78, flevel << 6
    flg |= (31 - ((cmf << 8) | flg) % 31) % 31
    return bytes((cmf, flg))


def _adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A+B from adler32(A), adler32(B) and len(B)."""
    a1, b1 = adler1 & 0xFFFF, adler1 >> 16
    a2, b2 = adler2 & 0xFFFF, adler2 >> 16
    a = (a1 + a2 - 1) % _ADLER_MOD
    b = (b1 + b2 + len2 * (a1 - 1)) % _ADLER_MOD
    return (b << 16) | a


# ---------------------------------------------------------------------------------------------------
# filtering


class _RowFilter:
    """PNG filtering of blocks of up to `max_rows` rows of a (H, W*C) uint8 image, with every scratch array
    allocated once and reused: fresh multi-MB temporaries per numpy op cost more in page faults than the
    arithmetic, and blocks of ~64 KiB keep the ~15 passes per block in the core's cache."""

    def __init__(self, raw: np.ndarray, bpp: int, max_rows: int):
        self.raw, self.bpp = raw, bpp
        m, n = max_rows, raw.shape[1]
        self.pad = np.zeros((m + 1, n + bpp), np.uint8)  # a prior row on top, bpp zero bytes on the left
        self.pad16 = np.zeros((m + 1, n + bpp), np.int16)
        self.cand = np.empty((4, m, n), np.uint8)  # Sub, Up, Average, Paeth (None is the row itself)
        self.dist = np.empty((3, m, n), np.int16)
        self.use = np.empty((3, m, n), np.bool_)
        self.tmp = np.empty((m, n), np.uint8)
        self.sum_dtype = np.uint32 if n < 1 << 24 else np.uint64  # row sums of values <= 128
        self.score = np.empty((5, m), self.sum_dtype)
        self.out = np.empty((m, n + 1), np.uint8)

    def filter(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 filtered, as (r1 - r0, 1 + W*C): the filter type byte, then the filtered bytes.
        Row r0 - 1 (when r0 > 0) is the prior row. The result is a view, valid until the next call."""
        raw, bpp, h = self.raw, self.bpp, r1 - r0
        pad = self.pad[:h + 1]
        if r0 > 0:
            pad[0, bpp:] = raw[r0 - 1]
        else:
            pad[0, bpp:] = 0
        pad[1:, bpp:] = raw[r0:r1]
        # neighbours as views, with the PNG spec's names: x current byte, a left, b above, c above-left
        x, a, b, c = pad[1:, bpp:], pad[1:, :-bpp], pad[:-1, bpp:], pad[:-1, :-bpp]
        sub, up, avg, paeth = (cand[:h] for cand in self.cand)
        tmp = self.tmp[:h]

        np.subtract(x, a, out=sub)
        np.subtract(x, b, out=up)
        np.bitwise_xor(a, b, out=avg)  # floor((a + b) / 2) in bytes: ((a ^ b) >> 1) + (a & b)
        np.right_shift(avg, 1, out=avg)
        np.bitwise_and(a, b, out=tmp)
        avg += tmp
        np.subtract(x, avg, out=avg)

        # Paeth: p = a + b - c; pa = |p - a| = |b - c|, pb = |p - b| = |a - c|, pc = |p - c| = |(a-c) + (b-c)|;
        # predict a if pa <= pb and pa <= pc, else b if pb <= pc, else c. The distances need 9 bits (int16);
        # the choice is applied with 0x00/0xFF byte masks, much faster than numpy's masked copies
        p16 = self.pad16[:h + 1]
        np.copyto(p16, pad)
        a16, b16, c16 = p16[1:, :-bpp], p16[:-1, bpp:], p16[:-1, :-bpp]
        pa, pb, pc = (d[:h] for d in self.dist)
        np.subtract(b16, c16, out=pa)
        np.subtract(a16, c16, out=pb)
        np.add(pa, pb, out=pc)
        np.abs(pa, out=pa)
        np.abs(pb, out=pb)
        np.abs(pc, out=pc)
        use_a, use_b, cmp = (u[:h] for u in self.use)
        np.less_equal(pa, pb, out=use_a)
        np.less_equal(pa, pc, out=cmp)
        use_a &= cmp
        np.less_equal(pb, pc, out=use_b)
        mask_a, mask_b = use_a.view(np.uint8), use_b.view(np.uint8)
        np.negative(mask_a, out=mask_a)  # 1 -> 0xFF (the bool arrays are only read as bytes from here on)
        np.negative(mask_b, out=mask_b)
        np.bitwise_xor(b, c, out=paeth)  # c, or b where mask_b ...
        paeth &= mask_b
        paeth ^= c
        np.bitwise_xor(a, paeth, out=tmp)  # ... then a where mask_a
        tmp &= mask_a
        paeth ^= tmp
        np.subtract(x, paeth, out=paeth)

        # score: sum over the row of |byte| read as a signed byte, i.e. min(v, 256 - v)
        score = self.score[:, :h]
        for k, f in enumerate((x, sub, up, avg, paeth)):
            np.negative(f, out=tmp)
            np.minimum(f, tmp, out=tmp)
            np.sum(tmp, axis=1, dtype=self.sum_dtype, out=score[k])
        choice = np.argmin(score, axis=0)  # ties go to the lower filter type, None first

        out = self.out[:h]
        out[:, 0] = choice
        out[:, 1:] = x
        rows = np.nonzero(choice)[0]
        if len(rows):
            out[rows, 1:] = self.cand[choice[rows] - 1, rows]
        return out


def _block_rows(row_len: int) -> int:
    return max(1, _BLOCK_BYTES // row_len)


def _filter_rows(raw: np.ndarray, r0: int, r1: int, bpp: int) -> np.ndarray:
    """Rows r0..r1 of `raw` (H, W*C uint8) filtered, as a new (r1 - r0, 1 + W*C) array."""
    out = np.empty((r1 - r0, raw.shape[1] + 1), np.uint8)
    step = _block_rows(out.shape[1])
    filt = _RowFilter(raw, bpp, min(step, r1 - r0))
    for s in range(r0, r1, step):
        e = min(s + step, r1)
        out[s - r0:e - r0] = filt.filter(s, e)
    return out


# ---------------------------------------------------------------------------------------------------
# encoding


def _compress_band(raw: np.ndarray, r0: int, r1: int, bpp: int, level: int, last: bool, wrap: bool = False):
    """Filter rows r0..r1 block by block and deflate them. wrap: one whole zlib stream (header and
    Adler-32 included; only for r0 == 0 and last). Otherwise raw deflate, primed with the 32 KiB of
    filtered data before r0, ending with a sync flush unless `last`.
    Returns (compressed bytes, adler32 of the filtered rows, their length)."""
    row_len = raw.shape[1] + 1
    step = _block_rows(row_len)
    ctx_rows = min(r0, math.ceil(_WINDOW / row_len))
    filt = _RowFilter(raw, bpp, max(min(step, r1 - r0), ctx_rows))
    if wrap:
        co = zlib.compressobj(level, zlib.DEFLATED, 15, 8, _STRATEGY)
    elif ctx_rows:
        context = filt.filter(r0 - ctx_rows, r0).reshape(-1)[-_WINDOW:].tobytes()
        co = zlib.compressobj(level, zlib.DEFLATED, -15, 8, _STRATEGY, zdict=context)
    else:
        co = zlib.compressobj(level, zlib.DEFLATED, -15, 8, _STRATEGY)
    parts, adler = [], 1
    for s in range(r0, r1, step):
        block = filt.filter(s, min(s + step, r1))
        adler = zlib.adler32(block, adler)
        parts.append(co.compress(block))
    parts.append(co.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH))
    return b"".join(parts), adler, (r1 - r0) * row_len


def _check_array(arr) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"encode_png needs a uint8 array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] not in _COLOUR_TYPES:
        raise ValueError(f"encode_png supports 1 to 4 channels, got shape {arr.shape}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"encode_png needs an HxW or HxWxC array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[0] >= 2**31 or arr.shape[1] >= 2**31:
        raise ValueError(f"PNG width and height must be in 1..2**31-1, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


class BandShare:
    """Processes that encode the same image together (the ranks of a multi-GPU job, each holding the image):
    process `index` of `count` compresses its share of the bands, and `all_gather(obj)` returns every
    process's `obj`, in index order (a collective: every process must call it)."""

    def __init__(self, index: int, count: int, all_gather):
        self.index, self.count, self.all_gather = index, count, all_gather


def _compress_bands(args: list) -> list:
    """_compress_band over each argument tuple, on the shared pool; results in order."""
    if len(args) <= 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
        return [_compress_band(*a) for a in args]  # from a pool worker, waiting on the pool could deadlock
    futures = [_get_pool(len(args) - 1).submit(_compress_band, *a) for a in args[1:]]
    return [_compress_band(*args[0])] + [f.result() for f in futures]  # this thread takes the first band


def _shared_bands(raw: np.ndarray, args: list, share: BandShare) -> list:
    """Every band's result, each process compressing a contiguous run of them; the processes check first
    that they hold the same image (CRC-32 of its bytes), else each compresses all bands itself."""
    n = len(args)
    mine = [i for i in range(n) if i * share.count // n == share.index]
    crc = _get_pool(len(mine) + 1).submit(zlib.crc32, raw)  # beside this process's bands (zlib drops the GIL)
    parts = _compress_bands([args[i] for i in mine])
    crc = crc.result()
    gathered = share.all_gather((crc, mine, parts))
    if any(g[0] != crc for g in gathered):
        logging.warning("PNG encode shared over %d processes: their images differ; each encodes its own",
                        share.count)
        return _compress_bands(args)
    results: list = [None] * n
    for _, indices, parts in gathered:
        for i, part in zip(indices, parts):
            results[i] = part
    return results


def encode_png(arr: np.ndarray, text: dict[str, str] | None = None, compress_level: int = 4,
               threads: int | None = None, share: BandShare | None = None) -> bytes:
    """Encode a uint8 HxW (L), HxWx2 (LA), HxWx3 (RGB) or HxWx4 (RGBA) array as PNG bytes.

    `text` items become tEXt chunks (iTXt when a value is not Latin-1 encodable), in order.
    `compress_level` is zlib's 0 (stored) .. 9, as in PIL; -1 means zlib's default (6).
    `threads` bounds how many bands are filtered and compressed in parallel (default: min(8, CPUs)).
    `share`: other processes holding the same image encode it together with this one (BandShare): each
    compresses `threads` bands of count * threads, and every process returns the same bytes. The cut into
    bands is the only difference to a single process's encode (the same pixels, sizes within ~0.1 %)."""
    arr = _check_array(arr)
    if compress_level == -1:
        compress_level = 6
    if not isinstance(compress_level, (int, np.integer)) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 0..9, got {compress_level!r}")
    level = int(compress_level)
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    height, width = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    raw = arr.reshape(height, width * channels)
    row_len = width * channels + 1

    parts = [PNG_SIGNATURE]
    parts += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0))
    for key, value in (text or {}).items():
        parts += _text_chunk(key, value)

    total = height * row_len
    shared = share is not None and share.count > 1 and total >= _MIN_SPLIT_BYTES
    bands = 1
    if shared or (threads > 1 and total >= _MIN_SPLIT_BYTES):
        bands = max(1, min(threads * (share.count if shared else 1), total // _MIN_CHUNK_BYTES, height))
    if bands == 1:
        pieces = [_compress_band(raw, 0, height, channels, level, True, wrap=True)[0]]
    else:
        edges = [height * i // bands for i in range(bands + 1)]
        args = [(raw, edges[i], edges[i + 1], channels, level, i == bands - 1) for i in range(bands)]
        results = _shared_bands(raw, args, share) if shared else _compress_bands(args)
        adler = 1
        for _, band_adler, band_len in results:
            adler = _adler32_combine(adler, band_adler, band_len)
        pieces = [_zlib_header(level) + results[0][0]] + [r[0] for r in results[1:-1]]
        pieces.append(results[-1][0] + struct.pack(">I", adler))
    for piece in pieces:
        for off in range(0, len(piece), _MAX_IDAT):
            parts += _chunk(b"IDAT", piece[off:off + _MAX_IDAT] if len(piece) > _MAX_IDAT else piece)
    parts += _chunk(b"IEND", b"")
    return b"".join(parts)


def save_png(path, arr: np.ndarray, text: dict[str, str] | None = None, compress_level: int = 4,
             threads: int | None = None, share: BandShare | None = None) -> None:
    """Encode `arr` (see encode_png) and write it to `path`. The file is opened only once the whole PNG
    is encoded, so a failed encode leaves no partial file."""
    data = encode_png(arr, text, compress_level, threads, share)
    with open(path, "wb") as f:
        f.write(data)

