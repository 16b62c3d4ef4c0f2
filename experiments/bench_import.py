"""Importing K released model-soups files: soupjax's import command against simply reading the files.

    python experiments/bench_import.py --ks 1,4,16 --rounds 2

Files: K_max random-weight CLIP ViT-B/32 files in the official model-soups format, written once in a
temporary directory and reused for every K (deleted at the end): `open_clip.create_model('ViT-B-32',
pretrained=None)` (seed 0), its state dict under `model.` with the text transformer's `transformer.*`
deleted (the official ModelWrapper's), plus `classification_head.weight` [1000, 512] and `.bias` [1000];
file i's image tower is moved by 0.01 x N(0, 1) noise of seed i and its head drawn with seed i, so no two
files are alike. `torch.save`, as the official code saved them (~440 MiB each). Before the rounds every
file is read once (`cat > /dev/null`), so every contender finds them in the page cache.

Contenders, each one process started fresh for each measurement, so that its peak resident memory
(`/usr/bin/time -f %M`: that process's own ru_maxrss) belongs to that run alone; the files are written by
another process, so the driver stays small:
  import     `python -m soupjax.import_ingredients --format model-soups --out DIR FILE...` (no --base; the
             default config configs/imagenet_clip_vit_b32.py): hashes every file, then reads, converts and
             writes one ingredient (orbax + meta.json) at a time. DIR is deleted after each run.
  keep all   `torch.load(f, weights_only=True)` of each file in turn, every state dict kept in a list:
             what a naive script that averages the files at the end would hold.
  one by one the same loads, each state dict dropped before the next: the floor of reading the files.
Floors, once each before the rounds (or alone with --floors_only): the peak RSS of a process that only imports
torch, and of one that imports what the import command imports when it runs (jax, soupjax.data with
TensorFlow and TFDS, the models, orbax).

Measurement, interleaved: for each of --rounds rounds and each K, the three contenders run one after the
other in an order that rotates with the round and the K, 1 s apart. Reported per K and contender: the
median wall time (process start to exit, interpreter and imports included) and its range, the time per file,
and the median peak RSS with its range. The load average goes in the log at the start, after each
measurement and at the end. --base_k K adds one import --base run of K files (the base: the same open_clip
model's full state dict with open_clip's tokenizer file beside it, 1000 class names, one template) after the
rounds, not interleaved. Everything printed also goes to --log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# experiments/ is this script's directory, so on sys.path: the benchmarks' shared log writer.
from bench_vs_mergekit import Tee, machine_line

REPO = Path(__file__).resolve().parent.parent
MODEL = 'ViT-B-32'
CLASSES = 1000
CONTENDERS = ('import', 'keep all', 'one by one')
GiB = 2**30


def write_files(root: Path, count: int) -> None:
    """``count`` model-soups files (``root/released/model_{i}.pt``) and the base CLIP (``root/base/clip.pt``,
    open_clip's tokenizer file beside it)."""
    import open_clip
    import torch
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    (root / 'base').mkdir(parents=True)
    base = root / 'base' / 'clip.pt'
    torch.save(state, base)
    shutil.copy(Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz', root / 'base')
    # The official ModelWrapper deletes the text transformer (`transformer.*`); `visual.transformer.*` stays.
    wrapped = {'model.' + k: v for k, v in state.items() if not k.startswith('transformer.')}
    embed = state['text_projection'].shape[1]
    (root / 'released').mkdir()
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        sd = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if k.startswith('model.visual.') else v)
              for k, v in wrapped.items()}
        sd['classification_head.weight'] = torch.randn(CLASSES, embed, generator=gen)
        sd['classification_head.bias'] = 0.1 * torch.randn(CLASSES, generator=gen)
        path = root / 'released' / f'model_{i}.pt'
        torch.save(sd, path)


def reader(mode: str, files: list[str]) -> None:
    """A 'keep all' or 'one by one' process: torch.load each file, keeping every state dict or none."""
    import torch
    kept = []
    tensors = 0
    for f in files:
        sd = torch.load(f, weights_only=True, map_location='cpu')
        tensors += sum(v.numel() * v.element_size() for v in sd.values())
        if mode == 'keep':
            kept.append(sd)
        del sd
    print(json.dumps({'tensor_bytes': tensors, 'kept': len(kept)}), flush=True)


def run_measured(argv: list[str], log_file: Path) -> tuple[float, float, int]:
    """Runs ``argv`` as a fresh process (output to ``log_file``) under /usr/bin/time; (wall s, peak RSS MiB,
    exit status)."""
    env = {**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu'), 'TF_CPP_MIN_LOG_LEVEL': '2'}
    # /usr/bin/time forks the command from its own small process, so the command's ru_maxrss is its own
    # (wait4 on a child forked from a big parent reports the parent's high-water mark carried over exec).
    usage = log_file.with_suffix('.rss')
    with open(log_file, 'w') as out:
        t = time.perf_counter()
        code = subprocess.run(['/usr/bin/time', '-f', '%M', '-o', str(usage), *argv], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - t
    return seconds, int(usage.read_text().split()[-1]) / 1024, code


def command(kind: str, files: list[Path], out: Path, base: Path | None = None, classnames: Path | None = None) -> list[str]:
    """The argv of one contender over ``files``."""
    names = [str(f) for f in files]
    if kind == 'import':
        extra = ['--base', str(base), '--classnames', str(classnames)] if base is not None else []
        return [sys.executable, '-m', 'soupjax.import_ingredients', '--format', 'model-soups', '--out', str(out),
                *extra, *names]
    return [sys.executable, __file__, '--reader', 'keep' if kind == 'keep all' else 'drop', *names]


def measure_one(kind: str, files: list[Path], root: Path, log: Tee, **start: Path) -> tuple[float, float]:
    """One fresh run of ``kind`` over ``files``: (wall s, peak RSS MiB); the import's output deleted."""
    out = root / 'imported'
    seconds, peak, code = run_measured(command(kind, files, out, **start), root / 'run.log')
    output = (root / 'run.log').read_text()
    if code != 0:
        log(output[-3000:])
        raise SystemExit(f'{kind} over {len(files)} files failed (exit {code}); its output is above')
    if out.exists():
        written = sum(p.stat().st_size for p in out.rglob('*') if p.is_file())
        log(f'    ({kind}: wrote {written / 2**20:.0f} MiB; last line: {output.strip().splitlines()[-1][:160]})')
        shutil.rmtree(out)
    return seconds, peak


def floors(root: Path, log: Tee) -> None:
    """The peak RSS of an interpreter that only imports torch, and of one with the import command's imports."""
    # import_model_soups imports soupjax.data (TensorFlow, TFDS) and the models when it runs, not at the top.
    command_imports = ('import jax, jax.numpy; import soupjax.import_ingredients, soupjax.importers.model_soups; '
                       'from soupjax import data; from soupjax.models import build_model_from_run_config; '
                       'from soupjax.io import checkpoints; from soupjax.training import shared_init')
    for what, code in (('python + import torch', 'import torch'),
                       ('python + the import command\'s imports (jax, soupjax.data with TensorFlow and TFDS, '
                        'the models, orbax)', command_imports)):
        seconds, peak, _ = run_measured([sys.executable, '-c', code], root / 'run.log')
        log(f'floor: {what}: peak RSS {peak:.0f} MiB, {seconds:.1f} s')


def available_memory() -> float:
    """MemAvailable, bytes."""
    with open('/proc/meminfo') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable'))


def fitting_ks(ks: list[int], file_bytes: int, log: Tee) -> list[int]:
    """The K that fit the disk with 10 GiB to spare: K files + one import's output (~0.8 x the files)."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    fit = [k for k in ks if 1.8 * k * file_bytes + 10 * GiB < free]
    if fit != ks:
        log(f'disk: {free / GiB:.1f} GiB free in {tempfile.gettempdir()}; K = {ks} reduced to {fit} (10 GiB to spare)')
    return fit


def summarise(results: dict[tuple[str, int], list[tuple[float, float]]], ks: list[int], file_mib: float,
              log: Tee) -> None:
    """The table: median wall time, its range, time per file, median peak RSS and its range."""
    log('')
    log('| K | contender | wall s (median) | wall s range | s per file | peak RSS MiB (median) | peak RSS range |')
    log('|---:|---|---:|---:|---:|---:|---:|')
    for k in ks:
        for kind in CONTENDERS:
            runs = results.get((kind, k))
            if not runs:
                log(f'| {k} | {kind} | (skipped) | | | | |')
                continue
            walls, peaks = [s for s, _ in runs], [p for _, p in runs]
            log(f'| {k} | {kind} | {statistics.median(walls):.1f} | {min(walls):.1f}-{max(walls):.1f} | '
                f'{statistics.median(walls) / k:.2f} | {statistics.median(peaks):.0f} | {min(peaks):.0f}-{max(peaks):.0f} |')
    log(f'one file: {file_mib:.0f} MiB on disk')


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--reader':
        reader(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == '--write':
        write_files(Path(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ks', default='1,4,16', help='numbers of files to import')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--base_k', type=int, default=0, help='one import --base run of this many files (0: none)')
    parser.add_argument('--floors_only', action='store_true', help='measure the two floors only (no files)')
    parser.add_argument('--log', default=str(REPO / 'experiments' / 'results' / 'bench_import.log'))
    args = parser.parse_args()
    ks = sorted(int(x) for x in args.ks.split(','))
    log = Tee(Path(args.log))
    log('$ ' + ' '.join(['python', *sys.argv]))
    log(machine_line(f', {available_memory() / GiB:.1f} GiB available'))
    root = Path(tempfile.mkdtemp(prefix='bench_import-'))
    if args.floors_only:
        floors(root, log)
        shutil.rmtree(root)
        return
    ks = fitting_ks(ks, 470 * 2**20, log)
    started = time.perf_counter()
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, '--write', str(root), str(max(ks))], check=True)
        files = [root / 'released' / f'model_{i}.pt' for i in range(max(ks))]
        base = root / 'base' / 'clip.pt'
        file_bytes = files[0].stat().st_size
        log(f'{len(files)} model-soups files of {file_bytes / 2**20:.0f} MiB written in {time.perf_counter() - t:.0f} s '
            f'({len(files) * file_bytes / GiB:.1f} GiB) in {root}')
        subprocess.run(['cat', *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        floors(root, log)
        for r in range(args.rounds):
            for j, k in enumerate(ks):
                shift = (r + j) % len(CONTENDERS)
                for kind in CONTENDERS[shift:] + CONTENDERS[:shift]:
                    if kind == 'keep all' and available_memory() < k * file_bytes * 1.1 + 2 * GiB:
                        log(f'  round {r + 1}, K={k}: keep all skipped ({available_memory() / GiB:.1f} GiB available)')
                        continue
                    time.sleep(1.0)
                    seconds, peak = measure_one(kind, files[:k], root, log)
                    results.setdefault((kind, k), []).append((seconds, peak))
                    log(f'  round {r + 1}/{args.rounds}, K={k:2d}, {kind:10s}: {seconds:6.1f} s, '
                        f'{seconds / k:5.2f} s/file, peak RSS {peak:6.0f} MiB  [load {os.getloadavg()[0]:.1f}]')
        summarise(results, ks, file_bytes / 2**20, log)
        if args.base_k:
            classnames = root / 'classnames.txt'
            classnames.write_text(''.join(f'thing number {i}\n' for i in range(CLASSES)))
            log('')
            seconds, peak = measure_one('import', files[:args.base_k], root, log, base=base, classnames=classnames)
            log(f'import --base (zero-shot head of {CLASSES} classes x 1 template), K={args.base_k}: {seconds:.1f} s, '
                f'peak RSS {peak:.0f} MiB  [load {os.getloadavg()[0]:.1f}]')
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log('')
    log('wall s: process start to exit (interpreter, imports, and for the import its hashing, conversion and '
        'writing included); peak RSS: ru_maxrss of that process alone.')
    log(f'load average {" ".join(f"{x:.2f}" for x in os.getloadavg())} at the end; '
        f'{time.perf_counter() - started:.0f} s in all')


if __name__ == '__main__':
    main()
