"""Run configs: the fields every training config has, ``:key=value`` options, loading and checking
config files, and comparing two configs (``base``)."""
