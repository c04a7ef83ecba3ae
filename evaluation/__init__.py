"""Text sources, question sets and the scores variants are measured by: perplexity and multiple-choice
accuracy (also the calibration text pruning reads)."""
