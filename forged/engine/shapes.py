"""The KV shape of a model file on disk: a GGUF (its metadata read through libllama, no weights
loaded) or a Hugging Face checkpoint's config.json."""

from __future__ import annotations

import json
from pathlib import Path

from forged.engine.kv import KvShape, shape_from_hf_config, shape_from_metadata
from forged.engine.model_files import check_gguf


def read_gguf_metadata(path: Path) -> tuple[dict[str, str], int]:
    """GGUF key/values and the weights' size, through libllama with vocab_only (no weights loaded)."""
    import llama_cpp as ll

    from forged.engine.llama_cpp.model import init_backend, read_metadata

    init_backend()
    check_gguf(path)
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"{path}: libllama could not read this GGUF")
    try:
        meta = read_metadata(model, skip_prefix="tokenizer.")
    finally:
        ll.llama_model_free(model)
    # vocab_only leaves the tensors unread; the file size is the weights' size to within the header.
    return meta, path.stat().st_size


def shape_from_path(path: Path) -> KvShape:
    """A GGUF file, a config.json, or a Hugging Face checkpoint directory holding one."""
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the model config: {exc}") from None
        weights = sum(p.stat().st_size for p in path.parent.glob("*.safetensors"))
        return shape_from_hf_config(config, weights)
    meta, size = read_gguf_metadata(path)
    return shape_from_metadata(meta, size)
