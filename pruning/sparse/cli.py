"""`trimserve prune sparse MODEL ...`: build a sparse variant with one calibrated pipeline."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from transformers import AutoConfig

from evaluation.data import calibration_windows, load_texts
from pruning.artifacts import (
    BaseModelRef,
    CalibrationRef,
    VariantManifest,
    check_output_dir,
    save_variant,
    sha256_file,
    staged_directory,
    weight_files,
    weights_sha256,
    write_manifest,
)
from pruning.blocks import LAYOUTS, UnsupportedArchitecture
from pruning.models import load_model, resolve_device, resolve_model
from pruning.sparse.masks import parse_pattern
from pruning.sparse.owl import OwlConfig
from pruning.sparse.pipeline import METHODS, SparseConfig, prune_model
from pruning.sparse.storage import COMPRESSED_PATH, save_compressed, unique_state
from pruning.sparse.trim import TrimConfig

log = logging.getLogger(__name__)

CHOICES = (*METHODS, "owl", "trim")


def register(prune_sub: argparse._SubParsersAction) -> None:
    p = prune_sub.add_parser(
        "sparse",
        help="unstructured or N:M sparsity (magnitude, Wanda, SparseGPT, OWL, TRIM)",
        description="Prune every linear of the decoder blocks, one block at a time from calibration data. "
        "--method owl is OWL+Wanda; trim is TRIM over --base scores (default wanda); --owl-lambda adds OWL "
        "layer ratios to any unstructured method.",
    )
    p.add_argument("model", help="directory, .gguf, hub id or built-in alias")
    p.add_argument("--method", required=True, choices=CHOICES)
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in [0, 1) (default 0.5, or N/M)")
    p.add_argument("--pattern", default=None, help="N:M pattern, e.g. 2:4 or 4:8 (magnitude, wanda, sparsegpt)")
    p.add_argument("--base", choices=METHODS, default="wanda", help="scores for owl/trim (default wanda)")
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL lambda (method owl: default 0.08)")
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier multiple M (default 5)")
    p.add_argument("--owl-nsamples", type=int, default=None, help="windows for OWL's dense pass (default all)")
    p.add_argument("--trim-tokens", choices=("last", "all"), default="last", help="TRIM metric tokens")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="inside a block, recompute inputs after each pruned group of linears (TRIM's input recalculation)",
    )
    p.add_argument("--calib", default="c4", help="calibration source (default c4; hub:c4 for the full shard)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument("--offload", action="store_true", help="keep the model in host memory; one block on --device")
    p.add_argument("--no-compressed", action="store_true", help="skip the compressed bitmask copy")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out", type=Path, required=True, help="variant directory to write")
    p.set_defaults(func=cmd_sparse)


def build_config(args: argparse.Namespace) -> SparseConfig:
    """The pruning settings from CLI arguments; raises ValueError on any invalid combination."""
    pattern = parse_pattern(args.pattern)
    if pattern and args.sparsity is not None and abs(args.sparsity - pattern[0] / pattern[1]) > 1e-9:
        raise ValueError(f"--pattern {args.pattern} sets sparsity {pattern[0] / pattern[1]}; drop --sparsity")
    sparsity = pattern[0] / pattern[1] if pattern else (0.5 if args.sparsity is None else args.sparsity)
    if args.method == "trim" and pattern:
        raise ValueError("--pattern cannot be combined with --method trim (row-varying sparsity is not N:M)")
    use_owl = args.method == "owl" or any(v is not None for v in (args.owl_lambda, args.owl_m, args.owl_nsamples))
    lam = 0.08 if args.owl_lambda is None else args.owl_lambda
    owl = OwlConfig(lam, args.owl_m or 5.0, args.owl_nsamples) if use_owl else None
    trim = TrimConfig(tokens=args.trim_tokens) if args.method == "trim" else None
    method = args.base if args.method in ("owl", "trim") else args.method
    return SparseConfig(method, sparsity, pattern, owl, trim, sequential=args.sequential)


def cmd_sparse(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.nsamples < 1 or args.seqlen < 2 or args.batch_size < 1:
        raise ValueError("--nsamples and --batch-size must be positive and --seqlen at least 2")
    device = resolve_device(args.device)
    source = resolve_model(args.model)
    model_type = AutoConfig.from_pretrained(source).model_type
    if model_type not in LAYOUTS:
        raise UnsupportedArchitecture(f"architecture {model_type!r} is not supported; supported: {sorted(LAYOUTS)}")
    manifest = VariantManifest(
        name=args.out.name,
        base=BaseModelRef(source=str(args.model), sha256=weights_sha256(source)),
        method=cfg.label.split(" ")[0],
        settings={**cfg.settings(), "dtype": args.dtype},
        calibration=CalibrationRef(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        if cfg.calibrated
        else None,
        seed=args.seed,
    )
    if check_output_dir(args.out, manifest):
        print(f"{args.out} already holds this variant; nothing to do")
        return 0
    texts = load_texts(args.calib) if cfg.calibrated else None
    model, tokenizer = load_model(args.model, args.dtype, "cpu" if args.offload else args.device)
    windows = calibration_windows(texts, tokenizer, args.nsamples, args.seqlen, args.seed) if cfg.calibrated else None
    report = prune_model(model, windows, cfg, device, args.offload, args.batch_size)
    model.to("cpu")
    lrs = [info["lr"] for info in report.layers.values() if "lr" in info]
    manifest.stats = {
        "block_sparsity": report.block_sparsity,
        "owl_outlier_ratios": report.outlier_ratios,
        "linears": report.layers,
        "trim_lr_counts": {str(lr): lrs.count(lr) for lr in sorted(set(lrs))} if lrs else None,
        "prune_seconds": report.seconds,
    }
    write_variant(model, tokenizer, args.out, manifest, compressed=not args.no_compressed)
    print(f"{cfg.label}: wrote {args.out} in {report.seconds:.0f} s of pruning")
    return 0


def write_variant(model, tokenizer, out_dir: Path, manifest: VariantManifest, compressed: bool) -> None:
    """Dense checkpoint (+ compressed copy) staged next to out_dir, then renamed into place."""
    with staged_directory(out_dir) as staging:
        manifest = save_variant(model, tokenizer, staging, manifest)
        storage = {"dense_bytes": sum(f.stat().st_size for f in weight_files(staging))}
        if compressed:
            storage["compressed_bytes"] = save_compressed(unique_state(model), staging / COMPRESSED_PATH)
            storage["compressed_file"] = COMPRESSED_PATH
            storage["compressed_sha256"] = sha256_file(staging / COMPRESSED_PATH)
        manifest.stats["storage"] = storage
        write_manifest(staging, manifest)
