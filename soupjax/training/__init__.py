"""Fine-tuning: the shared start (``shared_init``, ``linear_probe``), the train step and loop
(``train_step``, ``train``), the plateau rule, hyperparameter sweeps (``sweep``: the draws) and the work
directory's plan (``planning``: which runs to fine-tune, skip, resume or replace)."""
