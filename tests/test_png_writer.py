"""comfy/png_writer.py: the multi-threaded PNG encoder used by SaveImage / PreviewImage.

Every file is decoded by PIL and compared pixel for pixel, and its chunks are parsed and CRC-checked here
independently of the encoder."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from comfy import png_writer
from comfy.png_writer import encode_png, save_png

MODES = {"L": None, "RGB": 3, "RGBA": 4}


def parse_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk; checks the signature, lengths and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert len(payload) == length
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind!r} chunk at {pos}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    return chunks


def zlib_stream(data: bytes) -> bytes:
    idats = [p for k, p in parse_chunks(data) if k == b"IDAT"]
    return b"".join(idats)


def make_image(h: int, w: int, channels: int | None, kind: str, seed: int = 0) -> np.ndarray:
    shape = (h, w) if channels is None else (h, w, channels)
    if kind == "noise":
        return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    planes = [255.0 * xx / max(w - 1, 1), 255.0 * yy / max(h - 1, 1), 127.5 + 127.5 * np.sin((xx + yy) / 37.0),
              255.0 - 255.0 * xx / max(w - 1, 1)]
    if channels is None:
        return np.clip(planes[2], 0, 255).astype(np.uint8)
    return np.clip(np.stack(planes[:channels], -1), 0, 255).astype(np.uint8)


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (517, 1023)])
@pytest.mark.parametrize("kind", ["noise", "gradient"])
def test_roundtrip_pixels_exact(mode, size, kind):
    arr = make_image(*size, MODES[mode], kind)
    levels = (0, 1, 4, 9) if size != (517, 1023) or kind == "noise" else (0, 1, 4)
    for level in levels:
        for threads in (1, 3):
            data = encode_png(arr, compress_level=level, threads=threads)
            im = decode(data)
            assert im.mode == mode and im.size == (size[1], size[0])
            np.testing.assert_array_equal(np.asarray(im), arr, err_msg=f"level {level} threads {threads}")


def test_level9_split_gradient_roundtrip():
    arr = make_image(600, 700, 3, "gradient")  # 1.26 MB raw: split in bands even at level 9
    data = encode_png(arr, compress_level=9, threads=2)
    assert len([k for k, _ in parse_chunks(data) if k == b"IDAT"]) == 2
    np.testing.assert_array_equal(np.asarray(decode(data)), arr)


def test_ihdr_fields():
    for channels, colour_type in ((None, 0), (2, 4), (3, 2), (4, 6)):
        arr = make_image(5, 9, channels, "noise")
        ihdr = parse_chunks(encode_png(arr))[0][1]
        assert struct.unpack(">IIBBBBB", ihdr) == (9, 5, 8, colour_type, 0, 0, 0)
    la = make_image(5, 9, 2, "noise")
    np.testing.assert_array_equal(np.asarray(decode(encode_png(la))), la)
    np.testing.assert_array_equal(np.asarray(decode(encode_png(la[..., :1]))), la[..., 0])  # HxWx1 -> L


@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_split_stream_is_valid_zlib_of_filtered_rows(threads):
    h, w, c = 700, 640, 3  # 1.35 MB of filtered data: 1 band on one thread, up to 10 bands otherwise
    arr = make_image(h, w, c, "gradient")
    arr[::7] = make_image(h, w, c, "noise")[::7]
    data = encode_png(arr, compress_level=4, threads=threads)
    chunks = parse_chunks(data)
    n_idat = len([k for k, _ in chunks if k == b"IDAT"])
    assert n_idat == min(threads, h * (1 + w * c) // png_writer._MIN_CHUNK_BYTES)
    stream = zlib_stream(data)
    assert stream[:2] == b"\x78\x5e"  # zlib header: deflate, 32K window, FLEVEL 1 (levels 2..5)
    filtered = zlib.decompress(stream)  # also checks the Adler-32 trailer
    assert len(filtered) == h * (1 + w * c)
    # band-parallel filtering gives exactly the rows a single pass gives
    assert filtered == png_writer._filter_rows(arr.reshape(h, -1), 0, h, c).tobytes()
    assert zlib.adler32(filtered) == struct.unpack(">I", stream[-4:])[0]
    np.testing.assert_array_equal(np.asarray(decode(data)), arr)


def test_split_size_close_to_single_stream():
    arr = make_image(1024, 1024, 3, "gradient")
    one = len(encode_png(arr, compress_level=4, threads=1))
    several = len(encode_png(arr, compress_level=4, threads=4))
    assert several <= one * 1.01


@pytest.mark.parametrize("level,header", [(0, b"\x78\x01"), (1, b"\x78\x01"), (4, b"\x78\x5e"),
                                          (6, b"\x78\x9c"), (9, b"\x78\xda")])
def test_zlib_header_per_level(level, header):
    arr = make_image(520, 700, 3, "noise")  # split in two bands on two threads
    for threads in (1, 2):
        stream = zlib_stream(encode_png(arr, compress_level=level, threads=threads))
        assert stream[:2] == header
        assert len(zlib.decompress(stream)) == 520 * (1 + 700 * 3)
    if level == 0:  # stored: the stream is no smaller than the data
        assert len(stream) > 520 * (1 + 700 * 3)


def test_filters_all_types_used_and_decodable():
    arr = make_image(64, 64, 3, "gradient")
    arr[10:20] = make_image(10, 64, 3, "noise")
    arr[30:40, :, :] = arr[29:30, :, :]  # rows equal to the one above: Up wins
    arr[50:52, :, :] = 7  # flat rows: None or Sub
    filtered = zlib.decompress(zlib_stream(encode_png(arr, threads=1)))
    types = set(np.frombuffer(filtered, np.uint8).reshape(64, -1)[:, 0])
    assert types <= {0, 1, 2, 3, 4} and len(types) >= 3
    np.testing.assert_array_equal(np.asarray(decode(encode_png(arr))), arr)


def test_text_chunks_read_back_by_pil_in_order():
    text = {"prompt": '{"1": {"class_type": "SaveImage", "inputs": {}}}',
            "workflow": '{"nodes": [1], "title": "caf\u00e9"}',  # Latin-1 -> tEXt
            "note": "\u65e5\u672c\u8a9e \u2713",  # not Latin-1 -> iTXt, UTF-8
            "empty": ""}
    data = encode_png(make_image(4, 5, 3, "noise"), text=text)
    chunks = parse_chunks(data)
    text_chunks = [(k, p) for k, p in chunks if k in (b"tEXt", b"iTXt", b"zTXt")]
    assert [k for k, _ in text_chunks] == [b"tEXt", b"tEXt", b"iTXt", b"tEXt"]
    assert [p.split(b"\0", 1)[0].decode("latin-1") for _, p in text_chunks] == list(text)
    assert text_chunks[2][1] == b"note\0\0\0\0\0" + text["note"].encode("utf-8")
    kinds = [k for k, _ in chunks]
    assert kinds.index(b"iTXt") < kinds.index(b"IDAT")  # text before the image data, as PIL writes it
    im = decode(data)
    assert dict(im.text) == text
    assert all(im.info[k] == v for k, v in text.items())


def test_text_matches_pil_pnginfo_chunks():
    from PIL.PngImagePlugin import PngInfo

    text = {"prompt": '{"a": 1}', "workflow": "\u00fc", "x": "\u4e2d"}
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(make_image(3, 3, 3, "noise")).save(buf, "PNG", pnginfo=info)
    ours = [c for c in parse_chunks(encode_png(make_image(3, 3, 3, "noise"), text)) if c[0] in (b"tEXt", b"iTXt")]
    pil = [c for c in parse_chunks(buf.getvalue()) if c[0] in (b"tEXt", b"iTXt")]
    assert ours == pil


@pytest.mark.parametrize("key", ["", "x" * 80, " lead", "trail ", "two  spaces", "tab\tkey", "nul\0",
                                 "\u65e5"])
def test_bad_keywords_rejected(key):
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint8), {key: "v"})


def test_bad_inputs_rejected():
    with pytest.raises(TypeError):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((0, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint8), compress_level=10)
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint8), threads=0)
    with pytest.raises(ValueError):
        encode_png(np.zeros((2, 2), np.uint8), {"k": "a\0b"})


def test_non_contiguous_input():
    arr = make_image(40, 60, 4, "noise")
    view = arr[::2, ::3, 2::-1]  # strided, channels reversed
    np.testing.assert_array_equal(np.asarray(decode(encode_png(view))), view)


def test_adler32_combine():
    rng = np.random.default_rng(5)
    for n1, n2 in ((0, 5), (5, 0), (1, 1), (70000, 123457), (3, 1 << 20)):
        a, b = rng.bytes(n1), rng.bytes(n2)
        combined = png_writer._adler32_combine(zlib.adler32(a), zlib.adler32(b), n2)
        assert combined == zlib.adler32(a + b)


def test_size_close_to_pil_on_smooth_gradient():
    arr = make_image(1024, 1024, 3, "gradient")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=4)
    ours = len(encode_png(arr, compress_level=4, threads=2))
    assert abs(ours - len(buf.getvalue())) <= 0.10 * len(buf.getvalue())


def test_save_png_writes_file(tmp_path):
    arr = make_image(33, 17, 3, "gradient")
    path = tmp_path / "out.png"
    save_png(str(path), arr, {"prompt": "{}"}, compress_level=1)
    with Image.open(path) as im:
        assert im.text == {"prompt": "{}"}
        np.testing.assert_array_equal(np.asarray(im), arr)
    save_png(path, arr[..., 0])  # path-like, overwrite
    with Image.open(path) as im:
        assert im.mode == "L"


def test_concurrent_callers_share_the_pool():
    from concurrent.futures import ThreadPoolExecutor

    imgs = [make_image(520, 700, 3, "noise", seed=i) for i in range(4)]
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda a: encode_png(a, threads=2), imgs))
    for a, d in zip(imgs, outs):
        np.testing.assert_array_equal(np.asarray(decode(d)), a)


@pytest.mark.parametrize("block_bytes", [1, 100, 4096])
def test_many_small_bands_and_blocks(monkeypatch, block_bytes):
    """Tiny blocks (one row, a few rows) and many bands, so the 32 KiB priming context spans several
    blocks and bands hold fewer rows than the context: output must still decode and equal one stream."""
    monkeypatch.setattr(png_writer, "_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(png_writer, "_MIN_SPLIT_BYTES", 1)
    monkeypatch.setattr(png_writer, "_MIN_CHUNK_BYTES", 1)
    arr = make_image(90, 130, 3, "gradient")
    arr[::5] = make_image(90, 130, 3, "noise")[::5]
    for threads in (2, 7):
        data = encode_png(arr, compress_level=6, threads=threads)
        assert len([k for k, _ in parse_chunks(data) if k == b"IDAT"]) == threads
        np.testing.assert_array_equal(np.asarray(decode(data)), arr)
        filtered = zlib.decompress(zlib_stream(data))
        assert filtered == png_writer._filter_rows(arr.reshape(90, -1), 0, 90, 3).tobytes()
    one = encode_png(arr, compress_level=6, threads=1)
    assert zlib.decompress(zlib_stream(one)) == filtered


def test_call_from_a_pool_worker_does_not_deadlock():
    arr = make_image(520, 700, 3, "noise")
    pool = png_writer._get_pool(2)
    futures = [pool.submit(encode_png, arr, None, 1, 2) for _ in range(4)]
    for f in futures:
        np.testing.assert_array_equal(np.asarray(decode(f.result(timeout=60))), arr)


def test_save_image_keeps_the_image_when_a_metadata_key_is_not_a_png_keyword(tmp_path, monkeypatch):
    import json

    from PIL import Image

    import folder_paths
    import nodes

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    node = nodes.SaveImage()
    image = torch.rand(1, 8, 8, 3)
    res = node.save_images(image, "odd", prompt={"1": {}}, extra_pnginfo={"workflow": {"a": 1}, "x" * 100: 1,
                                                                           "caf\u00e9 \u2603": 2})
    path = tmp_path / res["ui"]["images"][0]["filename"]
    with Image.open(path) as im:
        assert json.loads(im.text["workflow"]) == {"a": 1} and "prompt" in im.text
        assert len(im.text) == 2


def _shared_encode_worker(rank, world, same):
    """Each rank encodes an image with the others (BandShare over gloo), counting the bands it compressed."""
    import torch.distributed as dist

    from comfy.png_writer import BandShare

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    compressed = []
    inner = png_writer._compress_band

    def counting(*a, **k):
        compressed.append(a[1])
        return inner(*a, **k)

    png_writer._compress_band = counting
    seed = 0 if same else rank + 1
    img = np.random.default_rng(seed).integers(0, 256, (512, 1024, 3), dtype=np.uint8)  # 1.5 MiB: split
    data = encode_png(img, {"prompt": "{}"}, compress_level=1, threads=2, share=BandShare(rank, world, gather))
    return data, img, len(compressed)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_holding_the_same_image_encode_it_together(world):
    from tests.parallel_helpers import run_on_ranks

    results = run_on_ranks(world, _shared_encode_worker, True)
    first = results[0][0]
    assert all(data == first for data, _, _ in results)  # every rank writes the same file
    decoded = np.asarray(Image.open(io.BytesIO(first)))
    assert np.array_equal(decoded, results[0][1])
    counts = [n for _, _, n in results]
    assert sum(counts) == 2 * world  # world * threads bands, each compressed by exactly one rank
    assert all(n == 2 for n in counts)


def test_ranks_with_different_images_each_encode_their_own():
    from tests.parallel_helpers import run_on_ranks

    for data, img, n in run_on_ranks(2, _shared_encode_worker, False):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), img)
        assert n == 2 + 4  # its share of the 4 bands, then (the CRCs differ) all 4 of its own image


def _save_image_on_rank(dm, out_root):
    """SaveImage as a rank of a multi-rank job runs it: the runtime installed, the same image everywhere."""
    import os

    import folder_paths
    import nodes
    from comfy.taco_dit.core import execution_engine

    execution_engine.install_runtime(dm, None, None)
    out = os.path.join(out_root, f"rank{dm.rank}")
    os.makedirs(out, exist_ok=True)
    folder_paths.set_output_directory(out)
    g = torch.Generator().manual_seed(7)
    images = torch.rand(1, 512, 1024, 3, generator=g)
    node = nodes.SaveImage()
    node.output_dir = out
    result = node.save_images(images, filename_prefix="shared", prompt={"1": {"class_type": "x"}})
    name = result["ui"]["images"][0]["filename"]
    with open(os.path.join(out, name), "rb") as f:
        data = f.read()
    expected = np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8)
    return data, expected


def test_save_image_in_a_multi_rank_job_encodes_on_every_rank_together(tmp_path):
    from tests.multirank_helpers import spawn

    results = spawn(2, _save_image_on_rank, str(tmp_path), timeout=30.0)
    (data0, expected), (data1, _) = results
    assert data0 == data1
    png = Image.open(io.BytesIO(data0))
    assert np.array_equal(np.asarray(png), expected)
    assert png.text["prompt"] == '{"1": {"class_type": "x"}}'  # the metadata chunk is kept
    # each band is one IDAT chunk: the ranks cut the image into world * threads bands (_MIN_CHUNK_BYTES at least)
    idat, pos = 0, 8
    while pos < len(data0):
        length, kind = struct.unpack(">I4s", data0[pos:pos + 8])
        idat += kind == b"IDAT"
        pos += 12 + length
    assert idat == min(2 * png_writer.default_threads(), 512 * (1024 * 3 + 1) // png_writer._MIN_CHUNK_BYTES)
