import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_models import tiny_llama
from variants.format import (
    MANIFEST,
    BaseModelRef,
    CalibrationRef,
    VariantError,
    VariantManifest,
    check_output_dir,
    read_manifest,
    verify_variant,
    write_manifest,
)
from variants.load import load_model
from variants.write import save_variant, weight_stats


def manifest(**changes) -> VariantManifest:
    fields = dict(
        name="tiny-half",
        base=BaseModelRef(source="tiny", sha256="0" * 64),
        method="magnitude",
        settings={"sparsity": 0.5},
        calibration=CalibrationRef(source="c4", nsamples=2, seqlen=16, seed=0),
    )
    return VariantManifest(**(fields | changes))


@pytest.fixture
def variant(tmp_path, tokenizer):
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0  # half of layer 0's up_proj
    out = tmp_path / "variant"
    save_variant(model, tokenizer, out, manifest(eval={"ppl_wikitext2": 99.0}))
    return model, out


def test_variant_directory_is_a_standard_checkpoint(variant):
    model, out = variant
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MANIFEST} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # never pickle
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_manifest_records_counts_sparsity_and_hashes(variant):
    model, out = variant
    m = read_manifest(out)
    assert m.name == "tiny-half" and m.method == "magnitude" and m.settings == {"sparsity": 0.5}
    assert m.calibration.nsamples == 2 and m.eval == {"ppl_wikitext2": 99.0}
    assert {"torch", "transformers", "python"} <= set(m.versions)
    up = model.model.layers[0].mlp.up_proj.weight
    total = sum(p.numel() for p in model.parameters())
    assert m.params.total == total
    assert m.params.nonzero == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert m.params.nonzero <= total - up.numel() // 2
    layer0 = sum(p.numel() for n, p in model.model.layers[0].named_parameters() if p.dim() == 2)
    assert m.layer_sparsity["layers.0"] == pytest.approx(up.numel() / 2 / layer0)
    assert m.layer_sparsity["layers.1"] == 0
    assert set(m.files) == {"model.safetensors"} and len(m.files["model.safetensors"]) == 64
    assert m.num_layers == 2


def test_tampered_or_truncated_weights_are_refused(variant):
    _, out = variant
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VariantError, match="does not match its sha256"):
        load_model(out)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(VariantError, match="tampered or truncated"):
        verify_variant(out)
    weights.unlink()
    with pytest.raises(VariantError, match="missing"):
        verify_variant(out)


def test_unlisted_weight_file_is_refused(variant):
    _, out = variant
    (out / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(VariantError, match="not in the manifest"):
        verify_variant(out)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt", "model.gguf"])
def test_unlisted_pickle_or_other_weights_beside_a_variant_are_refused(variant, name):
    """Issue 13: a pytorch_model.bin beside the listed safetensors was loaded without complaint."""
    model, out = variant
    torch.save(model.state_dict(), out / name)
    with pytest.raises(VariantError, match=f"not in the manifest: \\['{name}'\\]"):
        load_model(out)


def test_invalid_manifest_is_refused(variant):
    _, out = variant
    (out / MANIFEST).write_text(json.dumps({"name": "x"}))
    with pytest.raises(VariantError, match="invalid manifest"):
        read_manifest(out)


def test_check_output_dir(variant, tmp_path):
    _, out = variant
    assert check_output_dir(out, manifest()) is True  # same recipe: reuse
    with pytest.raises(VariantError, match="different variant"):
        check_output_dir(out, manifest(settings={"sparsity": 0.7}))
    assert check_output_dir(tmp_path / "new", manifest()) is False
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(VariantError, match="not a trimserve variant"):
        check_output_dir(other, manifest())


def test_weight_stats_count_tied_embeddings_once():
    model = tiny_llama(layers=1)
    params, sparsity = weight_stats(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert params.total == sum(p.numel() for p in model.parameters())  # parameters() dedups too
    assert params.nonzero == sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert sparsity == {"layers.0": 0.0}


def test_staged_directory_leaves_nothing_behind_on_failure(tmp_path):
    from variants.format import staged_directory

    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(target) as tmp:
        (tmp / "half.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with staged_directory(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "done.txt").is_file()


def test_every_file_of_a_variant_is_world_readable(tmp_path, tokenizer):
    from variants.write import write_sparse_variant as write_variant

    out = tmp_path / "variant"
    old = os.umask(0o077)  # a private umask: the modes must not depend on it
    try:
        write_variant(tiny_llama(layers=1), tokenizer, out, manifest(), compressed=True)
        write_manifest(out, read_manifest(out))  # rewritten, as `trimserve eval` records scores
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert {"model.safetensors", "compressed", "tokenizer.json", MANIFEST} <= {p.name for p in paths}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {name: oct(0o755 if (tmp_path / name).is_dir() else 0o644) for name in modes}


# Run as root, then switched to uid 10001 (the Docker image's user) before the variant is read;
# everything the load needs is imported first, as the interpreter may live in root's private home.
LOAD_AS_OTHER_USER = """
import os, sys
from variants.load import load_model
load_model(sys.argv[1])
os.setgroups([]); os.setgid(10001); os.setuid(10001)
model, _ = load_model(sys.argv[1])
print(os.getuid(), sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a variant as another uid needs root (to switch to uid 10001)")
def test_another_user_loads_a_variant(tokenizer):
    base = Path(tempfile.mkdtemp(prefix="trimserve-uid-"))
    try:
        base.chmod(0o755)  # mkdtemp makes it private; /tmp itself is open to all
        model = tiny_llama(layers=1)
        save_variant(model, tokenizer, base / "variant", manifest())
        env = {**os.environ, "HOME": str(base), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-c", LOAD_AS_OTHER_USER, str(base / "variant")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["10001", str(sum(p.numel() for p in model.parameters()))]
    finally:
        shutil.rmtree(base)


def test_ffn_only_layers_are_recorded_at_save_and_restored_at_load(tmp_path, tokenizer):
    from pruning.depth.ffn import NoOpAttention, make_noop
    from variants.noop import NOOP_KEY, noop_layers

    model = tiny_llama(layers=3)
    make_noop(model.model.layers[1], 1)
    manifest = VariantManifest(name="ffn", base=BaseModelRef(source="random"), method="depth/streamline")
    save_variant(model, tokenizer, tmp_path / "ffn", manifest)
    assert json.loads((tmp_path / "ffn" / "config.json").read_text())[NOOP_KEY] == [1]
    loaded, _ = load_model(tmp_path / "ffn")
    assert noop_layers(loaded) == [1] and isinstance(loaded.model.layers[1].self_attn, NoOpAttention)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
