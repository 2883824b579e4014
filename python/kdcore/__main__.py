"""The command line: recipes in, run folders and reports out.

    python -m kdcore run recipes/kd.yaml [more.yaml ...] [--out runs] [--seeds 0,1]
                         [--set key.path=value ...] [--cache DIR] [--threads N] [--check]
    python -m kdcore sweep recipes/kd.yaml --grid method=kd,dkd [--grid options.T=2,4 ...] [--seeds 0,1,2]
                           [--out runs] [--workers N] [--threads T] [--scheduler tcp://host:port]
                           [--set key.path=value ...] [--cache DIR]
    python -m kdcore report runs [--md report.md] [--json report.json]
                                 [--baseline NAME [--metric best_test_acc] [--level 0.95]]

``run`` writes one folder per (recipe, seed), <out>/<name>/seed-<seed> (see kdcore.recipes),
and skips the runs an earlier invocation finished. ``--check`` only validates the recipes,
loads the data and builds the models (an untrained teacher): nothing is trained or written.
``sweep`` runs one recipe over the product of the ``--grid`` overrides (values read as YAML
scalars) and the seeds, a Dask task per trial, into <out>/<name>-<key>=<value>-.../seed-<seed>
(kdcore.recipes.sweep), then prints the report of its trials. ``report`` prints mean ± std
over seeds of the last- and best-epoch test accuracy per (recipe, method); with
``--baseline NAME`` (a recipe, or a method label) also every other group's paired-seed
difference to it in ``--metric`` (default best_test_acc): mean, std and a Student-t interval
(kdcore.recipes.compare). Exit status: 0, 1
if a run or trial failed (the others still run), 2 for a recipe or command-line error (or,
for sweep, dask missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def _seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, e.g. 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds >= 0, got {text!r}")
    return seeds


def _parser():
    ap = argparse.ArgumentParser(prog="python -m kdcore", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run recipes, one folder per (recipe, seed)")
    r.add_argument("recipes", nargs="+", help="recipe files (YAML)")
    r.add_argument("--out", default="runs", help="where the run folders go (default: runs)")
    r.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds, replacing the recipes'")
    r.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key, the value read as YAML (e.g. --set epochs=2 student.width=8)")
    r.add_argument("--cache", default=None, help="trained teachers' cache (default: <out>/_teachers)")
    r.add_argument("--threads", type=int, default=None, help="kdcore.set_num_threads")
    r.add_argument("--check", action="store_true",
                   help="validate, load the data and build the models; train nothing, write nothing")
    r.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    w = sub.add_parser("sweep", help="one recipe over a grid of overrides x seeds, a Dask task per trial")
    w.add_argument("recipe", help="a recipe file (YAML)")
    w.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=V1,V2,...",
                   help="values of a recipe key to sweep (repeat for a product), e.g. --grid options.T=2,4")
    w.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds, replacing the recipe's")
    w.add_argument("--out", default="runs", help="where the run folders go (default: runs)")
    w.add_argument("--workers", type=int, default=None,
                   help="local cluster: worker processes, a trial each (default: cores // threads, or the cores)")
    w.add_argument("--threads", type=int, default=None,
                   help="kdcore threads per trial (default: cores // workers locally, 1 with --scheduler)")
    w.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="a running Dask scheduler (tcp://host:port) instead of a local cluster on 127.0.0.1")
    w.add_argument("--set", dest="sets", action="append", nargs="+", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key for every trial, the value read as YAML")
    w.add_argument("--cache", default=None, help="trained teachers' cache (default: <out>/_teachers)")
    w.add_argument("--quiet", action="store_true", help="no line per finished trial")
    p = sub.add_parser("report", help="table of finished runs: mean ± std over seeds per (recipe, method)")
    p.add_argument("out", nargs="?", default="runs", help="the runs folder (default: runs)")
    p.add_argument("--md", default=None, help="also write the table as Markdown to this file")
    p.add_argument("--json", default=None, help="also write the rows (unrounded) as JSON to this file (with "
                   "--baseline: an object {\"report\": rows, \"compare\": rows})")
    p.add_argument("--baseline", default=None, metavar="NAME",
                   help="also compare every group with this recipe (or method label), paired by seed: mean "
                        "difference, its std and a Student-t confidence interval (kdcore.recipes.compare)")
    p.add_argument("--metric", default=None,
                   help="the metrics.json number --baseline compares (default: best_test_acc; e.g. "
                        "last_test_acc, best_test_nll, best_test_ece, best_test_kl)")
    p.add_argument("--level", type=float, default=None, help="confidence level of --baseline's interval "
                   "(default: 0.95)")
    return ap


def _log(msg):
    print(msg, flush=True)


def _run(args, recipes):
    import kdcore
    if args.threads is not None:
        kdcore.set_num_threads(args.threads)
    sets = [s for group in args.sets for s in group]
    cfgs = [(path, recipes.load(path, sets=sets, seeds=args.seeds)) for path in args.recipes]
    names = {}
    for path, cfg in cfgs:
        if cfg["name"] in names:
            raise recipes.RecipeError(f"{path}: name {cfg['name']!r} is also {names[cfg['name']]}'s; "
                                      "give one of them another name (name: ...)")
        names[cfg["name"]] = path
    if args.check:
        for path, cfg in cfgs:
            p = recipes.prepare(cfg, cfg["seeds"][0], args.cache, train_teacher=False)
            t = p["teacher"]
            _log(f"{path}: ok ({cfg['name']}: method {cfg['method']}, student {cfg['student']['model']} "
                 f"{p['student'].num_parameters():,} parameters"
                 + (f", teacher {cfg['teacher']['model']} {t.num_parameters():,}" if t is not None else "")
                 + f", {len(p['train'])} training images, seeds {cfg['seeds']})")
        return 0
    failed, skipped = [], 0
    t0 = time.perf_counter()
    for path, cfg in cfgs:
        for seed in cfg["seeds"]:
            try:
                m = recipes.run_one(cfg, seed, args.out, cache=args.cache, log=None if args.quiet else _log,
                                    argv=[sys.executable, "-m", "kdcore"] + sys.argv[1:])
                skipped += m["skipped"]
            except recipes.RecipeError:
                raise
            except Exception:   # one failed run (e.g. a non-finite loss) must not stop the others
                traceback.print_exc()
                failed.append(f"{cfg['name']} seed {seed}")
                _log(f"{cfg['name']} seed {seed}: FAILED (no done.json; a rerun retries it)")
    total = sum(len(c["seeds"]) for _, c in cfgs)
    _log(f"{total - len(failed) - skipped} runs finished, {skipped} skipped (finished earlier), {len(failed)} failed "
         f"({time.perf_counter() - t0:.0f} s); python -m kdcore report {args.out}")
    return 1 if failed else 0


def _grid(items, recipes):
    """--grid arguments -> {key path: [values]}, each value read as a YAML scalar."""
    yaml = recipes._yaml()
    grid = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not recipes._GRID_KEY.match(key):
            raise recipes.RecipeError(f"--grid {item!r}: expected key.path=value1,value2,...")
        if key in grid:
            raise recipes.RecipeError(f"--grid {key}: given twice; list all its values in one --grid")
        values = []
        for v in text.split(","):
            if not v.strip():
                raise recipes.RecipeError(f"--grid {key}: an empty value in {text!r}")
            try:
                x = yaml.safe_load(v)
            except yaml.YAMLError as e:
                raise recipes.RecipeError(f"--grid {key}: {v!r} is not YAML: {e}") from None
            if isinstance(x, (dict, list)):
                raise recipes.RecipeError(f"--grid {key}: {v!r} is not a scalar (values are split at commas)")
            values.append(x)
        grid[key] = values
    return grid


def _sweep(args, recipes):
    t0 = time.perf_counter()
    ts = recipes.sweep(args.recipe, grid=_grid(args.grid, recipes), seeds=args.seeds,
                       sets=[s for group in args.sets for s in group], out=args.out, workers=args.workers,
                       threads=args.threads, scheduler=args.scheduler, cache=args.cache,
                       log=None if args.quiet else _log, argv=[sys.executable, "-m", "kdcore"] + sys.argv[1:])
    failed = [t for t in ts if t.status == "failed"]
    for t in failed:
        print(f"{t.name} seed {t.seed} failed:\n{t.traceback}", file=sys.stderr)
    n = {s: sum(t.status == s for t in ts) for s in ("finished", "skipped")}
    _log(f"{n['finished']} trials finished, {n['skipped']} skipped (finished earlier), {len(failed)} failed "
         f"({time.perf_counter() - t0:.0f} s)")
    names = {t.name for t in ts}
    rows = [r for r in recipes.report(args.out) if r["recipe"] in names]
    if rows:
        print(recipes.format_report(rows), end="")
    for t in failed:
        _log(f"FAILED {t.name} seed {t.seed}: {t.error} (no done.json; a rerun retries it)")
    return 1 if failed else 0


def _report(args, recipes):
    if not os.path.isdir(args.out):
        raise recipes.RecipeError(f"{args.out}: no such folder")
    if args.baseline is None and (args.metric is not None or args.level is not None):
        raise recipes.RecipeError("--metric and --level: only with --baseline")
    args.level = 0.95 if args.level is None else args.level
    rows = recipes.report(args.out)
    if not rows:
        raise recipes.RecipeError(f"{args.out}: no finished runs (folders with done.json)")
    comp = None
    if args.baseline is not None:
        comp = recipes.compare(args.out, args.baseline, metric=args.metric or "best_test_acc", level=args.level)
    print(recipes.format_report(rows), end="")
    if comp is not None:
        print(f"\n{_compare_title(comp, args)}\n" + recipes.format_compare(comp), end="")
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(f"Test accuracy (%) in {args.out}, mean ± std over seeds (ddof 0); best epoch: highest "
                    "validation accuracy, or test accuracy without a validation split.\n\n")
            f.write(recipes.format_report(rows, markdown=True))
            if comp is not None:
                f.write(f"\n{_compare_title(comp, args)}\n\n" + recipes.format_compare(comp, markdown=True))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows if comp is None else {"report": rows, "compare": comp}, f, indent=1, allow_nan=True)
    return 0


def _compare_title(comp, args):
    base = comp[0]["baseline"] if comp else args.baseline
    metric = args.metric or "best_test_acc"
    return (f"{metric}: each group minus {base}, paired by seed; mean and std (ddof 1) of the differences, "
            f"{100 * args.level:g}% Student-t interval with n-1 degrees of freedom (n/a with one pair).")


def main(argv=None):
    args = _parser().parse_args(argv)
    from . import recipes
    try:
        return {"run": _run, "sweep": _sweep, "report": _report}[args.command](args, recipes)
    except recipes.RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if str(e) != recipes._DASK_MISSING:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
