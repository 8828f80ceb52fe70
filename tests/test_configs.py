"""eval/configs/: one flagfile per row of the paper's Tables 2 to 5, each yielding the FiSeConfig
its name promises. The expectations are written from the paper's tables (docs/DESIGN.md §6 for the
loop names), not read from the files."""
from pathlib import Path

import pytest
from absl import flags

from fiseclip_jax.cli import options
from fiseclip_jax.core.config import FiSeConfig

CONFIGS = Path(__file__).resolve().parents[1] / "eval" / "configs"
FEATURE_MATCHING_ALONE = dict(se_weight=0.0, image_score="max")      # Tables 3 and 4
EXPECTED = {
    "table2_without_filtering": dict(vote="off"),
    "table2_text_mask": dict(vote="text"),
    "table2_reversed_r": dict(r_list=(5, 3, 1)),
    "table2_layer_then_r": dict(filter_loop="layer"),
    "table2_flat": dict(filter_loop="flat"),
    "table2_ours": dict(),
    "table2_and_vote": dict(vote="and"),
    "table2_or_vote": dict(vote="or"),
    **{f"table3_lam_{lam}": dict(lam=float(lam), **FEATURE_MATCHING_ALONE)
       for lam in ("0.95", "1.00", "1.05", "1.10", "1.20")},
    **{f"table4_mu_{mu}": dict(mu=float(mu), **FEATURE_MATCHING_ALONE)
       for mu in ("0.47", "0.50", "0.53", "0.55", "0.57")},
    **{f"table5_proxy_layer_{k}": dict(proxy_layer=k) for k in (3, 6, 9, 12, 15, 18, 21, 24)},
    **{f"table5_{a}": dict(proxy_attention=a) for a in ("vv", "qq", "kk")},
}


def parse(path: Path) -> FiSeConfig:
  values = flags.FlagValues()
  options.define_method_flags(flag_values=values)
  values(["prog", f"--flagfile={path}"])
  return options.fise_config("cpu", has_bank=False, flag_values=values)


def test_every_table_row_has_its_file():
  assert sorted(p.stem for p in CONFIGS.glob("*.flags")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_flagfile_yields_the_promised_config(name):
  assert parse(CONFIGS / f"{name}.flags") == FiSeConfig(**EXPECTED[name])
