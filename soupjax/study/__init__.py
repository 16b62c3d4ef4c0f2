"""The study: what ``python -m soupjax.experiment`` runs, stage by stage (``stages``)."""
