"""TorchCodec's CPU JPEG decode against today's `tensor` path (torchvision.io.decode_jpeg, pipeline/data/decode.py)
on the same images: pixels (against each other and against PIL, the reference) and speed per core, interleaved.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec; srcflow decodes with TorchCodec 0.17 since it
gave the same pixels at the same speed here (README "Benchmarks"; its image decoders need no FFmpeg).

    python benchmarks/torchcodec_decode.py [--images 48 --rounds 15]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.decode import adm_crop
from pipeline.data.tiny_imagenet import photo_like_jpeg


def variants(seed: int) -> dict[str, bytes]:
    """One photo-like image in the JPEG forms ImageNet holds: 4:2:0 q90 (most), 4:4:4, 4:2:2, progressive,
    grayscale, and a 1024x768 one."""
    base = photo_like_jpeg(seed)
    img = Image.open(io.BytesIO(base)).convert("RGB")
    out = {"q90_420_500x375": base}
    for name, image, kwargs in (("q95_444", img, dict(quality=95, subsampling=0)),
                                ("q75_422", img, dict(quality=75, subsampling=1)),
                                ("progressive", img, dict(quality=90, progressive=True)),
                                ("grayscale", img.convert("L"), dict(quality=90)),
                                ("q90_420_1024x768", img.resize((1024, 768), Image.BICUBIC), dict(quality=90))):
        buf = io.BytesIO()
        image.save(buf, "JPEG", **kwargs)
        out[name] = buf.getvalue()
    return out


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b, strict=True))


def rates(decoders: dict, data: list, rounds: int) -> dict:
    """images/s per decoder, the order alternating every round; and the ratio torchcodec / torchvision per round."""
    seen: dict[str, list[float]] = {name: [] for name in decoders}
    names = list(decoders)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for d in data:
                decoders[name](d)
            seen[name].append(len(data) / (time.perf_counter() - start))
    ratio = [a / b for a, b in zip(seen["torchcodec"], seen["torchvision"], strict=True)]
    return {"images_per_s_per_core": {k: round(statistics.median(v), 1) for k, v in seen.items()},
            "torchcodec_vs_torchvision_p25_p50_p75": [round(float(q), 3) for q in np.percentile(ratio, [25, 50, 75])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import torchcodec
    from torchcodec.decoders import decode_jpeg as torchcodec_decode
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode

    torch.set_num_threads(1)
    sets = [variants(seed) for seed in range(args.images)]
    decoders = {"torchvision": lambda d: torchvision_decode(d, mode=ImageReadMode.RGB),
                "torchcodec": lambda d: torchcodec_decode(d, mode="RGB")}
    result = {"torchcodec": torchcodec.__version__, "torch": torch.__version__, "threads": 1, "kinds": {}}
    for kind in sets[0]:
        jpegs = [s[kind] for s in sets]
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        pixels = {name: [f(d).permute(1, 2, 0).numpy() for d in data] for name, f in decoders.items()}
        reference = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
        result["kinds"][kind] = {
            "max_abs_diff": {"torchcodec_vs_torchvision": max_abs_diff(pixels["torchcodec"], pixels["torchvision"]),
                             "torchcodec_vs_pil": max_abs_diff(pixels["torchcodec"], reference),
                             "torchvision_vs_pil": max_abs_diff(pixels["torchvision"], reference)},
            **rates(decoders, data, args.rounds)}
    jpegs = [s["q90_420_500x375"] for s in sets]  # the whole `tensor` crop at 256 px with each decoder
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    crops = {name: {"crop": lambda d, f=f: adm_crop(f(d), 256)} for name, f in decoders.items()}
    same = all(np.array_equal(crops["torchvision"]["crop"](d).numpy(), crops["torchcodec"]["crop"](d).numpy())
               for d in data)
    result["tensor_crop_256"] = {"identical_crops": same,
                                 **rates({k: v["crop"] for k, v in crops.items()}, data, args.rounds)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
