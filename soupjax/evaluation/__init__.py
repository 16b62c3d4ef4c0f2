"""Evaluating a model: the jitted data-parallel evaluator (``evaluate``) and BatchNorm recalibration of
a soup before it is evaluated (``batchnorm``)."""
