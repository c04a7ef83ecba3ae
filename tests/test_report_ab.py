"""`trimserve report`: manifests + a bench run -> one markdown table with ratios, and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from service.metrics import Metrics
from tests.tiny_models import tiny_llama
from trimserve.cli import main
from trimserve.report import (
    Row,
    VariantQuality,
    build_rows,
    checkpoint_quality,
    load_bench,
    markdown_table,
    merge_benches,
    pareto_front,
    read_fidelity,
    read_memory,
    scrape,
)
from variants.format import BaseModelRef, ParamCounts, VariantManifest, write_manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_entry(tpot: float, ttft: float, tok_s: float, errors: int = 0, n: int = 8) -> dict:
    tpots = [tpot * (1 + 0.02 * i) for i in range(n)]
    ttfts = [ttft * (1 + 0.05 * i) for i in range(n)]
    e2es = [a + 15 * b for a, b in zip(ttfts, tpots, strict=True)]

    def stats(xs: list[float]) -> dict[str, float]:
        return {"p50": xs[n // 2], "p90": xs[int(0.9 * n)], "p99": xs[-1], "mean": sum(xs) / n}

    return {
        "requests": n,
        "errors": errors,
        "output_tokens": 16 * n,
        "output_tokens_per_s": tok_s,
        "ttft_s": stats(ttfts),
        "tpot_s": stats(tpots),
        "e2e_s": stats(e2es),
        "samples": {"ttft_s": ttfts, "tpot_s": tpots, "e2e_s": e2es},
    }


@pytest.fixture
def bench_file(tmp_path: Path) -> Path:
    bench = {
        "url": "http://127.0.0.1:8000",
        "started": "2026-11-24T12:00:00+00:00",
        "settings": {"concurrency": 1, "max_tokens": 16},
        "duration_s": 12.5,
        "variants": {
            "full": bench_entry(0.040, 0.20, 25.0),
            "depth8": bench_entry(0.030, 0.15, 40.0),
            "sparse50": bench_entry(0.041, 0.21, 24.0, errors=1),
        },
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    return path


def save_tiny(directory: Path, layers: int, manifest: VariantManifest | None = None) -> int:
    model = tiny_llama(layers=layers, vocab_size=256)
    model.save_pretrained(directory)
    if manifest is not None:
        write_manifest(directory, manifest)
    return sum(p.numel() for p in model.parameters())


def manifest(name: str, method: str, layers: int, total: int, nonzero: int, ppl: float) -> VariantManifest:
    return VariantManifest(
        name=name,
        base=BaseModelRef(source="tiny"),
        method=method,
        num_layers=layers,
        params=ParamCounts(total=total, nonzero=nonzero),
        eval={"ppl_wikitext2": ppl},
    )


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = {"full": (25.0, 20.0), "depth8": (40.0, 30.0), "sparse50": (24.0, 45.0), "same": (40.0, 35.0)}
    assert pareto_front(points) == ["full", "depth8"]
    # Accuracy: higher is better, so the ranking along quality flips.
    acc = {"full": (25.0, 0.6), "depth8": (40.0, 0.5), "worse": (30.0, 0.4)}
    assert pareto_front(acc, lower_quality_is_better=False) == ["full", "depth8"]
    assert pareto_front({"a": (1.0, 1.0), "b": (1.0, 1.0)}) == ["a", "b"]  # equal points dominate neither


def test_checkpoint_quality_reads_manifest_or_counts_weights(tmp_path: Path) -> None:
    total = save_tiny(tmp_path / "full", layers=4)
    plain = checkpoint_quality(tmp_path / "full")
    assert (plain.method, plain.num_layers, plain.params_total, plain.params_nonzero) == ("dense", 4, total, None)

    save_tiny(tmp_path / "depth", layers=3, manifest=manifest("depth", "shortgpt", 3, 900, 800, 31.5))
    q = checkpoint_quality(tmp_path / "depth")
    assert (q.method, q.num_layers, q.params_total, q.params_nonzero, q.eval) == (
        "shortgpt",
        3,
        900,
        800,
        {"ppl_wikitext2": 31.5},
    )


def test_load_bench_rejects_files_that_are_not_bench_output(tmp_path: Path, bench_file: Path) -> None:
    assert set(load_bench(bench_file)["variants"]) == {"full", "depth8", "sparse50"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"variants": {"full": {"requests": 1}}}))
    with pytest.raises(ValueError, match="lacks"):
        load_bench(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="no `variants`"):
        load_bench(bad)


def test_table_puts_baseline_first_with_ratios(bench_file: Path) -> None:
    bench = load_bench(bench_file)
    evals = {"full": {"ppl_wikitext2": 20.0}, "depth8": {"ppl_wikitext2": 30.0}, "sparse50": {"ppl_wikitext2": 45.0}}
    rows = build_rows(bench, {}, evals, {"depth8": {"weight_bytes": 3e6}, "full": {"weight_bytes": 4e6}}, "full")
    assert [r.name for r in rows] == ["full", "depth8", "sparse50"]
    lines = markdown_table(rows, "full").splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[0] == "depth8"
    assert cells[header.index("ppl_wikitext2") + 1] == "1.50"  # 30 / 20
    assert cells[header.index("out tok/s") + 1] == "1.60"  # 40 / 25
    assert cells[header.index("TPOT p50 ms") + 1] == "0.75"  # 30 ms / 40 ms
    assert cells[header.index("weights MB") + 1] == "0.75"
    assert "CUDA peak MB" not in header  # no CUDA gauges on a CPU server: no empty columns
    assert cells[header.index("errors")] == "0/8"
    assert [c.strip() for c in lines[4].strip("|").split("|")][header.index("errors")] == "1/8"


def test_merge_benches_combines_per_variant_runs(bench_file: Path) -> None:
    bench = load_bench(bench_file)
    parts = [{**bench, "variants": {name: entry}} for name, entry in bench["variants"].items()]
    assert merge_benches(parts)["variants"] == bench["variants"]
    with pytest.raises(ValueError, match="more than one bench"):
        merge_benches([bench, parts[0]])


def test_build_rows_refuses_a_missing_baseline_or_unknown_names(bench_file: Path) -> None:
    bench = load_bench(bench_file)
    with pytest.raises(ValueError, match="no variant 'dense'"):
        build_rows(bench, {}, {}, {}, "dense")
    with pytest.raises(ValueError, match="did not measure"):
        build_rows(bench, {}, {"depth4": {"ppl_wikitext2": 1.0}}, {}, "full")


def test_read_memory_sums_cuda_devices_from_a_real_scrape(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.weight_bytes.labels(variant="full").set(4e6)
    metrics.weight_bytes.labels(variant="depth8").set(3e6)
    metrics.cuda_peak.labels(variant="full", device="cuda:0").set(1e9)
    metrics.cuda_peak.labels(variant="full", device="cuda:1").set(5e8)
    path = tmp_path / "metrics.txt"
    path.write_bytes(generate_latest(metrics.registry))
    memory = read_memory(scrape(str(path)))
    assert memory["full"] == {"weight_bytes": 4e6, "cuda_peak_bytes": 1.5e9}
    assert memory["depth8"] == {"weight_bytes": 3e6}
    with pytest.raises(ValueError, match="cannot read metrics"):
        scrape(str(tmp_path / "missing.txt"))


def test_shadow_fidelity_columns_from_a_real_scrape(bench_file: Path) -> None:
    metrics = Metrics()
    for variant, nlls, top1s in [("full", [1.0, 2.0], [1.0, 1.0]), ("depth8", [1.5, 3.5], [0.8, 0.6])]:
        for nll, top1 in zip(nlls, top1s, strict=True):
            metrics.shadow_nll.labels(variant=variant, reference="full").observe(nll)
            metrics.shadow_top1.labels(variant=variant, reference="full").observe(top1)
    metrics.shadow_nll.labels(variant="depth8", reference="other").observe(9.0)  # another reference: not ours
    fidelity = read_fidelity(generate_latest(metrics.registry).decode(), "full")
    assert fidelity == {
        "full": {"nll": 1.5, "top1": 1.0, "items": 2},
        "depth8": {"nll": 2.5, "top1": pytest.approx(0.7), "items": 2},
    }
    rows = build_rows(load_bench(bench_file), {}, {}, {}, "full", fidelity)
    table = markdown_table(rows, "full")
    header = table.splitlines()[0].split(" | ")
    depth8 = next(line for line in table.splitlines() if line.startswith("| depth8 ")).split(" | ")
    assert header[-4:-1] == ["shadow NLL", "/full", "top-1 agree"]
    assert depth8[-4:-1] == ["2.500", "1.67", "0.700"] and depth8[-1].startswith("2")
    assert "–" in next(line for line in table.splitlines() if line.startswith("| sparse50 "))  # not shadowed
    assert "shadow" not in markdown_table(build_rows(load_bench(bench_file), {}, {}, {}, "full"), "full")


def test_cli_writes_table_and_charts(tmp_path: Path, bench_file: Path, capsys: pytest.CaptureFixture) -> None:
    total = save_tiny(tmp_path / "full", layers=4)
    save_tiny(tmp_path / "depth8", layers=3, manifest=manifest("depth8", "shortgpt", 3, 900, 900, 30.0))
    save_tiny(tmp_path / "sparse50", layers=4, manifest=manifest("sparse50", "wanda", 4, total, total // 2, 45.0))
    (tmp_path / "eval-full.json").write_text(json.dumps({"ppl_wikitext2": 20.0, "note": "ignored"}))
    out = tmp_path / "report"
    argv = ["report", "--bench", str(bench_file), "--out", str(out), "--eval", f"full={tmp_path / 'eval-full.json'}"]
    for name in ("full", "depth8", "sparse50"):
        argv += ["--variant", f"{name}={tmp_path / name}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| sparse50 | wanda | 4 |" in printed
    report = (out / "report.md").read_text()
    assert "Pareto front: full, depth8." in report
    for chart in ("pareto.png", "latency.png"):
        assert (out / chart).read_bytes()[:8] == PNG_MAGIC
        assert f"]({chart})" in report


def test_cli_rejects_bad_pairs(tmp_path: Path, bench_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", "--bench", str(bench_file), "--variant", "full"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert main(["report", "--bench", str(bench_file), "--variant", f"full={tmp_path}"]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


def test_rows_without_quality_still_render() -> None:
    speed = bench_entry(0.04, 0.2, 25.0)
    rows = [Row("full", VariantQuality(), speed, {}), Row("x", VariantQuality(), speed, {})]
    table = markdown_table(rows, "full")
    assert "| x | – | – | – | – |" in table
