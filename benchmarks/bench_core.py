"""Benchmark of the refinement stage against a per-image implementation in the official style.

Sizes are those of official AFA training: batch 2, crop 512, 21 classes (20 foreground, 1-3 present per
image). Operations:

- ``par``: PAR on the two background stacks at half resolution (256x256), kernel + 10 iterations.
  Reference: per image and per stack one PAR call on the present channels, PAR gathering all 48
  neighbours with a one-hot dilated conv into a (1, c, 48, H, W) tensor (as ``wetr/PAR.py``).
- ``pseudo_label``: the whole ``refine_cams_with_bkg_v2`` (downsample, softmax over present classes,
  PAR, upsample, argmax, combine, box) vs :func:`wsss.refine.par_pseudo_label`.
- ``window_mask_32`` / ``window_mask_48``: radius-8 square mask; reference = Python double loop into a
  float64 numpy array (``get_mask_by_radius``); wsss = broadcasting (cache cleared before each run).
- ``propagation``: 48x48 grid (N = 2304) with the radius-8 mask, bkg 0.35; reference = per-image loop
  with numpy-mask indexing and the per-image class subset; wsss = :func:`propagate_affinity`.
- ``affinity_labels``: 512x512 labels -> 32x32 tokens with the radius-8 mask; reference = the official
  per-sample loop with numpy-mask indexing; wsss = :func:`affinity_labels`.

Each (operation, implementation) runs in a fresh subprocess that builds only that case's inputs.
Time: median of 3 runs after one warm-up run (PAR cases: 2 runs, no warm-up, as one run takes
seconds; ``--quick``: 1 run). Memory: peak growth from just before the first run (inputs built) to the
end: on CPU the kernel's peak resident set size of the process (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the first run) minus the resident size at that moment, with
``MALLOC_MMAP_THRESHOLD_`` fixed so that freed large blocks go back to the OS and the RSS follows the
live tensors; on CUDA the growth of ``torch.cuda.max_memory_allocated``. Outputs are saved and
compared (max abs difference; for label maps and masks, the number of differing entries).

Usage: ``python benchmarks/bench_core.py [--quick] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

B, S, K, RADIUS = 2, 512, 20, 8
CASES = ("par", "pseudo_label", "window_mask_32", "window_mask_48", "propagation", "affinity_labels")
DEFAULT_CASES = ("par", "window_mask_32", "window_mask_48", "propagation", "affinity_labels")
SLOW = ("par", "pseudo_label")  # seconds per run: no warm-up run, fewer repeats


# ------------------------------------------------------------------------- official-style reference


class RefPAR(torch.nn.Module):
    """PAR as structured in the official code: one-hot conv gather of all 48 neighbours."""

    def __init__(self, dilations=(1, 2, 4, 8, 12, 24), num_iter=10):
        super().__init__()
        self.dilations, self.num_iter = dilations, num_iter
        onehot = torch.zeros(8, 1, 3, 3)
        for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
            onehot[i, 0, r, c] = 1
        self.register_buffer("onehot", onehot)
        ring = [math.sqrt(2), 1, math.sqrt(2), 1, 1, math.sqrt(2), 1, math.sqrt(2)]
        self.pos = torch.tensor([v * d for d in dilations for v in ring]).view(1, 1, -1, 1, 1)

    def gather(self, x):
        b, c, h, w = x.shape
        out = []
        for d in self.dilations:
            xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
            out.append(F.conv2d(xp, self.onehot, dilation=d).view(b, c, -1, h, w))
        return torch.cat(out, dim=2)

    def forward(self, imgs, masks):
        masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
        b, _, h, w = imgs.shape
        nb = self.gather(imgs)
        pos = self.pos.to(imgs.device).repeat(b, 1, 1, h, w)
        diff = (nb - imgs.unsqueeze(2).repeat(1, 1, nb.shape[2], 1, 1)).abs()
        aff = -(diff / (nb.std(dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        pos_aff = -(pos / (pos.std(dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
        aff = aff.softmax(dim=2) + 0.01 * pos_aff.softmax(dim=2)
        for _ in range(self.num_iter):
            masks = (self.gather(masks) * aff).sum(2)
        return masks


def ref_window_mask(h, w, radius):
    mask = np.zeros((h * w, h * w))
    for i in range(h * w):
        r, c = divmod(i, w)
        for dr in range(-radius, radius + 1):
            for dc in range(-radius, radius + 1):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w:
                    mask[i, rr * w + cc] = 1
    return mask


def ref_par_stacks(par, img_s, stacks, labels):
    """Per image and stack: subset softmax and one PAR call. Returns a list of (c_i, h, w) per call."""
    keys = torch.cat([torch.ones(B, 1, device=labels.device), labels], dim=1)
    out = []
    for i in range(B):
        key = torch.nonzero(keys[i])[:, 0]
        for st in stacks:
            out.append(par(img_s[[i]], st[[i]][:, key].softmax(dim=1))[0])
    return out


def ref_pseudo_label(par, img, cam, labels, box):
    b, _, h, w = img.shape
    img_s = F.interpolate(img, size=[h // 2, w // 2], mode="bilinear", align_corners=False)
    keys = torch.cat([torch.ones(b, 1, device=img.device), labels], dim=1)
    labs = []
    for s in (0.55, 0.35):
        st = torch.cat([torch.full((b, 1, h, w), s, device=img.device), cam], dim=1)
        st = F.interpolate(st, size=[h // 2, w // 2], mode="bilinear", align_corners=False)
        lab = torch.full((b, h, w), 255, dtype=torch.long, device=img.device)
        for i in range(b):
            key = torch.nonzero(keys[i])[:, 0]
            ref = par(img_s[[i]], st[[i]][:, key].softmax(dim=1))
            ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)
            r0, r1, c0, c1 = box[i].tolist()
            lab[i, r0:r1, c0:c1] = key[ref.argmax(dim=1)][0, r0:r1, c0:c1]
        labs.append(lab)
    lh, ll = labs
    out = lh.clone()
    out[lh == 0] = 255
    out[(lh + ll) == 0] = 0
    return out


def ref_propagation(cam, aff, mask, labels, bkg_score):
    b, _, h, w = cam.shape
    st = torch.cat([torch.full((b, 1, h, w), bkg_score, device=cam.device), cam], dim=1)
    keys = torch.cat([torch.ones(b, 1, device=cam.device), labels], dim=1)
    out = torch.zeros_like(st)
    for i in range(b):
        aff[i, torch.from_numpy(mask == 0)] = 0
    aff = aff ** 2
    aff = aff / (aff.sum(dim=1, keepdim=True) + 0.1)
    c = st.shape[1]
    for i in range(b):
        key = torch.nonzero(keys[i])[:, 0]
        p = st[i].reshape(c, -1)[key].softmax(dim=0)
        out[i, key] = (p @ aff[i]).reshape(-1, h, w)
    return out


def ref_affinity_labels(label, mask):
    b, h, w = label.shape
    tok = F.interpolate(label.unsqueeze(1).float(), size=[h // 16, w // 16], mode="nearest").reshape(b, 1, -1)
    rep = tok.repeat([1, tok.shape[-1], 1])
    aff = (rep == rep.permute(0, 2, 1)).long()
    for i in range(b):
        aff[i, torch.from_numpy(mask == 0)] = 255
        aff[i, :, rep[i, 0] == 255] = 255
        aff[i, rep[i, 0] == 255, :] = 255
    return aff


# ------------------------------------------------------------------------------------------ cases


def make_inputs(case, device):
    """Only the inputs the case needs (so that no large temporaries precede the memory baseline)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(B, K)
    for i, n in enumerate((2, 3)):
        labels[i, torch.randperm(K, generator=gen)[:n]] = 1
    t = {"labels": labels}
    if case in ("par", "pseudo_label"):
        t["img"] = torch.rand(B, 3, S, S, generator=gen)
        t["cam"] = torch.rand(B, K, S, S, generator=gen)
        t["box"] = torch.tensor([[0, S, 0, S], [40, S, 0, 480]])
    elif case == "propagation":
        t["aff"] = torch.rand(B, 48 * 48, 48 * 48, generator=gen)
        t["cam48"] = torch.rand(B, K, 48, 48, generator=gen)
    elif case == "affinity_labels":
        label = torch.randint(0, 4, (B, S, S), generator=gen)
        t["label"] = label.masked_fill_(label == 3, 255)
    return {k: v.to(device) for k, v in t.items()}


def build(case, impl, x):
    """Returns a zero-argument callable running the operation, and whether its output is a label map."""
    import wsss.refine as R
    from wsss.refine import propagation as P

    dev = x["labels"].device
    if case in ("par", "pseudo_label"):
        par = (RefPAR() if impl == "ref" else R.PAR()).to(dev)
    if case == "par":
        img_s = F.interpolate(x["img"], size=[S // 2, S // 2], mode="bilinear", align_corners=False)
        cam_s = F.interpolate(x["cam"], size=[S // 2, S // 2], mode="bilinear", align_corners=False)
        stacks = [torch.cat([torch.full_like(cam_s[:, :1], s), cam_s], 1) for s in (0.55, 0.35)]
        if impl == "ref":
            return lambda: torch.cat([o.flatten() for o in ref_par_stacks(par, img_s, stacks, x["labels"])])

        def run_wsss():
            keep = torch.cat([torch.ones_like(x["labels"][:, :1]), x["labels"]], 1) > 0
            idx = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, : int(keep.sum(1).max())]
            # same compact layout par_pseudo_label builds internally
            gidx = idx[:, :, None, None].expand(-1, -1, S // 2, S // 2)
            st = [R.masked_softmax(s, x["labels"]).gather(1, gidx) for s in stacks]
            out = par(img_s, torch.cat(st, dim=1))
            n = keep.sum(1).tolist()
            m = idx.shape[1]
            return torch.cat([out[i, j * m : j * m + n[i]].flatten() for i in range(B) for j in range(2)])

        return run_wsss
    if case == "pseudo_label":
        if impl == "ref":
            return lambda: ref_pseudo_label(par, x["img"], x["cam"], x["labels"], x["box"])
        return lambda: R.par_pseudo_label(x["img"], x["cam"], x["labels"], par, img_box=x["box"])
    if case.startswith("window_mask"):
        g = int(case[-2:])
        if impl == "ref":
            return lambda: torch.from_numpy(ref_window_mask(g, g, RADIUS)).bool()

        def run_mask():
            P._window_mask.cache_clear()
            return R.window_mask(g, g, RADIUS, device=dev).cpu()

        return run_mask
    if case == "propagation":
        mask_np = ref_window_mask(48, 48, RADIUS)
        win = R.window_mask(48, 48, RADIUS, device=dev)
        if impl == "ref":
            return lambda: ref_propagation(x["cam48"], x["aff"].clone(), mask_np, x["labels"], 0.35)
        return lambda: R.propagate_affinity(x["cam48"], x["aff"], x["labels"], 0.35, window=win)
    mask_np = ref_window_mask(S // 16, S // 16, RADIUS)
    win = R.window_mask(S // 16, S // 16, RADIUS, device=dev)
    if impl == "ref":
        return lambda: ref_affinity_labels(x["label"], mask_np)
    return lambda: R.affinity_labels(x["label"], (S // 16, S // 16), window=win)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter (Linux clear_refs 5) and return the current RSS in KiB.

    Falls back to ``ru_maxrss`` (which cannot go down, so it under-reports) where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss():
    try:
        return _status_kib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case, impl, device, repeats, out_path):
    device = torch.device(device)
    x = make_inputs(case, device)
    fn = build(case, impl, x)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.max_memory_allocated(device)
    else:
        base = reset_peak_rss()
    times = []
    with torch.no_grad():
        if case not in SLOW:
            out = fn()  # warm-up (counted in the peak, not in the time)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = (peak_rss() - base) / 1024
    torch.save(out.cpu(), out_path)
    return {"ms": 1000 * statistics.median(times), "peak_mib": peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 timed run per case (default: 3, PAR cases 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=CASES,
                    help="pseudo_label (the whole refine_cams_with_bkg_v2, ~1 min) is opt-in")
    ap.add_argument("--_worker", nargs=3, metavar=("CASE", "IMPL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        case, impl, out = args._worker
        repeats = 1 if args.quick else (2 if case in SLOW else 3)
        print(json.dumps(run_case(case, impl, args.device, repeats, out)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # a fixed mmap threshold makes glibc return freed large blocks to the OS, so that the peak RSS
    # follows the live tensors instead of heap reuse
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            res = {}
            for impl in ("ref", "wsss"):
                path = os.path.join(tmp, f"{case}_{impl}.pt")
                cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                       "--_worker", case, impl, path] + (["--quick"] if args.quick else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                res[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
                res[impl]["out"] = torch.load(path)
            a, b = res["ref"]["out"], res["wsss"]["out"]
            if a.dtype.is_floating_point:
                diff = f"max abs diff {float((a.double() - b.double()).abs().max()):.2e}"
            else:
                diff = f"{int((a != b).sum())} of {a.numel()} differ"
            rows.append((case, res["ref"], res["wsss"], diff))
            print(f"done {case}", file=sys.stderr)
    print(f"\ndevice: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| operation | reference ms | wsss ms | speed-up | ref peak MiB | wsss peak MiB | agreement |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for case, r, w, diff in rows:
        print(f"| {case} | {r['ms']:.1f} | {w['ms']:.1f} | {r['ms'] / w['ms']:.1f}x | "
              f"{r['peak_mib']:.0f} | {w['peak_mib']:.0f} | {diff} |")


if __name__ == "__main__":
    main()
