"""Data: discovery, integrity scan, splits, decoding, preprocessing and transforms."""
