"""`trimserve prune sparse|depth MODEL ... --out DIR` (build a variant) and `prune depth-scan` (chart layer scores).

The options become a recipe (`variants.recipes`) and calibration data (`CalibrationRef`), and
`variants.build.build_variant` does the rest; bad options stop with one error line before any
work and leave nothing behind.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evaluation.data import calibration_windows, load_texts
from pruning.blocks import capture_block_inputs, decoder_layers
from pruning.depth.criteria import check_window, scan_scores, sleb_greedy
from pruning.depth.pipeline import METHODS as DEPTH_METHODS
from pruning.depth.states import depth_states
from pruning.depth.streamline import LOSSES, REPLACEMENTS
from pruning.depth.trimllm import HEALS
from pruning.sparse.pipeline import METHODS as SPARSE_METHODS
from trimserve.cli.eval import add_model_options
from trimserve.depth_charts import plot_scan, plot_trajectory
from variants.build import build_variant, source_config
from variants.decilm import check_exportable, write_decilm_layout
from variants.format import CalibrationRef
from variants.load import load_model
from variants.recipes import DepthRecipe, SparseRecipe

SPARSE_CHOICES = (*SPARSE_METHODS, "owl", "trim")


def register(sub: argparse._SubParsersAction) -> None:
    prune = sub.add_parser("prune", help="build pruned variants")
    prune_sub = prune.add_subparsers(dest="prune_command", required=True, metavar="METHOD")
    register_sparse(prune_sub)
    register_depth(prune_sub)
    register_scan(prune_sub)


def calibration_options(parser: argparse.ArgumentParser, nsamples: int, seqlen: int) -> None:
    parser.add_argument("--calib", default="c4", help="calibration text source (default c4; hub:c4 for the full shard)")
    parser.add_argument("--nsamples", type=int, default=nsamples, help=f"calibration windows ({nsamples})")
    parser.add_argument("--seqlen", type=int, default=seqlen, help=f"calibration window length ({seqlen})")
    parser.add_argument("--seed", type=int, default=0)


def calibration_of(args: argparse.Namespace) -> CalibrationRef:
    if args.nsamples < 1 or args.seqlen < 2:
        raise ValueError("--nsamples must be at least 1 and --seqlen at least 2")
    return CalibrationRef(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)


def register_sparse(prune_sub: argparse._SubParsersAction) -> None:
    p = prune_sub.add_parser(
        "sparse",
        help="unstructured or N:M sparsity (magnitude, Wanda, SparseGPT, ALPS, ADMM, OWL, TRIM)",
        description="Prune every linear of the decoder blocks, one block at a time from calibration data. "
        "--method owl is OWL layer ratios over --base scores; trim is TRIM rows over them; --owl-lambda adds "
        "OWL ratios to any unstructured method. Defaults are the settings that measured best on the default "
        "model (bench/RESULTS.md, Sparsity): owl uses SparseGPT's update (--base sparsegpt); trim uses ALPS's "
        "(--base alps) with OWL's ratios and input recalculation (--no-owl, --no-sequential turn them off).",
    )
    p.add_argument("model", help="directory, .gguf, hub id or built-in alias")
    p.add_argument("--method", required=True, choices=SPARSE_CHOICES)
    p.add_argument("--sparsity", type=float, default=None, help="fraction of zeros in [0, 1) (default 0.5, or N/M)")
    p.add_argument("--pattern", default=None, help="N:M pattern, e.g. 2:4 or 4:8 (not with owl or trim)")
    p.add_argument(
        "--base",
        choices=SPARSE_METHODS,
        default=None,
        help="scores and update for owl/trim (default: sparsegpt for owl, alps for trim)",
    )
    p.add_argument(
        "--owl",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OWL layer ratios (default: on for owl and trim, off for the others)",
    )
    p.add_argument("--owl-lambda", type=float, default=None, help="OWL lambda (default 0.08)")
    p.add_argument("--owl-m", type=float, default=None, help="OWL outlier multiple M (default 5)")
    p.add_argument("--owl-nsamples", type=int, default=None, help="windows for OWL's dense pass (default all)")
    p.add_argument("--trim-tokens", choices=("last", "all"), default="last", help="TRIM metric tokens")
    p.add_argument(
        "--alps",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ALPS setting (max_iterations, rho0, damping, cg_steps, ...; see pruning/sparse/alps.py)",
    )
    p.add_argument(
        "--admm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ADMM setting (iterations, mask_iterations, rho, damping, refit_steps, gradual, ...)",
    )
    p.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="inside a block, recompute inputs after each pruned group of linears (TRIM's input recalculation; "
        "default: on for trim, off for the others)",
    )
    calibration_options(p, nsamples=128, seqlen=2048)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument("--offload", action="store_true", help="keep the model in host memory; one block on --device")
    p.add_argument("--no-compressed", action="store_true", help="skip the compressed bitmask copy")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--out", type=Path, required=True, help="variant directory to write")
    p.set_defaults(func=cmd_sparse)


def cmd_sparse(args: argparse.Namespace) -> int:
    recipe = SparseRecipe.from_options(
        args.method,
        args.sparsity,
        args.pattern,
        args.base,
        args.owl_lambda,
        args.owl_m,
        args.owl_nsamples,
        args.trim_tokens,
        args.sequential,
        args.owl,
        alps=key_values(args.alps, "--alps"),
        admm=key_values(args.admm, "--admm"),
        dtype=args.dtype,
        batch_size=args.batch_size,
        compressed=not args.no_compressed,
    )
    built = build_variant(args.model, recipe, calibration_of(args), args.out, device=args.device, offload=args.offload)
    if built.reused:
        print(f"{args.out} already holds this variant; nothing to do")
    else:
        print(f"{recipe.config.label}: wrote {args.out} in {built.manifest.stats['prune_seconds']:.0f} s of pruning")
    return 0


def key_values(items: list[str], flag: str) -> dict[str, str] | None:
    pairs = [item.partition("=") for item in items]
    if any(not sep or not key for key, sep, _ in pairs):
        raise ValueError(f"{flag} takes KEY=VALUE, not {items}")
    return {key: value for key, _, value in pairs} or None


def register_depth(prune_sub: argparse._SubParsersAction) -> None:
    depth = prune_sub.add_parser(
        "depth",
        help="remove whole layers (ShortGPT, angular, SLEB, LLM-Streamline, TrimLLM)",
        description="--remove k is the net number of layers removed; Streamline replaces a window of k+1 "
        "layers by one trained block (layer: a standard checkpoint; ffn: loads only through trimserve).",
    )
    depth.add_argument("model")
    depth.add_argument("--method", required=True, choices=DEPTH_METHODS)
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
    depth.add_argument("--domain", default=None, help="trimllm domain text: source name or .txt/.jsonl[:field] path")
    depth.add_argument(
        "--heal",
        default="lm",
        choices=HEALS,
        help="trimllm healing loss: lm, the paper's LM loss (default: measured best at k = 8 on PubMedQA), kd "
        "distils the unpruned model's cached logits, kd+lm both (--kd-weight)",
    )
    depth.add_argument(
        "--teacher", default=None, help="trimllm kd: teacher model with the same tokenizer (default: MODEL)"
    )
    depth.add_argument(
        "--teacher-finetune-steps",
        type=int,
        default=0,
        metavar="N",
        help="trimllm kd: fine-tune the teacher N LM steps on the domain before caching its logits (0)",
    )
    depth.add_argument("--kd-top-k", type=int, default=64, help="trimllm kd: teacher logits kept per token (64)")
    depth.add_argument("--kd-weight", type=float, default=0.5, help="trimllm kd+lm: weight of the KD term (0.5)")
    depth.add_argument(
        "--lora-rank", type=int, default=0, help="trimllm: train LoRA adapters of this rank instead of the layers (0)"
    )
    depth.add_argument("--lora-alpha", type=float, default=None, help="trimllm LoRA alpha (2 x rank)")
    depth.add_argument(
        "--steps-per-round", type=int, default=None, help="trimllm healing steps per drop (default: from the text size)"
    )
    depth.add_argument(
        "--final-steps",
        type=int,
        default=None,
        help="trimllm healing steps after the last drop (default: from the text size)",
    )
    depth.add_argument("--trainable-fraction", type=float, default=0.25, help="trimllm trainable layers (0.25)")
    depth.add_argument("--no-train-head", action="store_true", help="trimllm: keep final norm and head frozen")
    depth.add_argument(
        "--heldout-windows",
        type=int,
        default=None,
        help="trimllm held-out slice, in windows (default: 1%% of the text, 1-4)",
    )
    depth.add_argument(
        "--track-wikitext",
        type=int,
        default=0,
        metavar="N",
        help="trimllm: WikiText-2 ppl on the first N windows of --seqlen after every drop (0: off)",
    )
    depth.add_argument("--quality-floor", type=float, default=None, help="trimllm: stop above this ppl ratio")
    calibration_options(depth, nsamples=32, seqlen=512)
    depth.add_argument("--out", type=Path, required=True, help="variant directory")
    depth.add_argument(
        "--export",
        default="llama",
        choices=("llama", "decilm"),
        help="checkpoint layout: llama (the source's own; FFN-only layers load only in trimserve) or decilm "
        "(vLLM's DeciLMForCausalLM with --trust-remote-code loads FFN-only layers too; trimserve reads both)",
    )
    add_model_options(depth)
    depth.set_defaults(func=cmd_depth)


def depth_recipe(args: argparse.Namespace) -> DepthRecipe:
    lr = {"lr": args.lr} if args.lr else {}
    streamline = {
        "replacement": args.replacement,
        "loss": args.loss,
        "epochs": args.epochs,
        "lm_epochs": args.lm_epochs,
        "bf16_autocast": args.bf16_autocast,
        "kd_token_fraction": args.kd_token_fraction,
        **({"lr": args.lr, "lr_min": min(5e-5, args.lr)} if args.lr else {}),
    }
    trimllm = {
        "heal": args.heal,
        "kd_top_k": args.kd_top_k,
        "kd_weight": args.kd_weight,
        "teacher_finetune_steps": args.teacher_finetune_steps,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "trainable_fraction": args.trainable_fraction,
        "train_head": not args.no_train_head,
        "steps_per_round": args.steps_per_round,
        "final_steps": args.final_steps,
        "heldout_windows": args.heldout_windows,
        "quality_floor": args.quality_floor,
        **lr,
    }
    return DepthRecipe.from_options(
        args.method,
        args.remove,
        seed=args.seed,
        seqlen=args.seqlen,
        streamline=streamline,
        trimllm=trimllm,
        domain=args.domain,
        teacher=args.teacher,
        track_wikitext=args.track_wikitext,
        dtype=args.dtype,
    )


def cmd_depth(args: argparse.Namespace) -> int:
    recipe = depth_recipe(args)
    if args.export == "decilm":
        check_exportable(source_config(args.model).to_dict())
    built = build_variant(args.model, recipe, calibration_of(args), args.out, device=args.device)
    if args.export == "decilm":
        try:
            write_decilm_layout(args.out)
        except ValueError as err:
            raise ValueError(f"{args.out} is written in the Llama layout, but not as DeciLM: {err}") from None
        print(f"{args.out}: DeciLM layout (vLLM: --trust-remote-code)")
    if built.reused:
        print(f"{args.out}: this variant already exists; nothing to do")
        return 0
    manifest = built.manifest
    if "trajectory" in manifest.stats:
        plot_trajectory(manifest.stats["trajectory"], args.out / "trajectory.png")
    layers = manifest.stats["layers"]
    if "training" in manifest.stats:
        t = manifest.stats["training"]
        print(
            f"trimllm: heal {t['heal']}, {t['steps_per_round']} steps per drop + {t['final_steps']} after the last, "
            f"lr {t['lr']:g}, {t['heldout_windows']} held-out windows of {t['seqlen']}"
        )
    print(
        f"{args.out}: {layers['before']} -> {layers['after']} layers, removed {manifest.stats['removed']} "
        f"in {manifest.stats['seconds']:.0f} s"
    )
    return 0


def register_scan(prune_sub: argparse._SubParsersAction) -> None:
    scan = prune_sub.add_parser("depth-scan", help="print and chart per-layer and per-window depth criteria")
    scan.add_argument("model")
    scan.add_argument("--window", type=int, action="append", default=None, help="window size (repeatable; 8)")
    scan.add_argument("--sleb", type=int, default=0, metavar="K", help="also run SLEB's greedy removal of K")
    calibration_options(scan, nsamples=32, seqlen=512)
    scan.add_argument("--out", type=Path, required=True, help="directory for scores.json and scores.png")
    add_model_options(scan)
    scan.set_defaults(func=cmd_scan)


def cmd_scan(args: argparse.Namespace) -> int:
    sizes = sorted(set(args.window or [8]))
    calibration = calibration_of(args)
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
    scores["calibration"] = calibration.model_dump()
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
