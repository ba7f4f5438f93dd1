"""Your own photographs end to end (issue 21): negatives (photos without any object), a held-out
split of a folder dataset, runs that start clean, thresholds calibrated on a few masks, predict's
masks from the segmentation head, and the class list carried by the labels file."""

from __future__ import annotations

import pytest
import torch

from wsss.config import load_config
from wsss.methods import build_method, build_network

METHOD_CONFIGS = ["cam_mit_tiny_synthetic", "afa_mit_tiny_synthetic", "aream_mit_tiny_synthetic",
                  "toco_vit_micro_synthetic"]


def _tiny(config: str, *extra: str):
    """A 6-class (5 + background) untrained network of ``config`` and its method, in eval mode."""
    over = ["data.num_classes=6", "par.num_iter=2", *extra]
    if "vit" in config:
        over.append("model.backbone_kwargs.img_size=64")
    cfg = load_config(config, over)
    torch.manual_seed(0)
    net = build_network(cfg, 5).eval()
    return cfg, net, build_method(cfg, net)


def _samples(labels: list[list[float]], size: tuple[int, int] = (64, 64)) -> list[dict]:
    """Evaluation samples (as a dataset yields them) with these image labels; a negative's mask is
    all background, a positive's has its first class in the centre."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, lab in enumerate(labels):
        h, w = size
        mask = torch.zeros(h, w, dtype=torch.long)
        if any(lab):
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1 + lab.index(1.0)
        out.append({"image": torch.rand(3, h, w, generator=g), "labels": torch.tensor(lab), "mask": mask,
                    "img_box": torch.tensor([0, h, 0, w]), "size": torch.tensor([h, w]), "name": f"im{i}"})
    return out


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_negative_alone_in_a_batch_is_all_background(config: str) -> None:
    """Problem 1: a photo without objects alone in its batch (batch_size 1) no longer stops the
    evaluation with an empty-tensor error: every map of it is background, the sweep runs, and a
    batch of a negative and a positive gives the negative the same maps as alone."""
    from wsss.engine.evaluate import evaluate, predict_maps

    _, net, method = _tiny(config)
    data = _samples([[0.0] * 5, [1.0, 0, 0, 0, 0], [0.0] * 5])
    res = evaluate(method, net, data, 6, torch.device("cpu"), scales=[1.0, 0.5], flip=True, sweep=True,
                   batch_size=1)
    assert set(method.map_names(net)) <= set(res) and "_sweep" in res
    image, labels = torch.stack([d["image"] for d in data]), torch.stack([d["labels"] for d in data])
    alone = predict_maps(method, net, image[:1], labels[:1], [1.0], True)
    mixed = predict_maps(method, net, image[:2], labels[:2], [1.0], True)
    for name, pred in alone.items():
        if name != "seg":
            assert int(pred.max()) == 0, name
            assert torch.equal(mixed[name][0], pred[0]), name
