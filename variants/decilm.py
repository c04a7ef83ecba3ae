"""The DeciLM (Nemotron-NAS) layout of a Llama depth variant, so vLLM can serve FFN-only layers.

vLLM's `DeciLMForCausalLM` (vllm/model_executor/models/nemotron_nas.py) builds each decoder layer
from `config.block_configs[i]`: `attention.no_op` drops the attention and its input norm (exactly
trimserve's FFN-only layer, `variants.noop`), `attention.n_heads_in_group` gives the KV heads, and
`ffn.ffn_mult` the MLP width. Weight names are Llama's, so only the config changes: model_type
`nemotron-nas`, one block config per layer, and a small config class (`configuration_decilm.py`,
loaded with `trust_remote_code=True`) because neither vLLM nor transformers ships one.
`trimserve_noop_attention` stays in the config, so trimserve still loads the directory: it reads
the Llama config back with `llama_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from variants.format import FILE_MODE, MANIFEST, read_manifest, write_manifest
from variants.noop import NOOP_KEY

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
CONFIG_FILE = "configuration_decilm.py"
NOTE = "DeciLM layout (config block_configs): vLLM's DeciLMForCausalLM loads it with trust_remote_code=True"

# The config class vLLM's transformers builds from config.json. vLLM reads the block configs as
# attributes (`block_config.attention.no_op`, `hasattr(block_config.ffn, "ffn_mult")`), so each
# section is a dict that also answers attribute access and stays JSON-serialisable.
CONFIG_SOURCE = f'''"""DeciLM (Nemotron-NAS) config of a trimserve depth variant: Llama plus per-layer block configs."""

from transformers import LlamaConfig


class BlockSection(dict):
    """A block config (or its attention / ffn part): a dict whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    model_type = "{MODEL_TYPE}"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [
            BlockSection({{k: BlockSection(v) if isinstance(v, dict) else v for k, v in block.items()}})
            for block in block_configs or []
        ]
'''


def intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width vLLM's DeciLM derives from `ffn_mult` (2/3 of mult * hidden, up to a multiple of 256)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def decilm_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Llama config.json (as a dict) in the DeciLM layout; ValueError for what it cannot express."""
    if config.get("model_type") != "llama":
        raise ValueError(f"the DeciLM layout holds Llama models only, not model_type {config.get('model_type')!r}")
    hidden, width = config["hidden_size"], config["intermediate_size"]
    ffn_mult = 1.5 * width / hidden
    if intermediate_size(ffn_mult, hidden) != width:
        raise ValueError(
            f"intermediate_size {width} cannot be expressed as DeciLM's ffn_mult for hidden_size {hidden} "
            "(vLLM rounds the width up to a multiple of 256)"
        )
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads do not split into groups of {kv_heads} KV heads")
    layers = config["num_hidden_layers"]
    noop = set(config.get(NOOP_KEY) or [])
    if not noop <= set(range(layers)):
        raise ValueError(f"{NOOP_KEY} lists {sorted(noop)}, but the model has {layers} layers")
    if 0 in noop:  # vLLM's layer adds the residual in the FFN norm, and layer 0 has none yet
        raise ValueError("vLLM's DeciLM cannot run a no-op attention in layer 0")
    blocks = [
        {
            "attention": {
                "no_op": i in noop,
                "replace_with_linear": False,
                "n_heads_in_group": None if i in noop else heads // kv_heads,
            },
            "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": ffn_mult},
        }
        for i in range(layers)
    ]
    return {
        **config,
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{Path(CONFIG_FILE).stem}.DeciLMConfig"},
        "block_configs": blocks,
    }


def llama_config_from_decilm(config: dict[str, Any]) -> dict[str, Any]:
    """The Llama config.json (as a dict) of a config `decilm_config` wrote; ValueError for other DeciLM models."""
    blocks = config.get("block_configs") or []
    if config.get("model_type") != MODEL_TYPE or len(blocks) != config.get("num_hidden_layers"):
        raise ValueError(f"not a DeciLM config with a block config per layer: model_type {config.get('model_type')!r}")
    for i, block in enumerate(blocks):
        attention, ffn = block["attention"], block["ffn"]
        if attention.get("replace_with_linear") or ffn.get("no_op") or ffn.get("replace_with_linear"):
            raise ValueError(f"block {i}: only no-op attention is supported, not {block}")
        if intermediate_size(ffn["ffn_mult"], config["hidden_size"]) != config["intermediate_size"]:
            raise ValueError(f"block {i}: ffn_mult {ffn['ffn_mult']} differs from intermediate_size")
    noop = [i for i, block in enumerate(blocks) if block["attention"]["no_op"]]
    if noop != (config.get(NOOP_KEY) or []):  # block_configs is what vLLM runs: trimserve must agree
        raise ValueError(f"block_configs make layers {noop} no-op, but {NOOP_KEY} says {config.get(NOOP_KEY)}")
    llama = {k: v for k, v in config.items() if k not in ("auto_map", "block_configs")}
    return {**llama, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def llama_config(source: str | Path) -> LlamaConfig | None:
    """The Llama config of a checkpoint directory in the DeciLM layout; None for any other source."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if config.get("model_type") != MODEL_TYPE:
        return None
    return LlamaConfig.from_dict(llama_config_from_decilm(config), name_or_path=str(source))


def check_exportable(config: dict[str, Any]) -> None:
    """ValueError, before any pruning, when a model with this config.json can never be written in the
    DeciLM layout (another architecture, a width ffn_mult cannot express); no-op layers are unknown yet."""
    decilm_config({**config, NOOP_KEY: []})


def write_decilm_layout(variant_dir: str | Path) -> None:
    """Rewrite a saved Llama depth variant in place into the DeciLM layout (idempotent); weights are untouched."""
    variant_dir = Path(variant_dir)
    path = variant_dir / "config.json"
    config = json.loads(path.read_text())
    if config.get("model_type") == MODEL_TYPE:  # already converted: re-check and rewrite
        config = llama_config_from_decilm(config)
    converted = decilm_config(config)
    for name, text in ((CONFIG_FILE, CONFIG_SOURCE), (path.name, json.dumps(converted, indent=2) + "\n")):
        tmp = variant_dir / f".{name}.tmp"  # config.json last: an interrupted run leaves the Llama layout
        tmp.write_text(text)
        tmp.chmod(FILE_MODE)
        tmp.replace(variant_dir / name)
    if (variant_dir / MANIFEST).is_file():
        manifest = read_manifest(variant_dir)
        if NOTE not in manifest.notes:
            manifest.notes.append(NOTE)
            write_manifest(variant_dir, manifest)
