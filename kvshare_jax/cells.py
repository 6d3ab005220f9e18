"""The cells of a layout study: one (layout, l, seed) point each. ``study.py`` plans and
runs them; ``report.py`` groups their results into rows.
"""

from __future__ import annotations

import dataclasses

from kvshare_jax.layout import STANDARD


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (layout, l) point of the study."""

    layout: str  # 'standard' or a preset name without ':l' ('pizza-top')
    kv_layers: int  # l (L for standard)
    mapping: str  # layer -> target string ('0_1_5_5_5_5')
    same_as: str | None = None  # name of the cell trained for this mapping, if another
    seed: int = 0  # offset added to train.seed (init and data order)

    @property
    def name(self) -> str:
        return f"{self.layout}-l{self.kv_layers}" + (f"-s{self.seed}" if self.seed else "")

    @property
    def point(self) -> tuple[str, int]:
        """The (layout, l) point of the study this cell is one seed of."""
        return self.layout, self.kv_layers

    @property
    def spec(self) -> str:
        """The ``model.layout`` value of this cell."""
        return STANDARD if self.layout == STANDARD else f"{self.layout}:{self.kv_layers}"

    @property
    def trained(self) -> str:
        """Name of the cell directory holding this cell's run."""
        return self.same_as or self.name
