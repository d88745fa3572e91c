"""Plain reference implementations (PyTorch, straight from the papers) that the
fast paths are tested and benchmarked against."""
