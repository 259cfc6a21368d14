"""`encode.decode`: the tensor and nvjpeg paths against PIL's ADM crop, PIL's resampling arithmetic in torch, and
nvjpeg's CPU fallback (with an injected batch decoder: the CUDA part runs in benchmarks/gpu.sh)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.decode import (
    adm_crop,
    box_halve,
    decode_rgb,
    jpeg_header,
    nvjpeg_crops,
    nvjpeg_eligible,
    pil_bicubic_crop,
    pil_box_halve,
    pil_crop,
    pil_vertical_first,
    tensor_crop,
)
from pipeline.data.tiny_imagenet import photo_like_jpeg


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Photo-like 500x375 JPEGs at quality 90 (~100 KB, as ImageNet's)."""
    return [photo_like_jpeg(seed) for seed in range(6)]


def _jpeg(image: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _pil_pixels(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as img:
        return np.array(img.convert("RGB"))


def test_torchcodec_decodes_the_pixels_pil_decodes(photos):
    rgb = Image.fromarray(_pil_pixels(photos[0])[:120, :160])
    others = [_jpeg(rgb, progressive=True), _jpeg(rgb.convert("L")), _jpeg(rgb.convert("CMYK"))]
    for jpeg in [*photos, *others]:
        assert np.array_equal(decode_rgb(jpeg).permute(1, 2, 0).numpy(), _pil_pixels(jpeg))


def test_the_tensor_path_is_within_two_levels_of_pil_on_photo_like_jpegs(photos):
    d = np.stack([_levels(pil_crop(j, 256), tensor_crop(j, 256)) for j in photos])
    # measured: max 2, mean 0.004, 0.4% of the values differ (benchmarks/encode.py `decode.tensor.vs_pil`)
    assert d.max() <= 2 and (d > 0).mean() < 0.01 and d.mean() < 0.01, (d.max(), (d > 0).mean())


def test_the_tensor_path_on_the_tiny_set_and_on_large_and_portrait_images(tiny_root):
    tiny = sorted((tiny_root / "train").rglob("*.JPEG"))[:16]
    for path in tiny:
        jpeg = path.read_bytes()
        assert np.array_equal(tensor_crop(jpeg, 32), pil_crop(jpeg, 32))  # no resize: the very decode
        assert _levels(tensor_crop(jpeg, 24), pil_crop(jpeg, 24)).max() <= 2
    for size in ((1031, 777), (1100, 800), (375, 500)):  # BOX halvings (odd and even sides), portrait
        jpeg = photo_like_jpeg(7, *size)
        d = _levels(tensor_crop(jpeg, 256), pil_crop(jpeg, 256))
        assert d.max() <= 2 and (d > 0).mean() < 0.01, size


def test_box_halving_is_pils_bit_for_bit_in_either_pass_order():
    rng = np.random.default_rng(0)
    sizes = [(1031, 777), (1024, 768), (515, 512), (9, 7), (1000, 513), (30, 141), (206, 160), (163, 166)]
    orders = set()
    for w, h in sizes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((w // 2, h // 2), resample=Image.BOX))
        x = torch.from_numpy(pixels).permute(2, 0, 1)
        assert np.array_equal(pil_box_halve(x).permute(1, 2, 0).numpy(), expected), (w, h)
        assert np.array_equal(box_halve(x).permute(1, 2, 0).numpy(), expected), (w, h)
        orders.add(pil_vertical_first((w, h), (w // 2, h // 2), "box"))
    assert orders == {False, True}, "both of PIL's pass orders are exercised"


def test_the_bicubic_in_torch_is_pils_bit_for_bit_in_either_pass_order():
    rng = np.random.default_rng(1)
    orders = set()
    for _ in range(12):
        w, h = (int(v) for v in rng.integers(40, 260, 2))
        ow, oh = (max(1, int(v * rng.uniform(0.3, 1.3))) for v in (w, h))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((ow, oh), resample=Image.BICUBIC))
        side = min(ow, oh)
        top, left = (oh - side) // 2, (ow - side) // 2
        got = pil_bicubic_crop(torch.from_numpy(pixels).permute(2, 0, 1), (oh, ow), (top, left, side))
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected[top:top + side, left:left + side]), (w, h, ow, oh)
        orders.add(pil_vertical_first((w, h), (ow, oh), "bicubic"))
    assert orders == {False, True}


def test_the_gpu_crop_arithmetic_is_the_pil_crop_of_the_same_pixels():
    # nvjpeg's crop, run here on torchvision's CPU decode: PIL's ADM crop bit for bit (only nvjpeg's decode differs)
    for size, resolution in (((500, 375), 256), ((375, 500), 64), ((257, 999), 256), ((1031, 777), 256),
                             ((256, 300), 256), ((256, 256), 256)):
        jpeg = photo_like_jpeg(3, *size)
        exact = adm_crop(decode_rgb(jpeg), resolution, exact=True).numpy()
        assert np.array_equal(exact, pil_crop(jpeg, resolution)), size


def test_jpeg_header_names_the_frame_and_its_components(photos):
    rgb = Image.fromarray(_pil_pixels(photos[0])[:64, :64])
    cases = {
        _jpeg(rgb): (0xC0, 3), _jpeg(rgb, progressive=True): (0xC2, 3), _jpeg(rgb.convert("L")): (0xC0, 1),
        _jpeg(rgb.convert("CMYK")): (0xC0, 4),
    }
    for jpeg, expected in cases.items():
        assert jpeg_header(jpeg) == expected
    assert [nvjpeg_eligible(j) for j in cases] == [True, False, True, False]
    png = io.BytesIO()
    rgb.save(png, "PNG")
    for junk in (png.getvalue(), b"", b"\xff\xd8", _jpeg(rgb)[:20]):
        assert jpeg_header(junk) is None and not nvjpeg_eligible(junk)


def test_nvjpeg_sends_exactly_what_it_refuses_or_is_not_given_to_the_cpu_and_keeps_the_order(photos):
    base = [Image.fromarray(_pil_pixels(j)[:90 + 7 * i, :120]) for i, j in enumerate(photos)]
    jpegs = [_jpeg(im) for im in base]
    jpegs[4] = _jpeg(base[4], progressive=True)  # never handed to nvjpeg
    refused = {jpegs[1], jpegs[3]}  # nvjpeg raises on these (CMYK, a damaged stream, ...)
    gpu_calls, cpu_calls = [], []

    def gpu_decode(batch):
        gpu_calls.append(list(batch))
        if refused & set(batch):
            raise RuntimeError("nvjpeg: unsupported")
        return [decode_rgb(j) for j in batch]

    def cpu_decode(jpeg):
        cpu_calls.append(jpeg)
        return decode_rgb(jpeg)

    crops, on_cpu = nvjpeg_crops(jpegs, 64, "cpu", gpu_decode=gpu_decode, cpu_decode=cpu_decode)
    assert on_cpu == [1, 3, 4] and cpu_calls == [jpegs[1], jpegs[3], jpegs[4]]
    eligible = [j for i, j in enumerate(jpegs) if i != 4]
    assert gpu_calls[0] == eligible and all(jpegs[4] not in call for call in gpu_calls)  # one batch, then one by one
    assert gpu_calls[1:] == [[j] for j in eligible]
    # each image in its place, cropped in PIL's arithmetic: with libjpeg-turbo's decode, PIL's very crops
    expected = torch.from_numpy(np.stack([pil_crop(j, 64) for j in jpegs]))
    assert crops.shape == (6, 64, 64, 3) and torch.equal(crops, expected)

    gpu_calls.clear()
    crops, on_cpu = nvjpeg_crops(jpegs, 64, "cpu", gpu_decode=lambda b: gpu_calls.append(b) or
                                 [decode_rgb(j) for j in b])
    assert on_cpu == [4] and len(gpu_calls) == 1 and torch.equal(crops, expected)  # accepted: one batch call
