"""Convert a CLIP checkpoint to this project's safetensors format.

  fiseclip-convert --src SRC --out weights/clip-vit-l14-336.safetensors

(`python -m weights.convert ...` in a checkout.) SRC: a Hugging Face CLIP folder (config.json and
model.safetensors: the recommended route, nothing in it can run code), a pytorch_model.bin, an
OpenAI `.pt` or an open_clip state dict. See `fiseclip_jax/convert.py`.
"""
from absl import flags

from fiseclip_jax.cli import app

FLAGS = flags.FLAGS


def run() -> None:
  from fiseclip_jax import convert
  from fiseclip_jax.checkpoint import save_checkpoint, sha256_file
  from fiseclip_jax.cli.errors import UsageError
  if not FLAGS.src or not FLAGS.out:
    raise UsageError("--src SRC and --out FILE are required")
  params, cfg, path = convert.convert(FLAGS.src, FLAGS.vision_heads, FLAGS.text_heads,
                                      trust_torchscript=FLAGS.trust_torchscript)
  digest = sha256_file(path)
  save_checkpoint(FLAGS.out, params, cfg, source_sha256=digest, source=path)
  print(f"wrote {FLAGS.out}: {cfg}\nsource {path} sha256 {digest}")


def main(argv=None) -> None:
  flags.DEFINE_string("src", None, "HF CLIP folder, OpenAI .pt, or open_clip state dict.")
  flags.DEFINE_string("out", None, "Output .safetensors file.")
  flags.DEFINE_integer("vision_heads", None, "OpenAI/open_clip layout only: vision heads (default width // 64).")
  flags.DEFINE_integer("text_heads", None, "OpenAI/open_clip layout only: text heads (default width // 64).")
  flags.DEFINE_bool("trust_torchscript", False,
                    "Load a TorchScript .pt (e.g. OpenAI's ViT-L-14-336px.pt) with torch.jit.load, which RUNS "
                    "CODE stored in the file: only for archives from a trusted source. By default only their "
                    "tensors are read and nothing in the file runs; use this only if that read is refused.")
  app.run(run, __doc__, argv)
