"""The benchmarks this library reads, as a table (DESIGN.md §12): how each lays out its files."""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

from fiseclip_jax.data import datasets


class Dataset(NamedTuple):
  """How a benchmark lays out its files."""
  name: str
  categories: Callable            # (root) -> [category]
  samples: Callable               # (root, category) -> [Sample] test split
  train_samples: Callable         # (root, category) -> [Sample] known-good training images
  class_name: Callable            # (category) -> the object's name in the prompts

  def with_class_name(self, name: str) -> "Dataset":
    """The same dataset with one class name in every category's prompts."""
    return self._replace(class_name=lambda _: name)


DATASETS: Dict[str, Dataset] = {
    "mvtec": Dataset("MVTec AD", datasets.mvtec_categories, datasets.mvtec_samples,
                     datasets.mvtec_train_samples, datasets.class_name),
    "visa": Dataset("VisA", datasets.visa_categories, datasets.visa_samples,
                    datasets.visa_train_samples, datasets.class_name),
    # BTAD names its categories 01, 02, 03: one class name for all, "product" unless told.
    "btad": Dataset("BTAD", datasets.btad_categories, datasets.btad_samples,
                    datasets.btad_train_samples, lambda _: "product"),
}
