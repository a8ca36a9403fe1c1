"""Inference: the one Predictor (ONNX Runtime), heat maps, patient context, batch scoring."""
