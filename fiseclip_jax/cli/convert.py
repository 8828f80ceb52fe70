"""Convert a checkpoint (CLIP, DINOv2) to this project's safetensors format.

  fiseclip-convert --src SRC --out weights/clip-vit-l14-336.safetensors
  fiseclip-convert --hf openai/clip-vit-large-patch14-336 --out weights/clip-vit-l14-336.safetensors

(`python -m weights.convert ...` in a checkout.) SRC: a Hugging Face CLIP folder (config.json and
model.safetensors: the recommended route, nothing in it can run code), a pytorch_model.bin, an
OpenAI `.pt` or an open_clip state dict. See `fiseclip_jax/convert/sources.py`. --hf fetches a Hub
repo through huggingface_hub (only config.json and one weights file) and gives the same file as
--src on a download of its folder; see `fiseclip_jax/convert/hub.py`.
"""
import os

from absl import flags

from fiseclip_jax.cli import app, options, runtime
from fiseclip_jax.cli.errors import UsageError
from fiseclip_jax.convert import hub
from fiseclip_jax.convert.header import sha256_file

FLAGS = flags.FLAGS


def run() -> None:
  if FLAGS.src and FLAGS.hf:
    raise UsageError("--src and --hf exclude each other: pass one")
  if not (FLAGS.src or FLAGS.hf) or not FLAGS.out:
    raise UsageError("--src SRC (or --hf REPO_ID) and --out FILE are required")
  if FLAGS.revision and not FLAGS.hf:
    raise UsageError("--revision goes with --hf")
  check_out_file(FLAGS.out)
  src, heads, got = FLAGS.src, (None, None), None
  if FLAGS.hf:
    got = hub.fetch_checkpoint(FLAGS.hf, FLAGS.revision)
    src, heads = got.path, got.heads       # open_clip_config.json's heads, unless flags say
  e = runtime.convert_engine()              # JAX: once the flags and the source are known good
  params, cfg, path = e.sources.convert(src, FLAGS.vision_heads or heads[0],
                                        FLAGS.text_heads or heads[1],
                                        trust_torchscript=FLAGS.trust_torchscript)
  digest = sha256_file(path)
  e.checkpoint.save_checkpoint(FLAGS.out, params, cfg, source_sha256=digest, source=path)
  where = (f"{got.repo_id} revision {got.revision} (commit {got.commit}) file "
           f"{os.path.basename(path)}" if got else path)
  print(f"wrote {FLAGS.out}: {cfg}\nsource {where} sha256 {digest}")


def check_out_file(out: str) -> None:
  """--out must be a file path whose folder this process can write in (before converting)."""
  if os.path.isdir(out):
    raise UsageError(f"--out {out} is a folder; expected a file path such as "
                     f"{os.path.join(out, 'clip-vit-l14-336.safetensors')}")
  folder = os.path.dirname(os.path.abspath(out))
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--out {out}: cannot create its folder ({e.strerror or e})") from None
  if not os.access(folder, os.W_OK | os.X_OK):
    raise UsageError(f"--out {out}: its folder {folder} is not writable")


def main(argv=None) -> None:
  flags.DEFINE_string("src", None, "HF CLIP folder, OpenAI .pt, or open_clip state dict.")
  flags.DEFINE_string("hf", None, "Instead of --src: a Hugging Face Hub repo id (e.g. "
                      "openai/clip-vit-large-patch14-336), fetched through huggingface_hub and "
                      "its cache (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN): config.json "
                      "and one weights file, model.safetensors first; or an open_clip repo's "
                      "weights.")
  flags.DEFINE_string("revision", None, "With --hf: a branch, tag or commit (default: main).")
  flags.DEFINE_string("out", None, "Output .safetensors file.")
  flags.DEFINE_integer("vision_heads", None, "OpenAI/open_clip layout only: vision heads (default: "
                       "width // 64; with --hf, an open_clip repo's open_clip_config.json).")
  flags.DEFINE_integer("text_heads", None, "OpenAI/open_clip layout only: text heads (default: "
                       "width // 64; with --hf, an open_clip repo's open_clip_config.json).")
  for name in ("vision_heads", "text_heads"):
    options.check(name, options.at_least(1), ">= 1")
  flags.DEFINE_bool("trust_torchscript", False,
                    "Load a TorchScript .pt (e.g. OpenAI's ViT-L-14-336px.pt) with torch.jit.load, which RUNS "
                    "CODE stored in the file: only for archives from a trusted source. By default only their "
                    "tensors are read and nothing in the file runs; use this only if that read is refused.")
  app.run(run, __doc__, argv)
