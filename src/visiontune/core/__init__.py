"""The bottom layer: errors, registries, hardware choices and the run-dir layout.

Nothing here imports another visiontune layer; every other layer may import it.
"""
