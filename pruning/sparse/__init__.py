"""Unstructured and N:M sparsity: magnitude, Wanda, SparseGPT, OWL layer ratios and TRIM row allocation.

Each method module holds pure functions of (weight, calibration statistics, settings) that return
a keep-mask or a new weight; `calibration` collects the statistics, `pipeline` runs the
sequential block-wise calibration, `storage` writes the compressed bitmask format, and `cli`
registers `trimserve prune sparse`.
"""
