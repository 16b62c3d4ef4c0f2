"""A paper-style random sweep: ViT-B/32 (AugReg .npz) fine-tuned on ImageNet, hyperparameters at random.

    python -m soupjax.finetune \\
        --config configs/imagenet_vit_b32.py:init=/path/B_32-i21k-...npz,data_dir=gs://BUCKET/tfds,sweep=32

Each ingredient draws its learning rate, weight decay, epochs, label smoothing, augmentation strength
and mixup as in the paper's random search (App. J of arXiv 2203.05482), all from the same init.
The held-out split is 2% of the ImageNet training set, as in the paper. Evaluation reports ImageNet
and, where prepared in data_dir, ImageNet-V2, -R, -A and -Sketch.

``model.gelu_approximate`` is the GELU the init weights were trained with: True (tanh, Flax's nn.gelu)
for the AugReg .npz, False (exact, as timm runs it) for a timm file such as
vit_base_patch32_224.augreg_in21k; overriding it against the file is refused unless
``init_from.allow_activation_mismatch`` is set. Commands, weights and measured compute time:
experiments/reference_runs.md.

Options: init=PATH, data_dir=DIR, sweep=K (default 32), seed=N, testing.
"""
from soupjax.config.base import base_config, check_options, int_option, parse_options
from soupjax.importers.activation import checkpoint_activation


def get_config(arg: str | None = None):
    opts = parse_options(arg)
    check_options(opts, {"init", "data_dir", "sweep", "seed", "testing"}, "imagenet_vit_b32")
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.data_dir = opts.get("data_dir")
    c.data.image_size = 224
    c.data.channels = 3
    c.data.normalize = "inception"
    c.data.train_crop = "random_resized"
    c.data.heldout = 0.02
    c.data.eval_crop_pct = 0.875
    c.data.shifts = ["imagenet_v2", "imagenet_r", "imagenet_a", "imagenet_sketch"]
    c.model = {"name": "vit-b/32", "gelu_approximate": _gelu_approximate(opts.get("init", ""))}
    c.init_from.path = opts.get("init", "")

    c.optimizer = "adamw"
    c.learning_rate = 3e-5
    c.weight_decay = 0.1
    c.num_epochs = 10.0
    c.warmup_steps = 500
    c.batch_size = 512
    c.eval_batch_size = 1024
    c.grad_clip_norm = 1.0
    c.checkpoint_every_steps = 1000

    c.sweep.count = int_option(opts, "sweep", 32, "imagenet_vit_b32")
    c.sweep.seed = int_option(opts, "seed", 0, "imagenet_vit_b32")
    c.sweep.space = {
        "learning_rate": ["log_uniform", 1e-5, 3e-4],
        "weight_decay": ["log_uniform", 1e-4, 0.1],
        "num_epochs": ["choice", [4.0, 6.0, 8.0, 10.0]],
        "label_smoothing": ["choice", [0.0, 0.1]],
        "data": {"aug_strength": ["choice", [0.0, 0.5, 1.0]], "mixup_alpha": ["choice", [0.0, 0.2, 0.5]]},
    }

    if opts.get("testing"):
        c.data.image_size = 32
        c.data.heldout = 8
        c.data.shifts = []
        c.model = {"name": "vit-testing", "patch_size": 8,
                   "gelu_approximate": _gelu_approximate(opts.get("init", ""))}
        c.num_epochs = 1.0
        c.total_steps = 2
        c.warmup_steps = 1
        c.batch_size = 8
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 1
        c.sweep.count = int_option(opts, "sweep", 2, "imagenet_vit_b32")
        del c.sweep.space["num_epochs"]
    return c


def _gelu_approximate(init: str) -> bool:
    """The GELU the init weights were trained with, written into the config so that every model built
    from it (fine-tuning, soups, evaluation) runs that function: the tanh approximation for the AugReg
    .npz this config is made for (vision_transformer's nn.gelu), the exact GELU for a timm file."""
    activation = checkpoint_activation(init) if init else None
    return activation.gelu_approximate if activation is not None else True
