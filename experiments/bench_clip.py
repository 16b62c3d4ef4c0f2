"""CLIP ViT-B/32 image-tower inference: soupjax (Flax, jitted) against open_clip (PyTorch) on this machine.

    python experiments/bench_clip.py --batches 8,32 --rounds 5

Weights: open_clip's own random init (`open_clip.create_model('ViT-B-32', pretrained=None)`, seed 0, float32,
the exact GELU of open_clip's LAION configs) written as a `.safetensors` state dict with the
`open_clip_config.json` that open_clip's Hub export puts beside it, in a temporary directory. Both sides
load that one file:
  soupjax     `importers.clip_checkpoint.read_clip(FILE, text=False)` (the activation, gelu_exact, comes from
              the config beside the file), `ckpt.image_encoder()`, `jax.jit(model.apply)` with the params
              as an argument (not baked into the program as constants); NHWC float32 images.
  open_clip   `open_clip.create_model('ViT-B-32', pretrained=None)`, `load_state_dict` (strict) of the same
              file through `safetensors.torch.load_file`, its `.visual` kept and the text tower dropped,
              `.eval()`, called under `torch.inference_mode()`; NCHW float32 images.
  torch.compile  the same open_clip tower through `torch.compile` (inductor, default mode, dynamic=False so
              each batch size gets its own static graph); --no_torch_compile leaves it out (its first call
              per batch size compiles for about a minute on 2 cores).
Each contender lives in its own worker process (its own memory, thread pools and compile cache), started
once and driven over a pipe, so a round costs no start-up. Warm-up, excluded from the figures: every
contender runs every batch size --warmup times first (the first call compiles).

Measurement, interleaved: for each of --rounds rounds and each batch size, the contenders run one after the
other in an order that rotates with the round (so a slow spell of the shared machine does not always fall
on the same one), each doing ceil(--images / batch) calls on fixed random images, timed from the first
call to the end of the last (`block_until_ready` / the returned tensor); 0.5 s of idle time between two
contenders lets the previous one's spinning threads (OpenMP, Eigen) go to sleep. Reported per contender
and batch size: the median images/s over the rounds and its range, the ratio of the medians soupjax /
open_clip, and the median of the per-round ratios (the steadier figure on a shared machine: both sides of
a round see about the same load). Memory: each worker's resident set after warm-up (VmRSS) and its peak
(VmHWM, loading included: open_clip's peak includes the text tower create_model builds and the script drops).
Agreement: each worker's features (the image tower's output, unnormalised, [8, 512]) for the same 8 random
images, max |difference| against open_clip eager. Also logged: each measurement's CPU time (all the worker's threads; OpenMP threads that spin
waiting for a descheduled sibling count too). The load average goes in the log at the start and end.
Everything printed also goes to --log.
"""
from __future__ import annotations

import argparse
import json
import math
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
CHECK_IMAGES = 8
IMAGE_SIZE = 224


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its peak (VmHWM), MiB."""
    with open('/proc/self/status') as f:
        got = {line.split(':')[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(('VmRSS', 'VmHWM'))}
    return {'rss_mb': got['VmRSS'], 'peak_mb': got['VmHWM']}


class SoupjaxSide:
    """soupjax's CLIP image tower read by read_clip from the benchmark's file, jitted."""

    def __init__(self, weights: Path):
        import jax
        import jax.numpy as jnp

        from soupjax.importers.clip_checkpoint import read_clip
        self.jax, self.jnp = jax, jnp
        ckpt = read_clip(weights, text=False)
        self.described = (f'read_clip: {ckpt.format}, activation {ckpt.activation} ({ckpt.activation_source}), '
                          f'vision {ckpt.vision}; jax {jax.__version__} on {jax.devices()[0].platform}')
        model = ckpt.image_encoder()
        self.params = jax.device_put(ckpt.image_params)
        self.forward = jax.jit(lambda params, images: model.apply({'params': params}, images))
        self.inputs: dict[int, object] = {}

    def prepare(self, batch: int) -> None:
        import numpy as np
        images = np.random.default_rng(batch).standard_normal((batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype='float32')
        self.inputs[batch] = self.jax.device_put(images)

    def run(self, batch: int) -> None:
        self.forward(self.params, self.inputs[batch]).block_until_ready()

    def features(self, images_nchw) -> list:
        import numpy as np
        out = self.forward(self.params, self.jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1))))
        return np.asarray(out).tolist()


class TorchSide:
    """open_clip's ViT-B-32 image tower with the benchmark's weights, eager or through torch.compile."""

    def __init__(self, weights: Path, compiled: bool):
        import open_clip
        import torch
        from safetensors.torch import load_file
        self.torch = torch
        model = open_clip.create_model(MODEL, pretrained=None)
        model.load_state_dict(load_file(str(weights)), strict=True)
        self.visual = model.visual.eval()
        del model
        self.forward = (torch.compile(self.visual, dynamic=False) if compiled else self.visual)
        self.described = (f'open_clip {open_clip.__version__}, torch {torch.__version__}, '
                          f'{torch.get_num_threads()} intra-op threads'
                          + (', torch.compile (inductor, dynamic=False)' if compiled else ', eager'))
        self.inputs: dict[int, object] = {}

    def prepare(self, batch: int) -> None:
        gen = self.torch.Generator().manual_seed(batch)
        self.inputs[batch] = self.torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)

    def run(self, batch: int) -> None:
        with self.torch.inference_mode():
            self.forward(self.inputs[batch])

    def features(self, images_nchw) -> list:
        with self.torch.inference_mode():
            return self.forward(self.torch.from_numpy(images_nchw)).numpy().tolist()


def worker(kind: str, weights: Path) -> None:
    """A contender's process: builds its side, then answers one JSON command per stdin line."""
    started = time.perf_counter()
    side = SoupjaxSide(weights) if kind == 'soupjax' else TorchSide(weights, compiled=kind == 'torch.compile')
    reply = {'described': side.described, 'load_s': time.perf_counter() - started, **memory_mb()}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command['op']
        if op == 'warmup':  # every call timed, so the log shows what the first (compiling) call cost
            side.prepare(command['batch'])
            calls = []
            for _ in range(command['calls']):
                t = time.perf_counter()
                side.run(command['batch'])
                calls.append(time.perf_counter() - t)
            reply = {'calls_s': calls, **memory_mb()}
        elif op == 'time':
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(command['calls']):
                side.run(command['batch'])
            reply = {'seconds': time.perf_counter() - t, 'cpu_s': time.process_time() - cpu}
        elif op == 'features':
            import numpy as np
            reply = {'features': side.features(np.load(command['images']))}
        elif op == 'memory':
            reply = memory_mb()
        else:
            break
        print(json.dumps(reply), flush=True)


class Contender:
    """The parent's handle on one worker process."""

    def __init__(self, kind: str, weights: Path):
        self.kind = kind
        env = {**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu'), 'TF_CPP_MIN_LOG_LEVEL': '2'}
        self.proc = subprocess.Popen([sys.executable, __file__, '--worker', kind, str(weights)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith('{'):
                return json.loads(line)
        raise RuntimeError(f'{self.kind} worker ended (exit {self.proc.wait()}); its stderr is above')

    def ask(self, **command: object) -> dict:
        self.proc.stdin.write(json.dumps(command) + '\n')
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({'op': 'quit'}) + '\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def write_weights(root: Path) -> tuple[Path, float, int]:
    """open_clip's random ViT-B-32 as a .safetensors state dict + open_clip_config.json; (file, s, bytes)."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    t = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    # open_clip's Hub export writes {'model_cfg': ..., 'preprocess_cfg': ...}; read_clip reads model_cfg.
    (root / 'open_clip_config.json').write_text(json.dumps({'model_cfg': open_clip.get_model_config(MODEL)}))
    path = root / 'open_clip_model.safetensors'
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    visual_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith('visual.'))
    return path, time.perf_counter() - t, visual_bytes


def check_features(contenders: list[Contender], root: Path) -> dict[str, tuple[float, float]]:
    """Each contender's features of the same images against open_clip eager: {kind: (max |diff|, max |f|)}."""
    import numpy as np
    images = np.random.default_rng(1).standard_normal((CHECK_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    np.save(root / 'check.npy', images)
    got = {c.kind: np.asarray(c.ask(op='features', images=str(root / 'check.npy'))['features'], np.float32)
           for c in contenders}
    ref = got['open_clip']
    return {kind: (float(np.abs(f - ref).max()), float(np.abs(ref).max())) for kind, f in got.items()
            if kind != 'open_clip'}


def measure(contenders: list[Contender], batches: list[int], args: argparse.Namespace,
            log: Tee) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], list[float]]]:
    """The interleaved rounds: {(kind, batch): images/s of each round}, {(kind, batch): CPU s per image}."""
    rates: dict[tuple[str, int], list[float]] = {(c.kind, b): [] for c in contenders for b in batches}
    cpu: dict[tuple[str, int], list[float]] = {(c.kind, b): [] for c in contenders for b in batches}
    for r in range(args.rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        for b in batches:
            calls = math.ceil(args.images / b)
            line = []
            for c in order:
                time.sleep(0.5)
                got = c.ask(op='time', batch=b, calls=calls)
                seconds = got['seconds']
                rates[(c.kind, b)].append(calls * b / seconds)
                cpu[(c.kind, b)].append(got['cpu_s'] / (calls * b))
                line.append(f'{c.kind} {calls * b / seconds:5.2f} img/s ({calls} x {b} in {seconds:.1f} s, '
                            f'CPU {got["cpu_s"]:.1f} s)')
            log(f'  round {r + 1}/{args.rounds}, batch {b}: ' + '; '.join(line)
                + f'  [load {os.getloadavg()[0]:.1f}]')
    return rates, cpu


def summarise(rates: dict[tuple[str, int], list[float]], cpu: dict[tuple[str, int], list[float]], kinds: list[str], batches: list[int],
              memory: dict[str, dict], diffs: dict[str, tuple[float, float]], log: Tee) -> None:
    """The table: median images/s, range, the two ratios against open_clip eager, memory, agreement."""
    log('')
    log('| batch | contender | img/s (median) | img/s range | soupjax / it, medians | soupjax / it, per round '
        '(median) | CPU s / image (median) | RSS after warm-up MiB | peak RSS MiB | max abs diff vs open_clip |')
    log('|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    for b in batches:
        ours = rates[('soupjax', b)]
        for kind in kinds:
            mine = rates[(kind, b)]
            med = statistics.median(mine)
            if kind == 'soupjax':
                ratio = per_round = ''
            else:
                ratio = f'{statistics.median(ours) / med:.2f}'
                per_round = f'{statistics.median(o / m for o, m in zip(ours, mine)):.2f}'
            diff = f'{diffs[kind][0]:.1e}' if kind in diffs else ('(reference)' if kind == 'open_clip' else '')
            log(f'| {b} | {kind} | {med:.2f} | {min(mine):.2f}-{max(mine):.2f} | {ratio} | {per_round} '
                f'| {statistics.median(cpu[(kind, b)]):.2f} | {memory[kind]["after_warmup_mb"]:.0f} | {memory[kind]["peak_mb"]:.0f} | {diff} |')


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--worker':
        worker(sys.argv[2], Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batches', default='8,32')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--images', type=int, default=16, help='images per measurement (ceil(images/batch) calls)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls per batch size before the rounds')
    parser.add_argument('--no_torch_compile', action='store_true', help='leave torch.compile out')
    parser.add_argument('--log', default=str(REPO / 'experiments' / 'results' / 'bench_clip.log'))
    args = parser.parse_args()
    batches = [int(x) for x in args.batches.split(',')]
    log = Tee(Path(args.log))
    log('$ ' + ' '.join(['python', *sys.argv]))
    log(machine_line())
    kinds = ['soupjax', 'open_clip'] + ([] if args.no_torch_compile else ['torch.compile'])
    root = Path(tempfile.mkdtemp(prefix='bench_clip-'))
    contenders: list[Contender] = []
    started = time.perf_counter()
    try:
        weights, made, visual_bytes = write_weights(root)
        log(f'{MODEL} random init written in {made:.1f} s to {weights.name} ({weights.stat().st_size / 2**20:.0f} MiB, '
            f'image tower {visual_bytes / 2**20:.0f} MiB float32) with open_clip_config.json beside it')
        for kind in kinds:
            contenders.append(Contender(kind, weights))
            ready = contenders[-1].ready
            log(f'{kind}: ready in {ready["load_s"]:.1f} s, RSS {ready["rss_mb"]:.0f} MiB; {ready["described"]}')
        memory = {}
        for c in contenders:
            for b in batches:
                got = c.ask(op='warmup', batch=b, calls=args.warmup)
                log(f'  warm-up {c.kind}, batch {b}: calls ' + ', '.join(f'{s:.1f}' for s in got['calls_s'])
                    + ' s (excluded)')
            memory[c.kind] = {'after_warmup_mb': got['rss_mb']}
        diffs = check_features(contenders, root)
        for kind, (worst, scale) in diffs.items():
            log(f'features of {CHECK_IMAGES} images, {kind} vs open_clip eager: max |diff| {worst:.2e} '
                f'(max |feature| {scale:.2f})')
        log(f'{args.rounds} interleaved rounds, {args.images} images per measurement, order rotating:')
        rates, cpu = measure(contenders, batches, args, log)
        for c in contenders:
            memory[c.kind]['peak_mb'] = c.ask(op='memory')['peak_mb']
    finally:
        for c in contenders:
            c.close()
        shutil.rmtree(root, ignore_errors=True)
    summarise(rates, cpu, kinds, batches, memory, diffs, log)
    log('')
    log(f'img/s: median over {args.rounds} rounds; "soupjax / it": above 1 means soupjax is faster. RSS: each '
        f'worker process as a whole (imports, weights, compiled code); peak includes loading. CPU s / image: '
        f"the worker's CPU time (all its threads, spinning included) over the images of a measurement.")
    log(f'load average {" ".join(f"{x:.2f}" for x in os.getloadavg())} at the end; '
        f'{time.perf_counter() - started:.0f} s in all')


if __name__ == '__main__':
    main()
