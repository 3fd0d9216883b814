"""This suite runs where it must: stock onnxruntime 1.31 (not ORT Training) and no torch."""

import importlib.util

import onnxruntime


def test_stock_onnxruntime():
    assert onnxruntime.__version__.startswith("1.31."), f"onnxruntime {onnxruntime.__version__}: run this suite with .venv-ort"
    assert importlib.util.find_spec("onnxruntime.training") is None, "ORT Training installed: run this suite with .venv-ort"


def test_no_torch():
    """The references reach this suite as arrays in files; torch here would hide a missing one."""
    assert importlib.util.find_spec("torch") is None, "torch is installed: run this suite with .venv-ort"
