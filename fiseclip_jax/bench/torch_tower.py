"""The benchmark's comparison: transformers' PyTorch CLIP vision tower on the same inputs."""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from fiseclip_jax.bench.timing import max_rss_bytes, row_rates, time_fn, time_pairs


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def torch_tower(cfg, dtype: str, device: str, seed: int = 0):
  """A random transformers CLIPVisionModel with cfg's vision architecture, in dtype on device."""
  import torch  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from transformers import CLIPVisionConfig, CLIPVisionModel
  hf = CLIPVisionConfig(hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp,
                        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                        image_size=cfg.image_size, patch_size=cfg.patch_size,
                        projection_dim=cfg.embed_dim, hidden_act="quick_gelu",
                        layer_norm_eps=cfg.layer_norm_eps)
  torch.manual_seed(seed)
  model = CLIPVisionModel(hf).eval()
  return model.to(device=device, dtype=getattr(torch, dtype))


def torch_device(platform: str) -> Optional[str]:
  """cuda when JAX runs on a GPU and torch sees one, cpu when JAX runs on CPU, else None."""
  import torch  # pylint: disable=import-outside-toplevel
  if platform == "cpu":
    return "cpu"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda"
  return None


def tower_call(model, images, dtype: str, device: str) -> Callable[[], None]:
  """model(pixels, interpolate_pos_encoding=True, output_hidden_states=True) on images (B, S, S, 3)
  as a call that waits for the device."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
  x = x.to(device=device, dtype=getattr(torch, dtype))

  def call():
    with torch.inference_mode():
      model(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True)
    if device == "cuda":
      torch.cuda.synchronize()
  return call


def torch_row(model, images, dtype: str, device: str, b: int, flops: float,
              peak: Optional[float], repeats: int) -> dict:
  """Time the tower (`tower_call`) alone: the torch_tower row."""
  import torch  # pylint: disable=import-outside-toplevel
  cuda = device == "cuda"
  call = tower_call(model, images, dtype, device)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  rss0 = max_rss_bytes()
  timing = time_fn(call, repeats=repeats, sync=lambda _: None)
  row = {"stage": "torch_tower", "dtype": dtype, "batch": b, "torch_device": device,
         "torch_attention": getattr(model.config, "_attn_implementation", None),
         "torch_threads": torch.get_num_threads(), "flops_analytic": flops,
         "times_ms": [1e3 * s for s in timing["times_s"]],
         "min_ms_per_batch": 1e3 * timing["min_s"]}
  if cuda:
    row.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated()),
               peak_memory_source="torch.cuda.max_memory_allocated")
  else:
    row.update(peak_memory_bytes=max_rss_bytes() - rss0, peak_memory_source="host_max_rss_delta")
  return row_rates(row, timing["median_s"], b, flops, peak)


def paired(jax_encoder: Callable[[], None], tower: Callable[[], None], rounds: int) -> dict:
  """The JAX encoder and the torch tower timed in turn (`time_pairs`): fields of the torch row."""
  p = time_pairs(jax_encoder, tower, rounds)
  return {"paired_jax_ms": [1e3 * s for s in p["a_s"]], "paired_torch_ms": [1e3 * s for s in p["b_s"]],
          "jax_over_torch_paired": p["median_ratio"]}


def compare_torch(rows: List[dict]):
  """Attach the torch tower's ms/image, the ratio JAX encoder / torch tower of the two rows'
  medians and, where the torch row has one, the paired ratio (`paired`) to encoder rows."""
  ref = {(r["dtype"], r["batch"]): r for r in rows
         if r.get("stage") == "torch_tower" and "ms_per_image" in r}
  for r in rows:
    t = ref.get((r.get("dtype"), r.get("batch")))
    if r.get("stage") == "encoder" and t and "ms_per_image" in r:
      r["torch_ms_per_image"] = t["ms_per_image"]
      r["jax_over_torch"] = r["ms_per_image"] / t["ms_per_image"]
      if "jax_over_torch_paired" in t:
        r["jax_over_torch_paired"] = t["jax_over_torch_paired"]
