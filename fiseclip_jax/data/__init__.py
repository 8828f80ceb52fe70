"""Dataset readers (MVTec AD, VisA, BTAD, a plain folder), preprocessing and batching. No JAX."""
import os

from fiseclip_jax.data.datasets import BTAD_LAYOUT
from fiseclip_jax.data.datasets import IMAGE_EXTENSIONS
from fiseclip_jax.data.datasets import MVTEC_LAYOUT
from fiseclip_jax.data.datasets import Sample
from fiseclip_jax.data.datasets import VISA_LAYOUT
from fiseclip_jax.data.datasets import btad_categories
from fiseclip_jax.data.datasets import btad_samples
from fiseclip_jax.data.datasets import btad_train_samples
from fiseclip_jax.data.datasets import check_files
from fiseclip_jax.data.datasets import class_name
from fiseclip_jax.data.datasets import folder_samples
from fiseclip_jax.data.datasets import list_folder
from fiseclip_jax.data.datasets import mvtec_categories
from fiseclip_jax.data.datasets import mvtec_samples
from fiseclip_jax.data.datasets import mvtec_train_samples
from fiseclip_jax.data.datasets import visa_categories
from fiseclip_jax.data.datasets import visa_samples
from fiseclip_jax.data.datasets import visa_train_samples
from fiseclip_jax.data.loader import Batch
from fiseclip_jax.data.loader import iter_batches
from fiseclip_jax.data.loader import load_sample
from fiseclip_jax.data.loader import sample_mask
from fiseclip_jax.core.errors import BadInputError
from fiseclip_jax.data.preprocess import load_image
from fiseclip_jax.data.preprocess import load_mask
from fiseclip_jax.data.preprocess import preprocess_image
from fiseclip_jax.data.preprocess import read_rgb
from fiseclip_jax.data.preprocess import read_size
from fiseclip_jax.data.preprocess import to_uint8
from fiseclip_jax.data.preprocess import to_uint8_rgb
from fiseclip_jax.data.preprocess import to_unit
from fiseclip_jax.data.preprocess import unletterbox

DEMO_CATEGORY = "hazelnut"


def demo_root() -> str:
  """The embedded demo set, in MVTec AD layout: `mvtec_samples(demo_root(), "hazelnut")`.

  23 test images (17 'colour' defects with masks, 6 good) at 256x256, from the Apache-2.0 test
  assets of OpenVINO Training Extensions (see demo/NOTICE.txt).
  """
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


__all__ = [
    "BTAD_LAYOUT", "Batch", "BadInputError", "DEMO_CATEGORY", "IMAGE_EXTENSIONS", "MVTEC_LAYOUT",
    "Sample", "VISA_LAYOUT", "btad_categories", "btad_samples",
    "btad_train_samples", "check_files", "class_name", "demo_root",
    "folder_samples", "iter_batches", "list_folder", "load_image", "load_mask", "load_sample",
    "mvtec_categories", "mvtec_samples", "mvtec_train_samples", "preprocess_image", "read_rgb",
    "read_size", "sample_mask", "to_uint8", "to_uint8_rgb", "to_unit", "unletterbox", "visa_categories", "visa_samples", "visa_train_samples",
]
