"""Import released fine-tuned models as soupjax ingredients.

    python -m soupjax.import_ingredients --format model-soups --out DIR --base ViT-B-32.pt model_*.pt
    python -m soupjax.soup --ingredients DIR --recipe all

``--format model-soups``: the official model-soups ``model_{i}.pt`` files (mlfoundations/model-soups,
CLIP ViT-B/32 fine-tuned on ImageNet). Each becomes ``DIR/<stem>``, an ingredient as fine-tuning writes
it (meta.json + orbax variables), recording the file and its sha256. ``--config`` is the run config they
were fine-tuned with (model, data, class names; default configs/imagenet_clip_vit_b32.py). ``--base`` is
the CLIP they were fine-tuned from (OpenAI's ``ViT-B-32.pt``): it writes ``DIR/start``, the zero-shot
start (its image tower and 100 x CLIP's zero-shot head of ``--classnames`` in ``--templates``), which the
merges and WiSE-FT take as θ0; without it the soups still cook and the merges say why they cannot.

A rerun skips the files already imported (same sha256, same settings): an interrupted import resumes.
Bad input (a missing file, one that is not a model-soups file, files of different sizes, a config whose
model is not the files') ends in one line, ``soupjax.import_ingredients: error: ...``, exit status 2,
before anything is written. The work is done by ``soupjax.importers.model_soups``.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from soupjax.cli import flags as command_line
from soupjax.cli.errors import InputError, exit_on_input_error
from soupjax.cli.startup import prepare_process

PROGRAM = "soupjax.import_ingredients"
FORMATS = ("model-soups",)
FLAGS = flags.FLAGS
flags.DEFINE_enum("format", None, list(FORMATS), "The files' format: 'model-soups', the official "
                  "ModelWrapper state dicts (model_{i}.pt). Required.")
flags.DEFINE_string("out", None, "The ingredients' directory to write (DIR/<file stem> each; DIR/start with "
                    "--base). Required.")
flags.DEFINE_string("base", None, "The CLIP the files were fine-tuned from (OpenAI's ViT-B-32.pt, an open_clip "
                    "file or a transformers directory): writes DIR/start, the zero-shot start the merges and "
                    "WiSE-FT need. Default: the config's init_from.path; none, no start.")
command_line.define_config_file("config", "The run config the files were fine-tuned with (model, data, zero-shot "
                                "options), FILE[:options]; default configs/imagenet_clip_vit_b32.py.")
flags.DEFINE_string("classnames", None, "Class names for the zero-shot start, one a line in label order "
                    "(default: the config's zeroshot.classnames, else the data set's label names).")
flags.DEFINE_string("templates", None, "Templates for the zero-shot start, one a line with '{}' for the class "
                    "name (default: the config's zeroshot.templates, else 'a photo of a {}.').")
flags.DEFINE_string("tokenizer", None, "CLIP's tokenizer file (bpe_simple_vocab_16e6.txt.gz, vocab.json, "
                    "tokenizer.json; default: the config's zeroshot.tokenizer, else the files beside --base).")
flags.DEFINE_bool("overwrite", False, "Replace ingredients in --out of the same name imported from other files "
                  "(refused otherwise).")


def main(argv) -> int:
    files = argv[1:]
    if FLAGS.format is None:
        raise InputError(f"--format is required: one of {', '.join(FORMATS)}")
    if not FLAGS.out:
        raise InputError("--out is required: the directory the ingredients are written to")
    if not files:
        raise InputError("no files to import: give them after the flags, e.g. model_0.pt model_1.pt ...")
    from soupjax.config.base import check_config
    if FLAGS.config is not None:
        check_config(FLAGS.config)  # again: --config.FIELD overrides may have changed it
    out = Path(FLAGS.out).absolute()
    print(f"{PROGRAM}: {len(files)} {FLAGS.format} files into {out}", flush=True)
    from soupjax.importers.model_soups import import_model_soups
    written = import_model_soups(files, out, config=FLAGS.config, base=FLAGS.base, classnames=FLAGS.classnames,
                                 templates=FLAGS.templates, tokenizer=FLAGS.tokenizer, overwrite=FLAGS.overwrite)
    from soupjax.io.checkpoints import load_meta
    has_start = bool(written) and "start_fingerprint" in load_meta(written[0])
    start = f"with their start {out / 'start'}" if has_start else "without a start (no --base: no merges, no WiSE-FT)"
    print(f"{PROGRAM}: {len(written)} ingredients in {out}, {start}; cook them with "
          f"python -m soupjax.soup --ingredients {out}", flush=True)
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, the files left as positional arguments; a bad flag, config or override ends in one
    line as in every soupjax command (``cli.flags.flags_parser``, which refuses positional arguments and
    is only asked to report)."""
    try:
        return FLAGS(argv)
    except Exception:
        command_line.flags_parser(PROGRAM)(argv)  # exits with the one-line message when it names the problem
        raise


def run() -> None:
    prepare_process()
    app.run(exit_on_input_error(PROGRAM, main), flags_parser=parse_flags)


if __name__ == "__main__":
    run()
