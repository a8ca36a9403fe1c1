"""Render an evaluation (`dermsight.evaluation.evaluate`) as report.json and a self-contained
report.html: the page is the Jinja2 template templates/report.html with its CSS inline
(templates/report.css), figures inline PNGs and thumbnails inline JPEGs (`figures`); it loads
nothing from anywhere and opens offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from jinja2.ext import Extension
from markupsafe import Markup

from dermsight.data.schema import CLASS_NAMES
from dermsight.evaluation import figures
from dermsight.evaluation.formatting import ci, esc, interval, num, pct

DISCLAIMER = (
    "Decision support, not a diagnosis. These figures describe how the model ranked and classified the "
    "images of this data set. They do not replace examination by a clinician, and they need not hold for "
    "other populations, cameras or clinical settings."
)
SUBGROUP_TITLES = {"all": "All images", "sex": "Sex", "age_band": "Age band (years)", "site": "Anatomical site", "source": "Source"}


class _JoinLines(Extension):
    """A line break and the indentation after it are layout of an .html template only: the page is one line."""

    def preprocess(self, source: str, name: str | None, filename: str | None = None) -> str:
        return re.sub(r"\n[ \t]*", "", source) if name and name.endswith(".html") else source


_TEMPLATES = Environment(
    loader=PackageLoader("dermsight.evaluation", "templates"),
    autoescape=select_autoescape(["html"]),
    extensions=[_JoinLines],
    keep_trailing_newline=True,
)
_TEMPLATES.filters["esc"] = esc
_TEMPLATES.globals.update(ci=ci, interval=interval, num=num, pct=pct, class_names=CLASS_NAMES, subgroup_titles=SUBGROUP_TITLES)


def render_html(result: dict) -> str:
    """The report page of an evaluation result."""
    per_source = result.get("per_source") or []
    sweep = result.get("robustness", {}).get("sweep")
    images = {  # in the order the page shows them
        "sweep": figures.sweep_figure(sweep) if per_source and sweep else None,
        "roc": figures.roc_figure(result),
        "pr": figures.pr_figure(result),
        "reliability": figures.reliability_figure(result),
        "confusion": figures.confusion_figure(result),
        "thumbnails": [figures.thumbnail(case.get("image_ref")) for case in result.get("worst_false_negatives") or []],
    }
    css, _, _ = _TEMPLATES.loader.get_source(_TEMPLATES, "report.css")
    return _TEMPLATES.get_template("report.html").render(
        result=result,
        data=result["data"],
        check=result["threshold_check"],
        per_source=per_source,
        mode="grouped cross-validation (out-of-fold predictions)" if result["mode"] == "cross-validation" else "held-out data",
        sources_lead=_sources_lead(per_source),
        balanced_accuracy={**result["multiclass"]["balanced_accuracy_ci"], "value": result["official"]["balanced_accuracy"]},
        truth_detail=_truth_detail(result["ignored"].get("truth_rows_not_evaluated") or {}),
        figures=images,
        css=Markup(css),
        disclaimer=DISCLAIMER,
        disclaimer_detail=DISCLAIMER.split(". ", 1)[1],
    )


def _sources_lead(per_source: list[dict]) -> str:
    if any(r["held_out"] in ("left_out_source", "external_source") for r in per_source):
        return (
            "A clinic with its own dermatoscope should expect the first rows: sources no network that scored them ever "
            "saw. Grouped cross-validation within a source (further down) is optimistic: the network learned that "
            "source's look and class mix."
        )
    return "No source here was held out whole: these are within-source figures, optimistic for a new clinic."


def _truth_detail(truth: dict) -> list[str]:
    """Why truth records were not evaluated, one phrase per cause."""
    detail = []
    if truth.get("prediction_left_out"):
        detail.append(f"{truth['prediction_left_out']:,} whose prediction was left out (above)")
    if truth.get("no_prediction"):
        missing = f"{truth['no_prediction']:,} without any prediction"
        reasons = [f"{truth['unlabelled']:,} of them unlabelled"] if truth.get("unlabelled") else []
        if truth.get("no_image"):
            reasons.append(f"{truth['no_image']:,} without an image file")
        detail.append(missing + (f" ({', '.join(reasons)})" if reasons else ""))
    return detail


def write_report(result: dict, output: Path | str) -> dict[str, Path]:
    """Write report.json and report.html into `output` (created); returns their paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "report.json", "html": output / "report.html"}
    paths["json"].write_text(json.dumps(result, indent=1, allow_nan=False))
    paths["html"].write_text(render_html(result), encoding="utf-8")
    return paths
