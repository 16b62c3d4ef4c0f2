"""The arithmetic over parameter trees: soups (running means, greedy, pruned), per-tensor merges over
displacements from the shared init, and the learned soup's mixing problem."""
