"""`trimserve prune depth ...` and `trimserve prune depth-scan ...`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from evaluation.data import calibration_windows, load_texts
from pruning.artifacts import (
    BaseModelRef,
    CalibrationRef,
    VariantManifest,
    check_output_dir,
    save_variant,
    weights_sha256,
)
from pruning.blocks import capture_block_inputs, decoder_layers
from pruning.depth.charts import plot_scan, plot_trajectory
from pruning.depth.criteria import check_window, scan_scores, sleb_greedy
from pruning.depth.pipeline import METHODS, DepthSettings, prune_depth
from pruning.depth.states import depth_states
from pruning.depth.streamline import LOSSES, REPLACEMENTS, StreamlineConfig
from pruning.depth.trimllm import TrimLLMConfig
from pruning.models import load_model, resolve_model

log = logging.getLogger(__name__)


def register(prune_sub: argparse._SubParsersAction, add_model_options) -> None:
    depth = prune_sub.add_parser(
        "depth",
        help="remove whole layers (ShortGPT, angular, SLEB, LLM-Streamline, TrimLLM)",
        description="--remove k is the net number of layers removed; Streamline replaces a window of k+1 "
        "layers by one trained block (layer: a standard checkpoint; ffn: loads only through trimserve).",
    )
    depth.add_argument("model")
    depth.add_argument("--method", required=True, choices=METHODS)
    depth.add_argument("--remove", type=int, required=True, metavar="K", help="net number of layers removed")
    depth.add_argument("--replacement", default="layer", choices=REPLACEMENTS, help="streamline block (layer)")
    depth.add_argument(
        "--loss",
        default="mse",
        choices=LOSSES,
        help="streamline training loss (mse; kd: distil the full model; mse+lm, mse+kd: both in turn)",
    )
    depth.add_argument("--epochs", type=int, default=1, help="streamline training epochs (1)")
    depth.add_argument("--lm-epochs", type=int, default=1, help="streamline LM/KD epochs after mse (mse+lm, mse+kd)")
    depth.add_argument("--lr", type=float, default=None, help="learning rate (streamline 2e-4, trimllm 1e-4)")
    depth.add_argument(
        "--bf16-autocast", action="store_true", help="streamline: bf16 mixed-precision training (fp32 weights)"
    )
    depth.add_argument(
        "--kd-token-fraction",
        type=float,
        default=1.0,
        help="streamline kd: share of positions distilled per step (1.0; lower runs the head on fewer tokens)",
    )
    depth.add_argument("--domain", default=None, help="trimllm domain text: source name or .txt/.jsonl path")
    depth.add_argument("--steps-per-round", type=int, default=10, help="trimllm fine-tuning steps per drop (10)")
    depth.add_argument("--final-steps", type=int, default=0, help="trimllm fine-tuning steps after the last drop")
    depth.add_argument("--trainable-fraction", type=float, default=0.25, help="trimllm trainable layers (0.25)")
    depth.add_argument("--no-train-head", action="store_true", help="trimllm: keep final norm and head frozen")
    depth.add_argument("--heldout-windows", type=int, default=2, help="trimllm held-out slice, in windows (2)")
    depth.add_argument(
        "--track-wikitext",
        type=int,
        default=0,
        metavar="N",
        help="trimllm: WikiText-2 ppl on the first N windows of --seqlen after every drop (0: off)",
    )
    depth.add_argument("--quality-floor", type=float, default=None, help="trimllm: stop above this ppl ratio")
    _calibration_options(depth)
    depth.add_argument("--out", type=Path, required=True, help="variant directory")
    add_model_options(depth)
    depth.set_defaults(func=cmd_depth)

    scan = prune_sub.add_parser("depth-scan", help="print and chart per-layer and per-window depth criteria")
    scan.add_argument("model")
    scan.add_argument("--window", type=int, action="append", default=None, help="window size (repeatable; 8)")
    scan.add_argument("--sleb", type=int, default=0, metavar="K", help="also run SLEB's greedy removal of K")
    _calibration_options(scan)
    scan.add_argument("--out", type=Path, required=True, help="directory for scores.json and scores.png")
    add_model_options(scan)
    scan.set_defaults(func=cmd_scan)


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib", default="c4", help="calibration text source (default c4; hub:c4 for the full shard)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (32)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length (512)")
    parser.add_argument("--seed", type=int, default=0)


def settings_from_args(args: argparse.Namespace) -> DepthSettings:
    streamline = trimllm = None
    if args.method == "streamline":
        extra = {"lr": args.lr, "lr_min": min(5e-5, args.lr)} if args.lr else {}
        streamline = StreamlineConfig(
            remove=args.remove,
            replacement=args.replacement,
            loss=args.loss,
            epochs=args.epochs,
            lm_epochs=args.lm_epochs,
            bf16_autocast=args.bf16_autocast,
            kd_token_fraction=args.kd_token_fraction,
            seed=args.seed,
            **extra,
        )
    if args.method == "trimllm":
        trimllm = TrimLLMConfig(
            remove=args.remove,
            trainable_fraction=args.trainable_fraction,
            train_head=not args.no_train_head,
            steps_per_round=args.steps_per_round,
            final_steps=args.final_steps,
            seqlen=args.seqlen,
            heldout_windows=args.heldout_windows,
            quality_floor=args.quality_floor,
            seed=args.seed,
            **({"lr": args.lr} if args.lr else {}),
        )
    return DepthSettings(
        method=args.method,
        remove=args.remove,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        streamline=streamline,
        trimllm=trimllm,
        domain=args.domain,
        track_windows=args.track_wikitext,
    )


def depth_manifest(model_spec: str, settings: DepthSettings) -> VariantManifest:
    suffix = f"-{settings.streamline.replacement}" if settings.streamline else ""
    calibration = None
    if settings.method != "trimllm":
        calibration = CalibrationRef(
            source=settings.calib, nsamples=settings.nsamples, seqlen=settings.seqlen, seed=settings.seed
        )
    return VariantManifest(
        name=f"depth-{settings.method}{suffix}-k{settings.remove}",
        base=BaseModelRef(source=str(model_spec), sha256=weights_sha256(resolve_model(model_spec))),
        method=f"depth/{settings.method}",
        settings=settings.as_dict(),
        calibration=calibration,
        seed=settings.seed,
    )


def cmd_depth(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    manifest = depth_manifest(args.model, settings)
    if check_output_dir(args.out, manifest):
        print(f"{args.out}: this variant already exists; nothing to do")
        return 0
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    outcome = prune_depth(model, tokenizer, settings)
    stats = {"removed": outcome.removed, **outcome.stats}
    manifest = manifest.model_copy(update={"stats": stats, "notes": outcome.notes})
    save_variant(model, tokenizer, args.out, manifest)
    if "trajectory" in outcome.stats:
        plot_trajectory(outcome.stats["trajectory"], args.out / "trajectory.png")
    print(
        f"{args.out}: {outcome.stats['layers']['before']} -> {outcome.stats['layers']['after']} layers, "
        f"removed {outcome.removed} in {outcome.seconds:.0f} s"
    )
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    sizes = sorted(set(args.window or [8]))
    if args.nsamples < 1 or args.seqlen < 2:
        raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    num_layers = len(decoder_layers(model))
    for size in sizes:
        check_window(num_layers, size)
    if args.sleb and not 0 < args.sleb <= num_layers - 2:
        raise ValueError(f"--sleb must be in 1 .. {num_layers - 2}")
    windows = calibration_windows(load_texts(args.calib), tokenizer, args.nsamples, args.seqlen, args.seed)
    states, _ = depth_states(model, windows)
    scores = scan_scores(states, sizes)
    del states
    if args.sleb:
        hidden, kwargs = capture_block_inputs(model, windows)
        greedy = sleb_greedy(model, hidden, kwargs, windows, args.sleb)
        scores["sleb"] = {"removal_order": greedy.removed, "calib_nll": greedy.nlls}
    scores["calibration"] = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    plot_scan(
        scores["block_influence"],
        {int(k): v for k, v in scores["windows"].items()},
        args.out / "scores.png",
        title=f"{args.model}: depth criteria ({args.calib}, {args.nsamples}x{args.seqlen})",
        sleb=scores["sleb"]["calib_nll"] if args.sleb else None,
    )
    print(format_scan(scores))
    print(f"wrote {args.out / 'scores.json'} and {args.out / 'scores.png'}")
    return 0


def format_scan(scores: dict) -> str:
    rows = ["| layer | block influence |", "|---|---|"]
    rows += [f"| {i} | {v:.4f} |" for i, v in enumerate(scores["block_influence"])]
    for size, s in scores["windows"].items():
        rows += ["", f"| window of {size}: first layer | cosine (all tokens) | angular (last token) |", "|---|---|---|"]
        rows += [f"| {i} | {c:.4f} | {a:.4f} |" for i, (c, a) in enumerate(zip(s["cosine"], s["angular"], strict=True))]
    if "sleb" in scores:
        rows += ["", "SLEB removal order: " + ", ".join(map(str, scores["sleb"]["removal_order"]))]
    return "\n".join(rows)
