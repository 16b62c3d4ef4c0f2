"""TIES and task arithmetic: soupjax's merge from Python against mergekit's `mergekit-pytorch` command.

    python experiments/bench_vs_mergekit.py --ks 4,8 --rounds 3

What a merge user runs today on raw PyTorch checkpoints is mergekit 0.1.5's `mergekit-pytorch CONFIG.yml
OUTDIR` (a YAML config naming one safetensors file per model). This script builds the same K ingredients
in both formats and times the same merge with each tool, each run a fresh process, both writing the
merged model to disk.

Ingredients (in a temporary directory removed at the end; --keep keeps it): theta_0 is a random init of
soupjax's `vit-b/16` (--model) with --classes classes (PRNGKey(0), float32), ingredient i is theta_0 plus
0.01 * N(0, 1) float32 noise drawn with numpy seed i + 1, so every displacement is random of std 0.01.
Each is saved twice: as a soupjax ingredient (`checkpoints.save_ingredient`, meta.json with one shared
`init_fingerprint`; theta_0 likewise, apart from the ingredients' folder) and as a float32 safetensors
file whose tensor names are soupjax's parameter paths (`trees.flatten`: `params/Transformer/...`), so
that each safetensors tensor is exactly one soupjax tensor. (`importers.timm_export` would give timm's
names but fuses q, k and v into one `qkv` tensor, which TIES would then trim as one tensor: a different
merge. mergekit-pytorch only needs the names to match across its inputs.) The K = 4 ingredients are the
first four of the K = 8 ones (symbolic links).

Merges (settings where soupjax's and mergekit's conventions agree, docs/merge_conventions.md):
  TIES             soupjax `api.merge("ties", ingredients, init=theta_0, density=d, lam=lam)`;
                   mergekit `merge_method: ties`, `weight: 1`, `density: d` per model, `normalize: true`,
                   `lambda: lam`, theta_0 as `base_model`. d = 0.5 keeps d * n entries exactly (every
                   tensor of a ViT has an even size), so mergekit's floor and soupjax's ceil agree.
  task arithmetic  soupjax `api.merge("task_arithmetic", ingredients, init=theta_0, lam=lam)` (lam scales
                   the sum of the displacements); mergekit `task_arithmetic`, `weight: 1`, `normalize:
                   false`, `lambda: lam`, theta_0 as `base_model`.
Both configs say `dtype: float32` (the checkpoints' dtype: what mergekit computes in when it is absent).

Runs, each a fresh process under `/usr/bin/time -v` (wall time and "Maximum resident set size" of the
whole process, imports and writing included), interleaved: for each K and method, --rounds rounds, the
two tools alternating which goes first. The page cache is warm (every input file is read once before the
runs):
  mergekit  `mergekit-pytorch CONFIG.yml OUTDIR` with its default options (CPU, torch's default thread
            count, no --lazy-unpickle (it applies to pickles, not safetensors), one output shard).
  soupjax   a Python script as a user writes it: `api.load_ingredients(DIR)` (the pre-flight checks,
            which read every tensor once for NaN/Inf), `checkpoints.load_variables(THETA_0)`, `api.merge`,
            `checkpoints.save_ingredient(OUT, merged, meta)`; it reports the time of each step.
The merged models of the first round are compared (max |difference| over all entries, and how many
differ by more than 1e-5, i.e. a trimming decision taken differently rather than rounding).
The table and everything printed also go to --log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("mergekit", "soupjax")
METHODS = ("ties", "task_arithmetic")

_SOUPJAX_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from soupjax import api
from soupjax.io import checkpoints
method, ing_dir, init_dir, out = sys.argv[1:5]
hyper = json.loads(sys.argv[5])
t1 = time.perf_counter()
ingredients = api.load_ingredients(ing_dir)
t2 = time.perf_counter()
init = checkpoints.load_variables(init_dir)
t3 = time.perf_counter()
merged = api.merge(method, ingredients, init=init, **hyper)
t4 = time.perf_counter()
checkpoints.save_ingredient(out, merged, {"kind": "merge", "recipe": method, "method": method, "chosen": hyper})
t5 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load_ingredients": t2 - t1, "load_init": t3 - t2, "merge": t4 - t3,
                  "save": t5 - t4}))
"""

# --profile: the same steps, once, with the process's memory after each (VmRSS now, VmHWM its peak so far)
# and cProfile's view of api.merge (the 25 functions of most own time), to see where soupjax's time goes.
_SOUPJAX_PROFILE = r"""
import cProfile, io, json, pstats, sys, time
def mem():
    with open("/proc/self/status") as f:
        got = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
    return f"RSS {got['VmRSS']:.0f} MiB, peak so far {got['VmHWM']:.0f} MiB"
from soupjax import api
from soupjax.io import checkpoints
method, ing_dir, init_dir, out = sys.argv[1:5]
hyper = json.loads(sys.argv[5])
print("after imports:", mem())
t = time.perf_counter(); ingredients = api.load_ingredients(ing_dir)
print(f"after load_ingredients ({time.perf_counter() - t:.1f} s):", mem())
t = time.perf_counter(); init = checkpoints.load_variables(init_dir)
print(f"after load_variables(theta_0) ({time.perf_counter() - t:.1f} s):", mem())
profile = cProfile.Profile()
t = time.perf_counter(); merged = profile.runcall(api.merge, method, ingredients, init=init, **hyper)
print(f"after api.merge ({time.perf_counter() - t:.1f} s, under cProfile):", mem())
t = time.perf_counter()
checkpoints.save_ingredient(out, merged, {"kind": "merge", "recipe": method, "method": method, "chosen": hyper})
print(f"after save_ingredient ({time.perf_counter() - t:.1f} s):", mem())
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
print("api.merge, by own time:" + text.getvalue().split("Ordered by: internal time")[-1])
"""


class Tee:
    """Everything printed goes to stdout and to the log file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.path = path

    def __call__(self, *args: object) -> None:
        line = " ".join(str(a) for a in args)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def machine_line(extra: str = "") -> str:
    """The line a benchmark log starts with: date, host, CPUs and the load average (the machine is shared,
    so the load says how much of it the measurement had); ``extra`` follows 'no accelerator'."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()} ({platform.machine()}): {os.cpu_count()} CPUs "
            f"({cpu}), no accelerator{extra}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the "
            "start (1, 5, 15 min; shared with other jobs)")


def make_ingredients(root: Path, model_name: str, classes: int, k: int) -> tuple[int, float]:
    """theta_0 and ``k`` ingredients under ``root`` in both formats; (bytes of one model, seconds)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import save_file

    from soupjax import models
    from soupjax.io import checkpoints
    from soupjax.io.trees import flatten
    t = time.perf_counter()
    model = models.get_model(model_name, classes)
    theta0 = jax.device_get(jax.jit(lambda r: model.init(r, jnp.zeros((1, 224, 224, 3))))(jax.random.PRNGKey(0)))
    theta0 = jax.tree_util.tree_map(np.asarray, theta0)
    meta = {"bench": "bench_vs_mergekit", "bench_model": model_name, "init_fingerprint": f"bench-{model_name}"}

    def save(directory: Path, variables, tensors_file: Path, extra: dict) -> None:
        checkpoints.save_ingredient(directory, variables, {**meta, **extra})
        save_file({name: np.ascontiguousarray(x, dtype=np.float32) for name, x in flatten(variables).items()},
                  str(tensors_file))

    (root / "safetensors").mkdir(parents=True)
    save(root / "init" / "theta0", theta0, root / "safetensors" / "theta0.safetensors", {"kind": "init"})
    for i in range(k):
        rng = np.random.default_rng(i + 1)
        variables = jax.tree_util.tree_map(
            lambda x, rng=rng: (x + np.float32(0.01) * rng.standard_normal(x.shape, dtype=np.float32)).astype(np.float32),
            theta0)
        save(root / f"ingredients-k{k}" / f"ing{i:02d}", variables, root / "safetensors" / f"ing{i:02d}.safetensors",
             {"bench_seed": i + 1})
        del variables
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(theta0)), time.perf_counter() - t


def ingredients_dir(root: Path, k: int, k_max: int) -> Path:
    """The soupjax ingredients' folder for ``k``: the first ``k`` of the ``k_max`` ones, linked."""
    if k == k_max:
        return root / f"ingredients-k{k_max}"
    folder = root / f"ingredients-k{k}"
    folder.mkdir(exist_ok=True)
    for i in range(k):
        link = folder / f"ing{i:02d}"
        if not link.exists():
            link.symlink_to(root / f"ingredients-k{k_max}" / f"ing{i:02d}", target_is_directory=True)
    return folder


def mergekit_config(root: Path, method: str, k: int, args: argparse.Namespace) -> Path:
    """The YAML config of mergekit-pytorch for ``method`` on the first ``k`` safetensors ingredients."""
    st = root / "safetensors"
    if method == "ties":
        per_model = f"{{weight: 1.0, density: {args.density}}}"
        parameters = f"{{normalize: true, lambda: {args.ties_lambda}}}"
    else:
        per_model = "{weight: 1.0}"
        parameters = f"{{normalize: false, lambda: {args.ta_lambda}}}"
    lines = [f"merge_method: {method}", f"base_model: {st / 'theta0.safetensors'}", "dtype: float32",
             f"parameters: {parameters}", "models:"]
    lines += [f"  - model: {st / f'ing{i:02d}.safetensors'}\n    parameters: {per_model}" for i in range(k)]
    path = root / f"mergekit-{method}-k{k}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(cmd: list[str], env: dict[str, str], where: Path) -> tuple[float, float, str]:
    """Run ``cmd`` under /usr/bin/time -v: (wall seconds, peak RSS MiB, its stdout)."""
    report = where / "time.txt"
    out = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    text = report.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    seconds = 0.0
    for part in wall.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds, rss_kb / 1024, out.stdout


def run(tool: str, method: str, k: int, root: Path, out: Path, args: argparse.Namespace) -> dict:
    """One timed merge by ``tool`` into ``out``."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if tool == "mergekit":
        cmd = [str(Path(sys.executable).parent / "mergekit-pytorch"), str(mergekit_config(root, method, k, args)),
               str(out)]
        seconds, rss, _ = timed(cmd, env, root)
        return {"seconds": seconds, "rss_mb": rss}
    hyper = {"density": args.density, "lam": args.ties_lambda} if method == "ties" else {"lam": args.ta_lambda}
    cmd = [sys.executable, "-c", _SOUPJAX_CHILD, method, str(ingredients_dir(root, k, max(args.k_list))),
           str(root / "init" / "theta0"), str(out), json.dumps(hyper)]
    seconds, rss, stdout = timed(cmd, env, root)
    return {"seconds": seconds, "rss_mb": rss, "steps": json.loads(stdout.strip().splitlines()[-1])}


def profile(method: str, k: int, root: Path, args: argparse.Namespace, log: Tee) -> None:
    """soupjax's merge once, step by step with its memory, api.merge under cProfile (``_SOUPJAX_PROFILE``)."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    hyper = {"density": args.density, "lam": args.ties_lambda} if method == "ties" else {"lam": args.ta_lambda}
    out = root / f"out-profile-{method}-k{k}"
    cmd = [sys.executable, "-c", _SOUPJAX_PROFILE, method, str(ingredients_dir(root, k, max(args.k_list))),
           str(root / "init" / "theta0"), str(out), json.dumps(hyper)]
    seconds, rss, stdout = timed(cmd, env, root)
    shutil.rmtree(out, ignore_errors=True)
    log(f"\nK={k} {method}, soupjax under cProfile: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
    for line in stdout.rstrip().splitlines():
        log("  " + line)


def start_up(rounds: int) -> dict[str, tuple[float, float]]:
    """Each tool's fixed cost, measured alone over ``rounds`` interleaved rounds: (median s, median MiB) of
    `mergekit-pytorch --help` (its imports) and of the soupjax child's imports."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmds = {"mergekit": [str(Path(sys.executable).parent / "mergekit-pytorch"), "--help"],
            "soupjax": [sys.executable, "-c", "from soupjax import api\nfrom soupjax.io import checkpoints"]}
    where = Path(tempfile.mkdtemp(prefix="bench_vs_mergekit-startup-"))
    got: dict[str, list[tuple[float, float]]] = {t: [] for t in TOOLS}
    try:
        for r in range(rounds):
            for tool in (TOOLS if r % 2 == 0 else TOOLS[::-1]):
                got[tool].append(timed(cmds[tool], env, where)[:2])
    finally:
        shutil.rmtree(where, ignore_errors=True)
    return {t: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for t, v in got.items()}


def compare(soupjax_out: Path, mergekit_out: Path) -> tuple[float, int, int, float]:
    """(max |a - b|, entries with |a - b| > 1e-5, entries, max |a - b| of the others) of the two merges."""
    import numpy as np
    from safetensors.numpy import load_file

    from soupjax.io import checkpoints
    from soupjax.io.trees import flatten
    ours = flatten(checkpoints.load_variables(soupjax_out))
    files = sorted(mergekit_out.glob("*.safetensors"))
    theirs = {}
    for f in files:
        theirs.update(load_file(str(f)))
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:5]
    worst, off, total, rest = 0.0, 0, 0, 0.0
    for name, x in ours.items():
        y = theirs[name]
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32, (name, x.shape, y.shape, x.dtype, y.dtype)
        d = np.abs(np.asarray(x, np.float64) - y.astype(np.float64))
        worst = max(worst, float(d.max()))
        off += int((d > 1e-5).sum())
        rest = max(rest, float(d[d <= 1e-5].max(initial=0.0)))
        total += d.size
    return worst, off, total, rest


def warm(root: Path) -> float:
    """Read every input file once, so that every run reads from the page cache."""
    t = time.perf_counter()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - t


def mem_gib() -> tuple[float, float]:
    """(total, available) memory in GiB."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":")
            info[name] = int(value.split()[0]) / 2**20
    return info["MemTotal"], info["MemAvailable"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b/16", help="a soupjax.models name")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--ties_lambda", type=float, default=1.0)
    parser.add_argument("--ta_lambda", type=float, default=0.3)
    parser.add_argument("--tmp", default=None, help="where to make the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--reuse", default=None, help="a directory kept by --keep: its models are used, not made")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark: soupjax's merge once per K and method, its memory after each "
                             "step and api.merge under cProfile")
    parser.add_argument("--log", default=str(REPO / "experiments" / "results" / "bench_vs_mergekit.log"))
    args = parser.parse_args()
    args.k_list = sorted(int(x) for x in args.ks.split(","))
    methods = [m for m in args.methods.split(",") if m]
    log = Tee(Path(args.log))
    from importlib.metadata import version
    total, available = mem_gib()
    log("$ " + " ".join(["python", *sys.argv]))
    log(f"{time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}: {os.cpu_count()} CPUs, {total:.1f} GiB "
        f"({available:.1f} available), no accelerator; load average {os.getloadavg()[0]:.1f} at the start "
        f"(shared with other jobs)")
    log(f"mergekit {version('mergekit')}, torch {version('torch')}, jax {version('jax')}; {args.model}, "
        f"{args.classes} classes; TIES density {args.density} lambda {args.ties_lambda}; task arithmetic "
        f"lambda {args.ta_lambda} (on the sum); {args.rounds} rounds, the tools alternating first")
    rows = []
    tmp = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="bench_vs_mergekit-", dir=args.tmp))
    try:
        if args.reuse:
            nbytes, made = (tmp / "safetensors" / "theta0.safetensors").stat().st_size, 0.0
        else:
            nbytes, made = make_ingredients(tmp, args.model, args.classes, max(args.k_list))
        model_mb = nbytes / 2**20
        log(f"one model: {model_mb:.0f} MiB float32 ({nbytes // 4 / 1e6:.1f}M parameters); theta_0 + "
            f"{max(args.k_list)} ingredients written in both formats in {made:.0f} s; warmed in {warm(tmp):.0f} s")
        if args.profile:
            for k in args.k_list:
                for method in methods:
                    profile(method, k, tmp, args, log)
            return
        startup = start_up(args.rounds)
        log("start-up alone (medians): " + "; ".join(f"{t} {s:.1f} s, peak RSS {m:.0f} MiB"
                                                     for t, (s, m) in startup.items()))
        for k in args.k_list:
            for method in methods:
                runs: dict[str, list[dict]] = {t: [] for t in TOOLS}
                for r in range(args.rounds):
                    for tool in (TOOLS if r % 2 == 0 else TOOLS[::-1]):
                        out = tmp / f"out-{tool}-{method}-k{k}-r{r}"
                        result = run(tool, method, k, tmp, out, args)
                        runs[tool].append(result)
                        steps = result.get("steps")
                        log(f"  K={k} {method:<15} {tool:<8} round {r + 1}: {result['seconds']:6.1f} s, peak RSS "
                            f"{result['rss_mb']:6.0f} MiB" + (" (" + ", ".join(f"{s} {v:.1f} s" for s, v in steps.items())
                                                               + ")" if steps else ""))
                        if r > 0:
                            shutil.rmtree(out)
                worst, off, entries, rest = compare(tmp / f"out-soupjax-{method}-k{k}-r0",
                                                    tmp / f"out-mergekit-{method}-k{k}-r0")
                for tool in TOOLS:
                    shutil.rmtree(tmp / f"out-{tool}-{method}-k{k}-r0")
                log(f"  K={k} {method}: soupjax vs mergekit max |diff| {worst:.2e}; {off} of {entries} entries "
                    f"differ by > 1e-5, the others by at most {rest:.2e}")
                med = {t: (statistics.median(x["seconds"] for x in rs), statistics.median(x["rss_mb"] for x in rs))
                       for t, rs in runs.items()}
                steps = {s: statistics.median(x["steps"][s] for x in runs["soupjax"])
                         for s in runs["soupjax"][0]["steps"]}
                rows.append((k, method, med, worst, steps))
                log(f"  K={k} {method}: medians mergekit {med['mergekit'][0]:.1f} s {med['mergekit'][1]:.0f} MiB, "
                    f"soupjax {med['soupjax'][0]:.1f} s {med['soupjax'][1]:.0f} MiB: soupjax / mergekit "
                    f"{med['soupjax'][0] / med['mergekit'][0]:.2f} in time, {med['soupjax'][1] / med['mergekit'][1]:.2f} "
                    f"in memory")
    finally:
        if args.keep or args.reuse:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    log("")
    log(f"medians over {args.rounds} rounds; wall = the whole process (imports, reading, merging, writing); "
        f"peak RSS = /usr/bin/time's maximum resident set size; one model = {model_mb:.0f} MiB")
    log("| K | method | tool | wall s | peak RSS MiB | soupjax / mergekit, time | soupjax / mergekit, memory "
        "| max abs diff |")
    log("|---:|---|---|---:|---:|---:|---:|---:|")
    for k, method, med, worst, _ in rows:
        for tool in TOOLS:
            s, m = med[tool]
            ratios = (f"{med['soupjax'][0] / med['mergekit'][0]:.2f} | {med['soupjax'][1] / med['mergekit'][1]:.2f} "
                      f"| {worst:.1e}" if tool == "soupjax" else " | | ")
            log(f"| {k} | {method} | {tool} | {s:.1f} | {m:.0f} | {ratios} |")
    log("")
    log("soupjax's steps (medians, s): " + "; ".join(
        f"K={k} {method}: " + ", ".join(f"{s} {v:.1f}" for s, v in steps.items()) for k, method, _, _, steps in rows))


if __name__ == "__main__":
    main()
