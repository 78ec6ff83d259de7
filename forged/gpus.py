"""Which GPUs a profile's engine uses, how the model is spread over them, and where its KV cache lives.

GPUs are counted in CUDA's order of the devices this process sees (`HardwareInfo.cuda_gpus`: every
GPU NVML lists, or those CUDA_VISIBLE_DEVICES names), because that is how libllama's `main_gpu` and
`tensor_split` and TensorRT-LLM's ranks count them.

- **llama_cpp** (`llama_cpp.split_mode`, `tensor_split`, `main_gpu`, passed to libllama's
  llama_model_params): `layer` puts whole layers on each GPU and each layer's KV beside it, so the
  KV cache spreads as the weights do; `row` splits every weight matrix by rows and keeps the KV
  cache and intermediate results on `main_gpu`; `none` puts everything on `main_gpu`. The shares
  are the profile's `tensor_split`, or each GPU's free memory at start (what libllama itself would
  do), and forged passes them explicitly so that /v1/status shows exactly what libllama got. With
  `n_gpu_layers: 0` no GPU is used and the KV cache is in system memory.
- **tensorrt_llm** (`tensorrt_llm.tensor_parallel_size`): the first N GPUs, the weights and the KV
  cache sharded evenly over them.

The KV budget and the memory check (forged/sanity.py) read the memory of the GPUs that hold the KV
cache, summed, and count only the weights that sit on those GPUs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forged.config import Profile
from forged.hardware import GpuInfo, HardwareInfo, MemoryReading, device_memory, gpu_memory, system_memory
from forged.hardware.nvml import NvmlSession
from forged.schema import ConfigError, Located

if TYPE_CHECKING:  # forged.engine imports this module
    from forged.engine.kv import KvShape


@dataclass(frozen=True)
class Placement:
    engine: str
    # none, layer or row (llama_cpp), tensor_parallel (tensorrt_llm); None: no GPU in use.
    split_mode: str | None = None
    # The GPUs the model is spread over, in CUDA order, and the share of the model on each (sum 1).
    gpus: tuple[GpuInfo, ...] = ()
    shares: tuple[float, ...] = ()
    main_gpu: int = 0  # CUDA index
    # Where the shares came from: "profile" (tensor_split) or "free memory at start".
    shares_from: str | None = None

    @property
    def kv_gpus(self) -> tuple[GpuInfo, ...]:
        """The GPUs that hold the KV cache: main_gpu for row, else every GPU with a share (its layers')."""
        if self.split_mode == "row":
            return (self.gpus[self.main_gpu],)
        return tuple(g for g, share in zip(self.gpus, self.shares, strict=True) if share > 0)

    @property
    def kv_weight_share(self) -> float:
        """The fraction of the weights on the KV cache's GPUs: main_gpu's share for row, else all."""
        return self.shares[self.main_gpu] if self.split_mode == "row" else 1.0

    def kv_memory(self, hardware: HardwareInfo, *, root: Path = Path("/"), nvml: NvmlSession | None = None) \
            -> MemoryReading:
        """The memory of the devices that hold the KV cache, summed, read now: system memory when
        the engine uses no GPU (a CPU box, unified memory, n_gpu_layers 0)."""
        if not self.gpus:
            return system_memory(root)
        return device_memory(hardware, root=root, nvml=nvml, gpus=tuple(g.index for g in self.kv_gpus))

    def memory(self, hardware: HardwareInfo, *, root: Path = Path("/"), nvml: NvmlSession | None = None) \
            -> MemoryReading:
        """The memory of every device holding part of the model, summed, read now (the memory gauges)."""
        if not self.gpus:
            return system_memory(root)
        used = tuple(g.index for g, share in zip(self.gpus, self.shares, strict=True) if share > 0)
        return device_memory(hardware, root=root, nvml=nvml, gpus=used)

    def kv_shape(self, shape: KvShape) -> KvShape:
        """The model's shape as the KV budget on the KV cache's GPUs sees it: only their weights."""
        return dataclasses.replace(shape, weights_bytes=int(shape.weights_bytes * self.kv_weight_share))

    def model_params(self) -> dict[str, Any]:
        """libllama's llama_model_params fields (split_mode, main_gpu, tensor_split); empty when no
        GPU is used, which leaves libllama's defaults (a CPU build has no device to name)."""
        if self.engine != "llama_cpp" or not self.gpus:
            return {}
        return {"split_mode": self.split_mode, "main_gpu": self.main_gpu, "tensor_split": self.shares}

    def status(self, hardware: HardwareInfo, *, nvml: NvmlSession | None = None) -> dict[str, Any]:
        """For /v1/status: the split and each GPU's share and memory, read now."""
        kv = {g.index for g in self.kv_gpus}
        gpus = []
        for cuda_index, (gpu, share) in enumerate(zip(self.gpus, self.shares, strict=True)):
            memory = gpu_memory(hardware, gpu.index, nvml=nvml)
            gpus.append({"cuda_index": cuda_index, "nvml_index": gpu.index, "name": gpu.name,
                         "share": round(share, 4), "kv_cache": gpu.index in kv,
                         "memory_total_bytes": memory.total_bytes, "memory_used_bytes": memory.used_bytes,
                         "memory_available_bytes": memory.available_bytes})
        return {"split_mode": self.split_mode, "main_gpu": self.main_gpu if self.gpus else None,
                "shares_from": self.shares_from, "gpus": gpus}


def place(profile_name: str, profile: Profile, engine: str, hardware: HardwareInfo,
          source: Located | None = None) -> Placement:
    """Where `engine` (the one that will really run) puts the model on this machine. A profile that
    asks for GPUs the machine does not show is a ConfigError naming the key."""
    visible = tuple(g for i in hardware.cuda_gpus if (g := hardware.nvml_gpu(i)) is not None)

    def refuse(key: str, reason: str) -> ConfigError:
        path = f"profiles.{profile_name}.{key}"
        where = f"{source.where(path)}: " if source else ""
        return ConfigError(f"{where}{path}: {reason}")

    if hardware.unified_memory or not visible:
        if engine == "tensorrt_llm" and profile.tensorrt_llm.tensor_parallel_size > 1:
            raise refuse("tensorrt_llm.tensor_parallel_size", f"expected at most the {len(visible)} GPUs this "
                         f"machine shows, got {profile.tensorrt_llm.tensor_parallel_size}")
        return Placement(engine)
    if engine == "tensorrt_llm":
        tp = profile.tensorrt_llm.tensor_parallel_size
        if tp > len(visible):
            raise refuse("tensorrt_llm.tensor_parallel_size", f"expected at most the {len(visible)} GPUs this "
                         f"machine shows (CUDA_VISIBLE_DEVICES narrows them), got {tp}")
        return Placement(engine, "tensor_parallel", visible[:tp], (1 / tp,) * tp, 0, "tensor_parallel_size")
    opts = profile.llama_cpp
    if opts.n_gpu_layers == 0:
        return Placement(engine)
    if opts.main_gpu >= len(visible):
        raise refuse("llama_cpp.main_gpu", f"expected a GPU index below {len(visible)} (the GPUs this machine "
                     f"shows, in CUDA order), got {opts.main_gpu}")
    if opts.split_mode == "none":
        shares = tuple(1.0 if i == opts.main_gpu else 0.0 for i in range(len(visible)))
        return Placement(engine, "none", visible, shares, opts.main_gpu, "main_gpu")
    if opts.tensor_split is not None:
        if len(opts.tensor_split) > len(visible):
            raise refuse("llama_cpp.tensor_split", f"expected at most {len(visible)} shares (one per GPU this "
                         f"machine shows, in CUDA order), got {list(opts.tensor_split)}")
        weights = tuple(opts.tensor_split) + (0.0,) * (len(visible) - len(opts.tensor_split))
        source_text = "profile"
    else:
        weights = tuple(float(g.memory_free_bytes or 0) for g in visible)
        source_text = "free memory at start"
        if not any(weights):  # NVML gave no free figure: even shares
            weights = (1.0,) * len(visible)
    total = sum(weights)
    shares = tuple(w / total for w in weights)
    if opts.split_mode == "row" and not shares[opts.main_gpu]:
        raise refuse("llama_cpp.main_gpu", f"expected a GPU with a share of the model (split_mode row keeps the "
                     f"KV cache on main_gpu), got {opts.main_gpu} with tensor_split {list(opts.tensor_split or ())}")
    return Placement(engine, opts.split_mode, visible, shares, opts.main_gpu, source_text)
