"""How the evaluation report writes values: escaped text, three decimals, percentages, 95%
intervals; "–" where undefined."""

from __future__ import annotations

import html
import math

from markupsafe import Markup

MISSING = "–"


def esc(value) -> Markup:
    """`value` as HTML text (html.escape, quotes too); "" for None."""
    return Markup(html.escape("" if value is None else str(value)))


def num(value, digits: int = 3) -> str:
    """`value` with `digits` decimals; "–" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}"


def pct(value, digits: int = 1) -> str:
    """`value` (a share) as a percentage with `digits` decimals; "–" for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{100 * value:.{digits}f}%"


def interval(entry: dict, fmt=num) -> Markup:
    """The "95% CI low–high" span of an {"value", "ci_low", "ci_high"} entry; empty when unknown."""
    if entry.get("ci_low") is None or entry.get("ci_high") is None:
        return Markup("")
    return Markup('<span class="ci">95% CI {}–{}</span>').format(fmt(entry["ci_low"]), fmt(entry["ci_high"]))


def ci(entry: dict | None, fmt=num) -> Markup:
    """An entry's value followed by its interval span; "–" without a value."""
    if not entry or entry.get("value") is None:
        return Markup(MISSING)
    span = interval(entry, fmt)
    return esc(fmt(entry["value"])) + (Markup(" ") + span if span else Markup(""))
