"""Pretrained weights from other codebases into soupjax's parameter trees: one module per source behind
one dispatch, and the strict merge that names every mismatched parameter."""
