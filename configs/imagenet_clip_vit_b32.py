"""The model-soups paper's own setting: CLIP ViT-B/32 fine-tuned on ImageNet from its zero-shot head.

    python -m soupjax.finetune --config configs/imagenet_clip_vit_b32.py:init=/path/ViT-B-32.pt,\\
        classnames=/path/imagenet_classnames.txt,templates=/path/openai_templates.txt,data_dir=gs://BUCKET/tfds,sweep=72

``init`` is a CLIP checkpoint as users keep it: OpenAI's ``ViT-B-32.pt`` (a TorchScript archive, read
without running it), an open_clip ``.bin``/``.safetensors``, or a Hugging Face ``CLIPModel`` directory;
the tokenizer is read from the files beside it, or from ``tokenizer=FILE`` (e.g. the
``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships). The start is CLIP's zero-shot classifier
(``head_init='zeroshot'``: 100 x the normalised class vectors, applied to normalised image features, as
the official ``zeroshot.py``/``finetune.py``); WiSE-FT's θ0 is that zero-shot model. The paper used
OpenAI's curated ImageNet class names and its 80 templates; open_clip ships both, and README shows the
two lines that write them to the files given here (imagenet2012's own TFDS label names are WordNet ids).

Each ingredient draws its hyperparameters as the paper's random search does (App. J of arXiv
2203.05482): AdamW, batch 512, cosine schedule with 500 warm-up steps, and per ingredient a learning
rate, weight decay, epochs, label smoothing, RandAugment and mixup, with the ranges of the 71 released
runs (``hparam_info.json`` of mlfoundations/model-soups: lr 1.0e-6..1.0e-4, weight decay 8.2e-5..0.53,
epochs 4..16, label smoothing 0..0.23 in about half of them, mixup 0..0.88 in about half).

Augmentation, from those records (the appendix's own wording was not at hand): each run's ``aug`` is
null (27 of 71) or a timm RandAugment string ``rand-mM-nN`` (44), with N = 0, 1, 2 (21, 18, 5 runs)
and M from 1 to 20, drawn independently of mixup (runs with both exist). So the draw here is
``data.randaugment_ops`` N with the records' frequencies (none and N = 0, both the identity, 48 of 71;
N = 1, 18; N = 2, 5) and M uniform in 1..20 as ``data.randaugment_magnitude`` = bin 3 min(M, 10) of
torchvision's 31 (timm reads M out of 10 and clips above; its geometric ops and Solarize then match,
its enhancement ops and Posterize scale differently, and it applies each op with probability 1/2:
soupjax's RandAugment is torchvision's, see soupjax/data/randaugment.py). Every run keeps the standard
Inception crop (``data.aug_strength`` 1: area 8-100%, aspect 3/4-4/3) and a flip; whether the paper's
``aug: null`` runs had one (the public finetune.py trains on CLIP's evaluation transform without
``--timm-aug``, and timm's training transform adds colour jitter when RandAugment is off) is not recorded.
2% of ImageNet's training set is held out, as in the paper. The distribution shifts are ImageNet-V2, -R,
-A and -Sketch where prepared in TFDS; ObjectNet, the paper's fifth, is not in TFDS.

Preprocessing is CLIP's: bicubic resize of the shorter side to 224, centre crop, CLIP's mean and
standard deviation (random resized crops of the same interpolation for training).

Options: init=PATH (required outside testing), classnames=FILE, templates=FILE, tokenizer=FILE,
data_dir=DIR, sweep=K (default 72), seed=N, testing (a tiny CLIP on 32 px images, a few steps).
"""
from soupjax.config.base import base_config, check_options, int_option, parse_options

import ml_collections


def get_config(arg: str | None = None):
    opts = parse_options(arg)
    check_options(opts, {"init", "classnames", "templates", "tokenizer", "data_dir", "sweep", "seed", "testing"},
                  "imagenet_clip_vit_b32")
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.data_dir = opts.get("data_dir")
    c.data.image_size = 224
    c.data.channels = 3
    c.data.normalize = "clip"
    c.data.resize_method = "bicubic"
    c.data.train_crop = "random_resized"
    c.data.aug_strength = 1.0  # the standard Inception crop in every run (RandAugment and mixup are drawn)
    c.data.eval_resize = "shorter_side"
    c.data.eval_crop_pct = 1.0
    c.data.heldout = 0.02
    c.data.shifts = ["imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch"]
    # The activation is the checkpoint's (OpenAI's weights: QuickGELU), resolved when the run starts.
    c.model = {"name": "clip-vit-b/32"}
    c.init_from.path = opts.get("init", "")
    c.init_from.dont_load = ["head/.*"]
    c.head_init = "zeroshot"
    c.zeroshot = ml_collections.ConfigDict({
        "classnames": opts.get("classnames", ""),  # '' = the data set's label names
        "templates": opts.get("templates", ""),    # '' = "a photo of a {}."
        "tokenizer": opts.get("tokenizer", ""),    # '' = the files beside the checkpoint
    })

    c.optimizer = "adamw"
    c.learning_rate = 3e-5
    c.weight_decay = 0.1
    c.num_epochs = 10.0
    c.lr_schedule = "cosine"
    c.warmup_steps = 500
    c.batch_size = 512
    c.eval_batch_size = 1024
    c.checkpoint_every_steps = 1000

    c.sweep.count = int_option(opts, "sweep", 72, "imagenet_clip_vit_b32")
    c.sweep.seed = int_option(opts, "seed", 0, "imagenet_clip_vit_b32")
    c.sweep.space = {
        "learning_rate": ["log_uniform", 1e-6, 1e-4],
        "weight_decay": ["log_uniform", 8e-5, 0.53],
        "num_epochs": ["choice", [float(e) for e in range(4, 17)]],
        # About half of the released runs have no label smoothing and half no mixup.
        "label_smoothing": ["choice", [0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2]],
        # RandAugment's N with the released runs' frequencies (no RandAugment or N = 0: 48 of 71), and
        # their M (1..20 on timm's scale, clipped at 10) as a bin of torchvision's 31.
        "data": {"randaugment_ops": ["choice", [0] * 48 + [1] * 18 + [2] * 5],
                 "randaugment_magnitude": ["choice", [3 * min(m, 10) for m in range(1, 21)]],
                 "mixup_alpha": ["choice", [0.0, 0.0, 0.0, 0.2, 0.4, 0.6, 0.8]]},
    }

    if opts.get("testing"):
        c.data.image_size = 32
        c.data.heldout = 8
        c.data.shifts = []
        # The tiny CLIP of tests/clip_files.py (the sizes of its file are checked against these).
        c.model = {"name": "clip-testing", "patch_size": 8, "width": 64, "layers": 2, "heads": 1, "embed_dim": 16}
        c.num_epochs = 1.0
        c.total_steps = 2
        c.warmup_steps = 1
        c.batch_size = 8
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 1
        c.sweep.count = int_option(opts, "sweep", 2, "imagenet_clip_vit_b32")
        del c.sweep.space["num_epochs"]
    return c
