"""Reference run: ViT-Ti/16 from the ImageNet-21k AugReg .npz, fine-tuned on CIFAR-10 at 224 px.

    python -m soupjax.finetune \\
        --config configs/cifar10_vit_ti16.py:init=/path/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz

fine-tunes six ingredients (seeds 0-5), SGD with momentum, learning rate 0.003: the setting for
which the reference quotes best ingredient 96.83 and greedy soup 96.90 on CIFAR-10 test
(experiments/RESULTS.md; not reproduced here: this machine has neither the weights nor network).
Then ``python -m soupjax.soup --recipe all`` cooks them. experiments/reference_runs.md gives the
commands, where to get the weights, and the compute time per ingredient measured on an H100.

``model.gelu_approximate`` is the GELU the init weights were trained with: True (tanh, Flax's nn.gelu)
for the AugReg .npz, False (exact, as timm runs it) for a timm file such as
vit_tiny_patch16_224.augreg_in21k. Overriding it against the file is refused unless
``init_from.allow_activation_mismatch`` is set (soupjax.importers.activation.resolve_activation).

Options: init=PATH (the AugReg .npz; required outside testing), data_dir=DIR (TFDS data),
testing (a tiny model on 32 px images, a few steps: for tests under tfds.testing.mock_data),
seeds=N (number of ingredients, default 6).
"""
from soupjax.config.base import base_config, check_options, int_option, parse_options
from soupjax.importers.activation import checkpoint_activation


def get_config(arg: str | None = None):
    opts = parse_options(arg)
    check_options(opts, {"init", "data_dir", "testing", "seeds"}, "cifar10_vit_ti16")
    c = base_config()
    c.data.name = "cifar10"
    c.data.data_dir = opts.get("data_dir")
    c.data.image_size = 224
    c.data.channels = 3
    c.data.normalize = "inception"
    c.data.train_crop = "random_resized"
    c.data.heldout = 5000
    c.data.eval_crop_pct = 1.0
    c.model = {"name": "vit-ti/16", "gelu_approximate": _gelu_approximate(opts.get("init", ""))}
    c.init_from.path = opts.get("init", "")
    c.init_from.dont_load = ["head/.*"]

    c.optimizer = "sgd"
    c.learning_rate = 0.003
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.total_steps = 2000
    c.warmup_steps = 100
    c.batch_size = 512
    c.eval_batch_size = 512
    c.grad_clip_norm = 1.0
    c.checkpoint_every_steps = 500

    # Seeds 0-5: the same hyperparameters, different data order and augmentation (seed = index).
    c.sweep.count = int_option(opts, "seeds", 6, "cifar10_vit_ti16", minimum=1)
    c.sweep.seed = 0
    c.sweep.space = {}

    if opts.get("testing"):
        c.data.image_size = 32
        c.data.heldout = 8
        c.model = {"name": "vit-testing", "patch_size": 8,
                   "gelu_approximate": _gelu_approximate(opts.get("init", ""))}
        c.total_steps = 2
        c.warmup_steps = 1
        c.batch_size = 8
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 1
        c.sweep.count = int_option(opts, "seeds", 2, "cifar10_vit_ti16", minimum=1)
    return c


def _gelu_approximate(init: str) -> bool:
    """The GELU the init weights were trained with, written into the config so that every model built
    from it (fine-tuning, soups, evaluation) runs that function: the tanh approximation for the AugReg
    .npz this config is made for (vision_transformer's nn.gelu), the exact GELU for a timm file."""
    activation = checkpoint_activation(init) if init else None
    return activation.gelu_approximate if activation is not None else True
