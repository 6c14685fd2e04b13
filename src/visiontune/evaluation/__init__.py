"""Evaluation: metrics, calibration, the HTML report, Grad-CAM, plots and the data check."""
