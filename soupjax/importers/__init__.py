"""Pretrained weights from other codebases into soupjax's parameter trees: one module per source behind
one dispatch, and the strict merge that names every mismatched parameter.

    dispatch.py      load_pretrained(path, init_variables, ...): finds the file's source, reads it, merges
    sources/         one module per source, each defining SOURCE (found by themselves: a new source is one
                     module there plus its test); npz.py (vision_transformer / big_vision), timm.py
    merge.py         merge_params and PretrainedMismatchError: every missing, extra or misshaped parameter
    posemb.py        position-embedding resampling to the model's grid, as each source's own loader does
    activation.py    the GELU a checkpoint was trained with; resolve_activation when a run starts
    fingerprint.py   weights_fingerprint: the hash of a variables tree that ingredients record of their init
    timm_export.py   the way back: a soupjax ViT as a timm state dict
"""
