"""Models: build by name, layer groups, safe weight files, self-describing artifacts (model cards)."""
