"""The variant: a recipe turned into a checkpoint plus its manifest.

`format` (the manifest, hashes, atomic world-readable directories; no torch), `store` (where
models and variants live), `load` (the one loader), `write` and `compressed` (writing
checkpoints), `noop` (FFN-only blocks on disk), `recipes` (how a variant is made, as data) and
`build` (`build_variant`). It sits between `pruning` (the methods) and `service` (the server).
"""
