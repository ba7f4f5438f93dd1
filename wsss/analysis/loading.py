"""``wsss analyze``: loading a trained model and the dataset views it reads (batches of equal size,
a square-resized view)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from wsss.engine.evaluate import image_indices
from wsss.model import WSSSNet

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(source: str | Path, cfg: Any | None = None, device: str | torch.device = "cpu",
               ) -> tuple[WSSSNet, Any, list[str]]:
    """A trained model from a release dir (``model/``), a run dir or a checkpoint
    (:func:`wsss.api.hub.load_run`).

    cfg: a config to use for everything but the weights (data, method); by default the stored one.
    Returns ``(net in eval mode on device, cfg, class names with background first)``.
    """
    from wsss.engine.runs import load_run

    net, run_cfg, names = load_run(source)
    return net.to(device).eval(), (run_cfg if cfg is None else cfg), list(names)


# ---------------------------------------------------------------------------------------------
# Dataset pass
# ---------------------------------------------------------------------------------------------


def iter_batches(dataset: Any, max_images: int | None, batch_size: int) -> Iterator[list[dict]]:
    """Consecutive samples grouped into batches of equal image size (VOC images differ in size)."""
    group: list[dict] = []
    for idx in image_indices(dataset, max_images):
        sample = dataset[idx]
        if group and (len(group) == batch_size or group[0]["image"].shape != sample["image"].shape):
            yield group
            group = []
        group.append(sample)
    if group:
        yield group


class SquareResized:
    """A dataset view whose images are resized to ``size`` x ``size`` (bicubic, antialiased; masks
    nearest), aspect ratio distorted: the official offline-entropy pass (``docs/methods/aream.md`` 6.2:
    224 for
    MCTformer, 384 for Conformer). Other attributes come from the wrapped dataset."""

    def __init__(self, dataset: Any, size: int) -> None:
        if int(size) < 16:
            raise ValueError(f"resize must be >= 16 pixels, got {size}")
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = dict(self.dataset[idx])
        hw = (self.size, self.size)
        sample["image"] = F.interpolate(sample["image"][None], size=hw, mode="bicubic", antialias=True,
                                        align_corners=False)[0]
        if "mask" in sample:
            mask = sample["mask"][None, None].float()
            sample["mask"] = F.interpolate(mask, size=hw, mode="nearest")[0, 0].long()
        return sample

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "size"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)
