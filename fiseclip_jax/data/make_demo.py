"""Builds the embedded demo set (fiseclip_jax/data/demo/) from the Apache-2.0 hazelnut set.

  python -m fiseclip_jax.data.make_demo --src ../shared/data/otx_hazelnut_colour/hazelnut

Copies the test split and its ground truth (no train split) in MVTec AD layout, downsized to
256x256: images bicubic, saved as JPEG quality 90; masks 0/255 PNG resized nearest, so a mask and
its image still have the same size. File names are kept. Writes demo/NOTICE.txt.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from fiseclip_jax.data import datasets
from fiseclip_jax.data import demo_root
from fiseclip_jax.data import preprocess

SIZE = 256
JPEG_QUALITY = 90

NOTICE = """\
Demo image set: hazelnut (a small set, not MVTec AD)

What: {n_images} test images of hazelnuts on a yellow background ({n_defects} with a coloured
stain, defect type "colour", {n_good} good) and the {n_masks} ground-truth masks of the defective
ones, in MVTec AD layout: hazelnut/test/<defect>/<stem>.jpg and
hazelnut/ground_truth/<defect>/<stem>_mask.png. FiSeCLIP-JAX uses it for its no-download demo and
its tests (fiseclip_jax.data.demo_root()).

Source: test assets of OpenVINO Training Extensions (Intel Corporation),
https://github.com/openvinotoolkit/training_extensions , tests/assets/anomaly/hazelnut,
licensed under the Apache License, Version 2.0. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License
is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or
implied. See the License for the specific language governing permissions and limitations under the
License.

Modifications: only the test split and its masks were kept (no train split); every image was
downsized from 512x512 to {size}x{size} (PIL bicubic, re-encoded as JPEG quality {quality}) and
every mask to {size}x{size} (nearest neighbour, PNG 0/255). File names are unchanged. Rebuild with
  python -m fiseclip_jax.data.make_demo --src <the hazelnut folder>
"""


def shrink_image(src: Path, dst: Path, size: int = SIZE) -> None:
  """Any image -> size x size RGB JPEG (bicubic, quality JPEG_QUALITY)."""
  img = preprocess.resize_rgb(preprocess.read_rgb(src), size)
  img.save(dst, format="JPEG", quality=JPEG_QUALITY, optimize=True)


def shrink_mask(src: Path, dst: Path, size: int = SIZE) -> None:
  """Any mask -> size x size PNG of 0/255 (nearest, so no grey edge appears)."""
  defect = np.asarray(Image.open(src).convert("L")) > 0
  img = Image.fromarray(defect.astype(np.uint8) * 255)
  img.resize((size, size), Image.Resampling.NEAREST).save(dst, format="PNG", optimize=True)


def _category_dir(src: Path) -> Path:
  """Accepts the category folder itself or a root holding one 'hazelnut' category."""
  if not (src / "test").is_dir() and (src / "hazelnut" / "test").is_dir():
    return src / "hazelnut"
  return src


def make_demo(src: Path, out: Path, size: int = SIZE) -> List[Path]:
  """Writes the downsized test split of category folder `src` under `out`; returns the files."""
  src = _category_dir(Path(src))
  samples = datasets.mvtec_samples(src.parent, src.name)  # checks the layout and the masks
  written = []
  for s in samples:
    image = out / src.name / Path(s.path).relative_to(src).with_suffix(".jpg")
    image.parent.mkdir(parents=True, exist_ok=True)
    shrink_image(Path(s.path), image, size)
    written.append(image)
    if s.mask_path is not None:
      mask = out / src.name / Path(s.mask_path).relative_to(src)
      mask.parent.mkdir(parents=True, exist_ok=True)
      shrink_mask(Path(s.mask_path), mask, size)
      written.append(mask)
  n_defects = sum(s.label == 1 for s in samples)
  notice = out / "NOTICE.txt"
  notice.write_text(NOTICE.format(
      n_images=len(samples), n_defects=n_defects, n_good=len(samples) - n_defects,
      n_masks=n_defects, size=size, quality=JPEG_QUALITY))
  return written + [notice]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, type=Path,
                      help="the hazelnut category folder (with test/ and ground_truth/)")
  parser.add_argument("--out", default=Path(demo_root()), type=Path,
                      help="demo root to write (default: the package's demo/)")
  parser.add_argument("--size", default=SIZE, type=int)
  args = parser.parse_args(argv)
  written = make_demo(args.src, args.out, args.size)
  total = sum(p.stat().st_size for p in written)
  print(f"wrote {len(written)} files, {total / 1024:.0f} KiB, under {args.out}")


if __name__ == "__main__":
  main()
