"""``wsss demo`` (``make demo``): the whole job on the built-in synthetic set, on a CPU, in minutes.

1. generate the synthetic VOC-layout dataset (once);
2. train the CAM baseline, AFA, AReAM, ToCo (on the hybrid backbone) and the fully supervised upper
   bound with the small configs, two at a time in worker processes (``--jobs``);
   after AFA, the second stage of the multi-stage recipe: AFA's pseudo labels (``aff_par``) on the
   train split, then a segmentation network trained on them (``second_stage_<backbone>_synthetic``);
3. evaluate each (CAM, refined CAM, pseudo label, segmentation head) on the validation split;
4. for AFA and AReAM, ``wsss analyze`` on part of the validation split: attention statistics and the
   refinement with the model's own affinity against a perfect one from the ground truth
   (:mod:`wsss.analysis.oracle`), which tells whether the affinity is what holds a method back;
5. print the mIoU table and write ``summary.json`` / ``summary.md`` and the HTML reports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from wsss.analysis.analyze import oracle_summary
from wsss.config import load_config, resolve_config_path
from wsss.methods import method_class

# The demo's backbones: "hybrid" (default; ImageNet-pretrained EfficientNet-Lite0 + transformer
# blocks, needs the `pretrained` extra) and "scratch" (a MiT trained from scratch, no download).
DEMO_BACKBONES = {"hybrid": "hybrid_lite0", "scratch": "mit_tiny"}
# "second_stage" trains on AFA's pseudo labels, so it runs after "afa".
DEMO_METHODS = ("cam", "afa", "second_stage", "aream", "toco", "supervised")


def demo_configs(backbone: str = "hybrid") -> dict[str, str]:
    """method -> shipped config name of the demo on ``backbone`` ("hybrid" or "scratch"): the methods
    with a ``<method>_<backbone>_synthetic`` config (ToCo needs a class token, which the scratch MiT
    lacks, so it runs on the hybrid only)."""
    if backbone not in DEMO_BACKBONES:
        raise ValueError(f"demo backbone must be one of {sorted(DEMO_BACKBONES)}, got {backbone!r}")
    names = {m: f"{m}_{DEMO_BACKBONES[backbone]}_synthetic" for m in DEMO_METHODS}
    return {m: n for m, n in names.items() if _shipped(n)}


def _shipped(name: str) -> bool:
    """Whether a config of that name ships with wsss (or lies in the working directory)."""
    try:
        return resolve_config_path(name).is_file()
    except FileNotFoundError:
        return False


# Relative cost of each demo run (minutes at one thread, two at a time, training + evaluation +
# analysis; fp32 on a 2-core AMD EPYC without native bf16, where the bf16 ratios are alike): the
# parallel demo plans its start order on them (:func:`plan_order`).
DEMO_COST = {"toco": 5.1, "afa": 2.6, "aream": 2.5, "cam": 2.4, "supervised": 1.7, "second_stage": 1.2}
SECOND_STAGE_FROM = "afa"  # the method whose pseudo labels (its PSEUDO_MAP) the second stage learns
ANALYZED = ("afa", "aream")  # methods whose affinity the demo compares with a perfect one
ANALYSIS_IMAGES = 50


def analyze_run(cfg: Any, run_dir: Path, max_images: int) -> dict[str, Any]:
    """``wsss analyze`` of a finished run into ``run_dir/analysis`` (plots when matplotlib is there)."""
    from wsss.analysis.analyze import run_analysis
    from wsss.analysis.loading import load_model
    from wsss.analysis.plots import plots_available
    from wsss.data.build import build_dataset

    net, cfg, _ = load_model(run_dir / "model", cfg)
    split = str(cfg.eval.get("split") or cfg.data.val_split)
    dataset = build_dataset(cfg.data, split=split, train=False)
    return run_analysis(net, cfg, dataset, run_dir / "analysis", split, max_images,
                        plots=plots_available() is None)


def write_stage_labels(out: Path, method: str, overwrite: bool = False) -> dict[str, Any]:
    """``wsss pseudo-labels`` of the demo's finished ``method`` run on the train split (the map its method
    declares as its pseudo label, ``Method.PSEUDO_MAP``)
    into ``<run>/pseudo_train`` (labels of the same model are reused, ``overwrite`` writes them all
    again); returns the folder, the map, the minutes and the scores."""
    from wsss.commands.pseudo_labels import run_pseudo_labels

    run_dir = out / method
    if not (run_dir / "model").is_dir():
        raise FileNotFoundError(f"the second stage needs the trained {method} run first ({run_dir})")
    t0 = time.time()
    map_name = method_class(method).PSEUDO_MAP or "pseudo"
    s = run_pseudo_labels(None, run_dir / "model", [], "train", run_dir / "pseudo_train", map_name=map_name,
                          verbose=False, overwrite=overwrite)
    return {"dir": str(run_dir / "pseudo_train"), "map": map_name, "from": method,
            "minutes": (time.time() - t0) / 60, "scores": s["scores"]}


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its released ``model/`` and ``metrics.json``)."""
    return (run_dir / "metrics.json").is_file() and (run_dir / "model").is_dir()


def check_demo_methods(out: Path, methods: list[str], known: list[str], reuse: bool) -> None:
    """Errors before any method trains: unknown methods, runs already in ``out`` without ``reuse``
    (--resume / --overwrite), a second stage without the run its pseudo labels come from."""
    from wsss.engine.train import RUN_FILES

    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; choose from {', '.join(known)}")
    used = [m for m in methods if any((out / m / n).exists() for n in RUN_FILES)]
    if used and not reuse:
        raise ValueError(f"{out} already holds demo runs ({', '.join(used)}): pass --resume to keep them "
                         f"and continue, --overwrite to train them again, or choose another --out")
    if "second_stage" in methods:
        before = methods[:methods.index("second_stage")]
        if SECOND_STAGE_FROM not in before and not finished(out / SECOND_STAGE_FROM):
            src = SECOND_STAGE_FROM
            raise ValueError(f"the demo's second_stage learns {src}'s pseudo labels: list {src} before it, "
                             f"or train it first into {out / src}")


def demo_jobs(jobs: int | None, threads: int | None) -> tuple[int, int | None]:
    """(parallel trainings, torch threads of each). Default: two trainings at a time on a machine with
    two or more cores, each with half the cores: the demo's small networks use one core better than
    two, so two one-thread trainings finish sooner than the same two in turn with two threads."""
    cores = os.cpu_count() or 1
    if jobs is None:
        jobs = 2 if cores >= 2 else 1
    if jobs < 1:
        raise ValueError(f"demo --jobs must be at least 1, got {jobs}")
    if jobs > 1 and threads is None:
        threads = max(1, cores // jobs)
    return jobs, threads


def _method_overrides(method: str, out: Path, quick: bool, threads: int | None, data: str | None = None,
                      seed: int | None = None) -> list[str]:
    overrides = [f"data.root={data or out / 'data'}", f"out_dir={out / method}", f"name={method}"]
    if threads is not None:
        overrides.append(f"threads={threads}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    if quick:
        overrides += [
            "train.max_iters=4",
            "train.log_every=2",
            "data.num_train=16",  # the second stage needs pseudo labels of every train image
            "data.num_val=8",
            "eval.max_images=4",
            "pseudo.warmup_iters=1",
            "afa.switch_iter=2",
            "aream.warmup_iters=1",
            "toco.seg_start_iter=1",
        ]
    return overrides


def run_method(task: dict[str, Any]) -> dict[str, Any]:
    """One demo method (trained, or kept with --resume), evaluated and analysed: its summary row.

    ``task``: method, config, out, quick, threads, resume, overwrite, and ``log`` (a file that takes
    the console output, for a training that runs next to others in a worker process)."""
    if not task.get("log"):
        return _run_method(task)
    with open(task["log"], "a", buffering=1) as log, redirect_stdout(log), redirect_stderr(log):
        return _run_method(task)


def _run_method(task: dict[str, Any]) -> dict[str, Any]:
    from wsss.engine.distributed import set_threads
    from wsss.engine.train import train

    set_threads(task["threads"])
    method, out = task["method"], Path(task["out"])
    overrides = _method_overrides(method, out, task["quick"], task["threads"], task.get("data"),
                                  task.get("seed"))
    labels = None
    if method == "second_stage":
        labels = write_stage_labels(out, SECOND_STAGE_FROM, overwrite=task["overwrite"])
        overrides.append(f"data.pseudo_dir={labels['dir']}")
    cfg = load_config(task["config"], overrides)
    t0 = time.time()
    if task["resume"] and finished(out / method):
        results = json.loads((out / method / "metrics.json").read_text())["eval"]  # finished: keep it
        print(f"demo: {method} already trained in {out / method} (--resume)")
    else:
        results = train(cfg, resume=task["resume"], overwrite=task["overwrite"])
    pseudo_key = method_class(str(cfg.method)).PSEUDO_MAP
    row: dict[str, Any] = {
        "config": task["config"],
        "minutes": (time.time() - t0) / 60,
        "pseudo_miou": results[pseudo_key]["miou"] if pseudo_key in results else None,
        "seg_miou": results["seg"]["miou"] if "seg" in results else None,
        "maps": {k: v["miou"] for k, v in results.items() if isinstance(v, dict) and "miou" in v},
    }
    if labels is not None:
        row["train_labels"] = labels
    if method in ANALYZED:
        row["oracle"] = analyze_run(cfg, out / method, 4 if task["quick"] else ANALYSIS_IMAGES).get("oracle")
    return row


def _ready(method: str, done: set[str], methods: list[str]) -> bool:
    """The second stage waits for the run whose pseudo labels it learns (when that run is listed)."""
    return method != "second_stage" or SECOND_STAGE_FROM not in methods or SECOND_STAGE_FROM in done


def _makespan(order: list[str], jobs: int, methods: list[str]) -> float:
    """Minutes until the last run ends when ``jobs`` workers each take the first run of ``order`` that
    is ready when they free up (:data:`DEMO_COST`; the second stage waits for its source)."""
    free, ends, pending = [0.0] * jobs, {}, list(order)
    while pending:
        lane = min(range(jobs), key=free.__getitem__)
        now = free[lane]
        done = {m for m, t in ends.items() if t <= now}
        ready = [m for m in pending if _ready(m, done, methods)]
        if not ready:  # only the second stage is left and its source still runs
            free[lane] = min(t for t in ends.values() if t > now)
            continue
        pending.remove(ready[0])
        free[lane] = ends[ready[0]] = now + DEMO_COST.get(ready[0], 1.0)
    return max(free)


def plan_order(methods: list[str], jobs: int) -> list[str]:
    """The start order with the shortest simulated demo (:func:`_makespan`; ties: the most costly
    first). Trying every order is cheap for the demo's six runs; beyond eight, most costly first."""
    lpt = sorted(methods, key=lambda m: -DEMO_COST.get(m, 1.0))
    if len(methods) > 8 or jobs < 2:
        return lpt
    return list(min(itertools.permutations(lpt), key=lambda o: _makespan(list(o), jobs, methods)))


def start_order(pending: list[str], done: set[str], plan: list[str], methods: list[str]) -> list[str]:
    """The pending methods that can start now, in the planned order (:func:`plan_order`)."""
    return [m for m in plan if m in pending and _ready(m, done, methods)]


def _run_parallel(tasks: dict[str, dict[str, Any]], jobs: int) -> dict[str, dict[str, Any]]:
    """Run the tasks in ``jobs`` worker processes (second stage after its source); rows by method."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    methods, rows, running = list(tasks), {}, {}
    pending, plan = list(methods), plan_order(list(tasks), jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            for m in start_order(pending, set(rows), plan, methods)[: jobs - len(running)]:
                pending.remove(m)
                running[pool.submit(run_method, tasks[m])] = m
                print(f"demo: {m} started (console output: {tasks[m]['log']})", flush=True)
            finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished_now:
                m = running.pop(fut)
                try:
                    rows[m] = fut.result()
                except Exception as err:
                    pool.shutdown(wait=False, cancel_futures=True)
                    log = tasks[m]["log"]
                    raise RuntimeError(f"demo: {m} failed ({err}); its console output: {log}") from err
                print(f"demo: {m} finished in {rows[m]['minutes']:.1f} min", flush=True)
    return {m: rows[m] for m in methods}


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, methods: list[str] | None = None,
    backbone: str = "hybrid", resume: bool = False, overwrite: bool = False,
    jobs: int | None = None, threads: int | None = None, data: str | Path | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The demo into ``out``. ``resume``: methods whose run finished (``model/`` and ``metrics.json``)
    are kept, an interrupted one continues from its newest checkpoint; ``overwrite``: every method
    is trained again. Without either, an ``out`` that holds a method's run is an error. ``jobs``
    trainings run at a time, each with ``threads`` torch threads (:func:`demo_jobs`). ``data``: the
    synthetic set's folder (default ``out/data``); ``seed``: every config's seed (default: its own)."""
    from wsss.data.build import build_dataset

    configs = demo_configs(backbone)
    if backbone == "hybrid":
        from wsss.backbones.efficientnet import weights_path

        weights_path()  # fails before any training when the weights package is missing
    out = Path(out)
    methods = list(methods or configs)
    check_demo_methods(out, methods, list(configs), resume or overwrite)
    jobs, threads = demo_jobs(jobs, threads)
    data = None if data is None else str(data)
    tasks = {m: {"method": m, "config": configs[m], "out": str(out), "quick": quick, "threads": threads,
                 "resume": resume, "overwrite": overwrite, "data": data, "seed": seed} for m in methods}
    if jobs > 1 and len(methods) > 1:
        # the synthetic set is written once here, not by two workers at the same time
        first = _method_overrides(methods[0], out, quick, None, data)
        build_dataset(load_config(configs[methods[0]], first).data, split="train", train=False)
        for m, task in tasks.items():
            (out / m).mkdir(parents=True, exist_ok=True)
            task["log"] = str(out / m / "console.log")
        summary = _run_parallel(tasks, jobs)
    else:
        summary = {m: run_method(tasks[m]) for m in methods}
    table = summary_table(summary)
    print(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    try:
        from wsss.analysis.report import write_report
    except ImportError:
        return summary
    for method in summary:
        write_report(out / method)
    return summary


def run_seeds(out: str | Path, seeds: list[int], **kwargs: Any) -> dict[int, dict[str, Any]]:
    """The demo once per seed, into ``out/seed<N>`` (one synthetic set, ``out/data``), then the table of
    every method's mean and per-seed mIoU (``out/seeds.md``, ``out/seeds.json``): on the demo's short
    schedules single runs of one config differ by up to 20 points, so a method helps only where it
    helps on average. ``kwargs``: those of :func:`run_demo`. Returns the summaries by seed."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"demo --seeds needs distinct seeds, got {seeds}")
    out = Path(out)
    configs = demo_configs(kwargs.get("backbone", "hybrid"))
    reuse = bool(kwargs.get("resume") or kwargs.get("overwrite"))
    for seed in seeds:  # every seed's folder is checked before the first training
        check_demo_methods(out / f"seed{seed}", list(kwargs.get("methods") or configs), list(configs), reuse)
    summaries = {}
    for seed in seeds:
        print(f"demo: seed {seed} into {out / f'seed{seed}'}", flush=True)
        summaries[seed] = run_demo(out / f"seed{seed}", data=out / "data", seed=seed, **kwargs)
    table = seeds_table(summaries)
    print(table)
    (out / "seeds.json").write_text(json.dumps({str(k): v for k, v in summaries.items()}, indent=2))
    (out / "seeds.md").write_text(table + "\n")
    return summaries


def seeds_table(summaries: dict[int, dict[str, Any]]) -> str:
    """Markdown: per method the mean mIoU over the seeds of its pseudo label, seg head and CAM, each
    with the per-seed values (in seed order); a value missing in some seed is averaged over the rest."""
    seeds = list(summaries)
    methods = list(dict.fromkeys(m for s in seeds for m in summaries[s]))

    def cell(method: str, get: Callable[[dict[str, Any]], float | None]) -> str:
        vals = [get(summaries[s][method]) if method in summaries[s] else None for s in seeds]
        got = [v for v in vals if v is not None]
        if not got:
            return "-"
        each = " / ".join("-" if v is None else f"{100 * v:.1f}" for v in vals)
        return f"{100 * sum(got) / len(got):.1f} ({each})"

    rows = [f"Mean over seeds {', '.join(map(str, seeds))} (each seed's value in brackets), mIoU:", "",
            "| method | pseudo label | seg | CAM |", "|---|---:|---:|---:|"]
    for m in methods:
        rows.append(f"| {m} | {cell(m, lambda r: r['pseudo_miou'])} | {cell(m, lambda r: r['seg_miou'])} | "
                    f"{cell(m, lambda r: r['maps'].get('cam'))} |")
    return "\n".join(rows)


def summary_table(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    rows = [
        "| method | config | pseudo-label mIoU | seg mIoU | CAM mIoU | minutes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m, s in summary.items():
        rows.append(
            f"| {m} | {s['config']} | {pct(s['pseudo_miou'])} | {pct(s['seg_miou'])} | "
            f"{pct(s['maps'].get('cam'))} | {s['minutes']:.1f} |"
        )
    notes = [f"- {m}: {oracle_summary(s['oracle'])}" for m, s in summary.items() if s.get("oracle")]
    for m, s in summary.items():
        lab = s.get("train_labels")
        if lab:
            sc = lab["scores"]
            rows.append(f"\n{m}: a segmentation network trained on {lab['from']}'s {lab['map']} pseudo "
                        f"labels of the train split (their train mIoU {pct(sc['miou_uncertain_left_out'])}, "
                        f"written in {lab['minutes']:.1f} min)")
    if notes:
        head = f"Refinement with the model's affinity vs a perfect one (<= {ANALYSIS_IMAGES} val images):"
        rows += ["", head, *[n.replace("\n", "; ") for n in notes]]
    return "\n".join(rows)


def cmd_demo(args: argparse.Namespace) -> int:
    kwargs = {"quick": args.quick, "methods": args.methods, "backbone": args.backbone, "resume": args.resume,
              "overwrite": args.overwrite, "jobs": args.jobs, "threads": args.threads}
    if args.seeds:
        run_seeds(args.out, args.seeds, **kwargs)
    else:
        run_demo(args.out, **kwargs)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``demo`` on the ``wsss`` CLI."""
    p = sub.add_parser("demo", help="synthetic data -> train every demo method and a second stage on "
                                    "pseudo labels -> evaluate -> report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test)")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--backbone", default="hybrid", choices=["hybrid", "scratch"],
                   help="hybrid: ImageNet-pretrained EfficientNet-Lite0 + transformer (pip install "
                   "'wsss[pretrained]'); scratch: a MiT trained from scratch, nothing to download")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished methods of --out, continue an interrupted one from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="train every method again in an existing --out")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="trainings run at the same time, each in its own process with cores/N threads "
                        "(default: 2 on a machine with two or more cores, else 1)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="run the demo once per seed (into --out/seed<N>) and print each method's mean "
                        "over the seeds: single runs of the demo's short schedules differ by up to 20 points")
    p.set_defaults(fn=cmd_demo)
