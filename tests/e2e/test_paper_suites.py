"""Every paper suite's whole wiring with `--smoke` on fabricated copies of its dataset in the
real on-disk format, end to end through `fct run` (real timm architectures, shrunk data).

Every backbone is a ResNet18 here (`--set defaults.model.arch`, and `--set
scenario.NAME.new.arch` for the two ImageNet scenarios that name ViT-S/16 and ConvNeXt-T): the
scenarios' wiring (losses, optimizers, class ranges, side-information, data sources) through
the same code at a third of the CPU time (the ImageNet suite trains 23 backbones; its ViT
scenario took 40 % of the run, 64 tokens at the smoke size). The architectures themselves,
ResNet50, ViT-S/16 and ConvNeXt-T at every smoke size a suite uses, are built, trained a step
and put through the cache and back by the last test below; a ViT runs whole suites in
tests/e2e/test_distributed.py (timm's test_vit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fabricate import (
    fabricate_cifar100,
    fabricate_imagenet,
    fabricate_places365,
    fabricate_vggface2,
)

from fct.cli import main
from fct.scenarios import load_suite


def fabricate(suite: str, root: Path) -> None:
    if suite == "cifar100":
        fabricate_cifar100(root / "cifar100", per_class=4)
    elif suite == "imagenet":
        fabricate_imagenet(root / "imagenet", synsets=12, per_class=4, size=40)
        fabricate_places365(root / "places365", categories=12, per_class=4, size=40)
    elif suite == "places365":
        fabricate_places365(root / "places365", categories=12, per_class=4, size=40)
    elif suite == "vggface2":
        fabricate_vggface2(root / "vggface2", train_ids=12, test_ids=10, per_id=4, size=40)


#: The scenarios whose new model names its own architecture (see the top of this file).
OWN_ARCH = {"imagenet": ("imagenet-r50-to-vit", "imagenet-r50-to-convnext")}


@pytest.mark.parametrize("suite", ["cifar100", "imagenet", "places365", "vggface2"])
def test_paper_suite_smoke_end_to_end(suite, tmp_path):
    data, out, cache = tmp_path / "data", tmp_path / "out", tmp_path / "cache"
    fabricate(suite, data)
    own = [
        x for n in OWN_ARCH.get(suite, ()) for x in ("--set", f'scenario.{n}.new.arch="resnet18"')
    ]
    code = main(
        [
            "run",
            suite,
            "--smoke",
            "--no-plots",  # the wiring: plots are tested on tiny and in the report tests
            "--set",
            'defaults.model.arch="resnet18"',  # see the top of this file
            *own,
            "--data-root",
            str(data),
            "--out",
            str(out),
            "--cache",
            str(cache),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    expected = {(sc.name, m) for sc in load_suite(suite).scenarios for m in sc.methods}
    found = set()
    for p in (out / "runs").glob("*/*.json"):
        rec = json.loads(p.read_text())
        found.add((rec["scenario"], rec["method"]))
        assert set(rec["cases"]) == {"old/old", "new/new", "cross"}
        assert rec["scenario_config"]["eval"]["max_per_class"] == 4
        config = rec["scenario_config"]
        archs = {config[role]["arch"] for role in ("old", "new", "side") if config.get(role)}
        assert archs == {"resnet18"}, (rec["scenario"], archs)
    assert found == expected
    board = (out / "leaderboard.md").read_text()
    assert "FCT" in board and "Independent" in board
    assert (out / "index.html").exists()
    assert not (out / "plots").exists()  # --no-plots reached the run's report


def test_every_architecture_of_every_paper_suite_builds_and_trains_at_its_smoke_size():
    """What the swap above leaves out: each (architecture, image size, stem, embedding) a
    paper suite's smoke run builds, built as the runner builds it (fct.models.EmbeddingModel,
    3 channels), trained one SGD step on a batch of 4, written in the cache's file format and
    read back into a new model that embeds alike."""
    import copy

    import safetensors.torch
    import torch

    from fct.models import EmbeddingModel
    from fct.suite_variants import smoke

    specs = {}
    for name in ("cifar100", "imagenet", "places365", "vggface2"):
        for sc in load_suite(name).scenarios:
            sc = smoke(sc)
            for spec in (sc.old, sc.new, sc.side, *sc.models):
                if spec is not None and spec.weights is None:
                    key = (spec.arch, spec.image_size, spec.small_stem, spec.embedding_dim)
                    specs.setdefault(key, spec)
    assert {"resnet50", "resnet18", "vit_small_patch16_224", "convnext_tiny"} == {
        k[0] for k in specs
    }
    for (arch, size, _, dim), spec in sorted(specs.items(), key=str):
        kwargs = dict(
            in_chans=3,
            image_size=size,
            embed_act=spec.embed_act,
            arch_args=dict(spec.arch_args),
            small_stem=spec.small_stem,
        )
        torch.manual_seed(0)
        model = EmbeddingModel(arch, dim, 10, **kwargs)
        x, y = torch.randn(4, 3, size, size), torch.arange(4)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        emb, logits = model(x)
        assert emb.shape == (4, dim) and logits.shape == (4, 10), arch
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
        model.eval()
        # Through the cache's file format (safetensors, contiguous CPU tensors) and back.
        stored = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
        loaded = copy.deepcopy(model)
        for value in loaded.state_dict().values():
            value.zero_()  # every weight and buffer must come from the stored bytes
        loaded.load_state_dict(safetensors.torch.load(stored))
        loaded.eval()
        with torch.no_grad():
            out = model.embed(x)
            assert torch.isfinite(out).all(), arch
            assert torch.equal(loaded.embed(x), out), arch
