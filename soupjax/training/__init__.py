"""Fine-tuning: the shared start (``shared_init``, ``linear_probe``), the train step and loop
(``train_step``, ``train``), the plateau rule, and hyperparameter sweeps (``sweep``)."""
