"""What every command line shares: bad input as one line (``errors``), absl flags and config files
(``flags``), periodic progress lines (``progress``)."""
