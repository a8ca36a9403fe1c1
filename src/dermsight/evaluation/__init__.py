"""Model evaluation: metrics (official ISIC scores, partial AUC, calibration error, bootstrap
intervals, subgroup tables) and post-hoc calibration (temperature scaling, isotonic regression,
sensitivity-first threshold choice). Pure functions on arrays and data frames."""
