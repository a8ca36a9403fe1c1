"""The sections of bench/run.py, one module each, run in this order; each has
`run(args, settings, results) -> dict` (`results`: the figures of the sections before it) and
the torch ones `child(args, settings) -> dict` too (run in a process of their own through
`bench/run.py --child NAME`). What they share is in common.py; the server they start comes
from bench/_server.py.

  ceiling     raw ONNX Runtime forward of the bundle's graph (batch 32, 1 view, random input)
  batch       Predictor.predict_records (= dermsight predict) on test_128 and train_originals
  naive       one image at a time, PIL + batch 1 (eager torch from weights.pt, or the bundle's
              ONNX graph in a default session where the bundle ships no float weights)
  api         a real `dermsight serve` with an API key, a different real image per request
  train       `dermsight train` (embed mode) cold and warm; the shipped recipe's own recorded time
  finetune    images/s of finetune-mode training steps, three allocator set-ups
  second_run  `dermsight predict` twice on the same images (score cache), peak RSS
"""

from __future__ import annotations

import importlib

SECTIONS = ("ceiling", "batch", "naive", "api", "train", "finetune", "second_run")
# --only names that stand for sections: the memory figures come from the serve and predict runs.
ALIASES = {"memory": ("api", "second_run")}
# A section whose ratios need another section's figure pulls it in.
NEEDS = {"batch": ("ceiling",), "naive": ("batch",)}
CHILDREN = ("naive", "finetune")


def module(name: str):
    """The section's module (imported on first use: a section's imports cost only its own run)."""
    return importlib.import_module(f"{__name__}.{name}")
