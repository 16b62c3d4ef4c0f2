"""Files and directories: atomic writes (``files``), ingredients and training state on disk
(``checkpoints``, the only module that imports orbax), work-directory layout (``workdirs``)."""
