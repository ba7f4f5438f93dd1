"""Every method module can be removed: with one module of wsss/methods/ hidden from the import system
(as if its file were deleted), the package imports and each remaining method trains a step.

Each case runs in a fresh interpreter, where a ``sys.meta_path`` finder installed before wsss is imported
answers exactly that module's name with ``ModuleNotFoundError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHOD_MODULES = ("afa", "aream", "cam", "supervised", "toco")

# A tiny network per method, from the defaults (the shipped configs are loaded apart, in the child).
MIT_TINY = ["model.backbone=mit_tiny", "model.backbone_kwargs.strides=[4,2,1,1]",
            "model.backbone_kwargs.depths=[1,1,1,4]", "model.backbone_kwargs.drop_path_rate=0.0"]
COMMON = ["model.pretrained=null", "model.seg_head.embed_dim=16", "cam.scales=[1.0]", "par.num_iter=2",
          "optim.param_rules_args.norm=train"]
TINY = {
    "afa": [*MIT_TINY, "pseudo.warmup_iters=0", "afa.radius=3", "afa.crop_to_box=false"],
    "aream": [*MIT_TINY, "cam.fuse=aream", "aream.layer_index=2", "aream.warmup_iters=0",
              "aream.seg_weight=0.1", "aream.class_attention=false"],
    "cam": [*MIT_TINY, "pseudo.warmup_iters=0"],
    "supervised": MIT_TINY,
    "toco": ["model.backbone=vit_micro", "model.backbone_kwargs.img_size=64",
             "model.backbone_kwargs.patch_size=8", "toco.seg_start_iter=0", "toco.num_local_crops=2",
             "toco.local_crop_size=16", "toco.proj_dim=16", "toco.proj_hidden_dim=16",
             "toco.proj_bottleneck_dim=8"],
}

CHILD = r"""
import importlib.abc, json, math, sys

hidden, missing, tiny, common = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])


class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        # as if the file were not there (with ``missing``: as if a module it imports were not there)
        if fullname == f"wsss.methods.{hidden}":
            raise ModuleNotFoundError(f"No module named {missing or fullname!r}", name=missing or fullname)
        return None


sys.meta_path.insert(0, Hide())
import torch

torch.set_num_threads(1)
import wsss
import wsss.cli
from wsss.config import load_config
from wsss.methods import build_method, build_network, method_names

names = method_names()
assert hidden not in names, names
losses = {}
for name in names:
    torch.manual_seed(0)
    cfg = load_config(None, [f"method={name}", *common, *tiny[name]])
    net = build_network(cfg, 5)
    labels = torch.zeros(2, 5)
    labels[0, 1] = labels[1, 3] = 1
    batch = {"image": torch.rand(2, 3, 64, 64), "labels": labels,
             "img_box": torch.tensor([[0, 64, 0, 64], [8, 64, 0, 48]]),
             "mask": torch.randint(0, 6, (2, 64, 64))}
    loss, logs = build_method(cfg, net).training_step(net, batch, 1)
    loss.backward()
    grads = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
    assert math.isfinite(float(loss)) and grads > 0, (name, logs)
    losses[name] = sorted(logs)
# every shipped config of a remaining method loads; those of the hidden method are refused
for name, method in json.loads(sys.argv[5]).items():
    if method != hidden:
        load_config(name)
        continue
    try:
        load_config(name)
    except (KeyError, ValueError):
        continue
    raise AssertionError(f"{name} of the hidden method {hidden} loaded")
print(json.dumps(losses))
"""


def _shipped_methods() -> dict[str, str]:
    """Each shipped config's method, read with every method present."""
    from wsss.config import CONFIG_DIR, load_config

    return {p.stem: str(load_config(p.stem).method) for p in sorted(CONFIG_DIR.glob("[!_]*.yaml"))}


def _run(hidden: str, missing: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    args = [sys.executable, "-c", CHILD, hidden, missing, json.dumps(TINY), json.dumps(COMMON),
            json.dumps(_shipped_methods())]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("hidden", METHOD_MODULES)
def test_each_method_module_is_removable(hidden: str) -> None:
    assert sorted(p.stem for p in (ROOT / "wsss" / "methods").glob("*.py")
                  if p.stem not in ("__init__", "base")) == sorted(METHOD_MODULES)
    proc = _run(hidden)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(trained) == sorted(set(METHOD_MODULES) - {hidden})
    assert all("cls" in logs for logs in trained.values())


def test_a_missing_dependency_of_a_method_module_still_raises() -> None:
    """Only the module's own absence is skipped: a module that fails to import something it needs is
    an error."""
    proc = _run("aream", missing="some_dependency_of_aream")
    assert proc.returncode != 0 and "some_dependency_of_aream" in proc.stderr
