"""GPU measurements behind docs/scale-out.md's GPU-hours table (run by bench/gpu_check.sh).

1. ResNet50-128 training steps at 224 px as the trainer runs them (bf16 autocast,
   channels_last, SGD, cross-entropy over 1000 classes): images per second.
2. The same model embedding images (inference, bf16): images per second (the backfill cost).
3. fct.retrieval.evaluate on 50,000 leave-one-out queries of 128-d on the GPU (torch backend):
   seconds, the ImageNet validation set's size.

Prints one JSON object. Usage: python bench/gpu_scale.py [--seconds S] [--batch B]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fct.models import EmbeddingModel
from fct.provenance import provenance
from fct.retrieval import FeatureSet, evaluate


def _rate(fn, items: int, seconds: float) -> float:
    """Items per second of ``fn`` after two warm-up calls, timed for about ``seconds``."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        torch.cuda.synchronize()
    return n * items / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    model = EmbeddingModel("resnet50", 128, 1000, in_chans=3, image_size=224)
    model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3e-5)
    x = torch.randn(args.batch, 3, 224, 224, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 1000, (args.batch,), device=dev)

    def train_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    train_rate = _rate(train_step, args.batch, args.seconds)

    @torch.inference_mode()
    def embed() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.embed(x)

    model.eval()
    embed_rate = _rate(embed, args.batch, args.seconds / 2)

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, 50_000)
    feats = (rng.normal(size=(1000, 128))[labels] + rng.normal(size=(50_000, 128))).astype(
        np.float32
    )
    fs = FeatureSet(feats, labels)
    evaluate(FeatureSet(feats[:2000], labels[:2000]), device="cuda")  # warm-up
    t0 = time.perf_counter()
    out = evaluate(fs, device="cuda")
    eval_s = time.perf_counter() - t0
    imagenet_train, imagenet_half = 1_281_167, 640_000
    print(
        json.dumps(
            {
                "resnet50_128_train_images_per_s": round(train_rate, 1),
                "resnet50_128_embed_images_per_s": round(embed_rate, 1),
                "batch": args.batch,
                "gpu_hours_100_epochs_imagenet_1k": round(
                    100 * imagenet_train / train_rate / 3600, 2
                ),
                "gpu_hours_100_epochs_imagenet_500": round(
                    100 * imagenet_half / train_rate / 3600, 2
                ),
                "evaluate_50k_loo_128d_seconds": round(eval_s, 2),
                "evaluate_values": {k: round(out[k], 3) for k in ("top1", "mAP", "mAP@R")},
                "provenance": provenance("cuda"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
