"""Word counts, split into modules that import each other."""
