"""What a melanoma risk meant on held-out images: the bundle's own out-of-fold validation
predictions (its out_of_fold.csv.gz), each made by a network that had not trained on that
lesion, with their diagnoses.

A result card says, for its risk, how many of the validation images with the nearest risks
were melanoma and which collections those images came from; /learn shows the same figures
for a few risks. Both read them here, from the bundle that scored the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dermsight.evaluation.held_out import SOURCE_NAMES, HeldOutError, load_out_of_fold
from dermsight.models.bundle import Bundle

NEIGHBOURS = 500  # validation images compared with one risk: enough for a share to +-4 points, few enough to stay local


@dataclass(frozen=True)
class RiskBand:
    """`images` validation images with risks from `low` to `high`, `melanomas` of them melanoma."""

    low: float
    high: float
    images: int
    melanomas: int

    @property
    def melanoma_share(self) -> float:
        return self.melanomas / self.images


class RiskReference:
    """The out-of-fold validation risks of one bundle (`model_version`) and whether each was
    a melanoma, sorted by risk; `measured_on` names the images."""

    def __init__(self, model_version: str, risks: np.ndarray, melanoma: np.ndarray, measured_on: str):
        order = np.argsort(risks, kind="stable")
        self.model_version = model_version
        self.risks = np.asarray(risks, dtype=float)[order]
        self.melanoma = np.asarray(melanoma, dtype=bool)[order]
        self.measured_on = measured_on

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> RiskReference | None:
        """The bundle's out-of-fold table; None for a bundle without one (nothing to compare with)."""
        try:
            oof = load_out_of_fold(bundle)
        except HeldOutError:
            return None
        if oof.empty or "MEL" not in oof.columns:
            return None
        names = [SOURCE_NAMES.get(s, s) for s in oof["source"].value_counts().index]
        measured_on = (
            f"{len(oof):,} out-of-fold validation images ({', '.join(names)}), each scored by a network "
            "that had not trained on that lesion"
        )
        melanoma = (oof["diagnosis"] == "MEL").to_numpy()
        return cls(bundle.version, oof["MEL"].to_numpy(dtype=float), melanoma, measured_on)

    def around(self, risk: float, neighbours: int = NEIGHBOURS) -> RiskBand:
        """The `neighbours` validation images whose risks are nearest `risk` (fewer when the
        table is smaller)."""
        count = min(neighbours, len(self.risks))
        position = int(np.searchsorted(self.risks, risk))
        start = min(max(0, position - count // 2), len(self.risks) - count)
        window = slice(start, start + count)
        return RiskBand(
            low=float(self.risks[window][0]), high=float(self.risks[window][-1]), images=count,
            melanomas=int(self.melanoma[window].sum()),
        )
