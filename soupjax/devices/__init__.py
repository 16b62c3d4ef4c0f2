"""The machine: the 1-D ``("data",)`` mesh over every device, single- or multi-host (``sharding``), and
the peak host memory of a piece of work (``memory``)."""
