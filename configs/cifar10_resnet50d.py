"""Reference run: timm resnet50d (ImageNet weights) fine-tuned on CIFAR-10; BatchNorm soups.

    python -m soupjax.finetune --config configs/cifar10_resnet50d.py:init=/path/resnet50d.safetensors

fine-tunes six ingredients (seeds 0-5) with SGD, learning rate 0.1. The reference found that soups of
such BatchNorm ResNets degrade (greedy steps 14.55, 14.07, 9.08 with ingredients at about 91.3);
``python -m soupjax.soup --recipe all --recalibrate_bn 200`` measures whether recomputing the
BatchNorm statistics recovers them.

Options: init=PATH (timm resnet50d .safetensors/.pth; required outside testing), data_dir=DIR,
testing (resnet-testing on 32 px images, a few steps), seeds=N (default 6).
"""
from soupjax.config.base import base_config, check_options, int_option, parse_options


def get_config(arg: str | None = None):
    opts = parse_options(arg)
    check_options(opts, {"init", "data_dir", "testing", "seeds"}, "cifar10_resnet50d")
    c = base_config()
    c.data.name = "cifar10"
    c.data.data_dir = opts.get("data_dir")
    c.data.image_size = 224
    c.data.channels = 3
    c.data.normalize = "imagenet"
    c.data.train_crop = "random_resized"
    c.data.heldout = 5000
    c.data.eval_crop_pct = 1.0
    c.model = {"name": "resnet50d"}
    c.init_from.path = opts.get("init", "")
    c.init_from.dont_load = ["head/.*"]

    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-5
    c.total_steps = 2000
    c.warmup_steps = 100
    c.batch_size = 256
    c.eval_batch_size = 512
    c.grad_clip_norm = 0.0
    c.checkpoint_every_steps = 500

    c.sweep.count = int_option(opts, "seeds", 6, "cifar10_resnet50d", minimum=1)
    c.sweep.seed = 0
    c.sweep.space = {}

    if opts.get("testing"):
        c.data.image_size = 32
        c.data.heldout = 8
        c.model = {"name": "resnet-testing"}
        c.total_steps = 2
        c.warmup_steps = 1
        c.batch_size = 8
        c.eval_batch_size = 8
        c.log_every_steps = 1
        c.checkpoint_every_steps = 1
        c.sweep.count = int_option(opts, "seeds", 2, "cifar10_resnet50d", minimum=1)
    return c
