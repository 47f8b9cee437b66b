"""The bundled EfficientNet-Lite0 model and images, and the small helpers the steps share.

Everything here is plain numpy + onnxruntime: loading the images from ``data/effnet_images.npz``
(already RGB, resized and center-cropped to 224x224 uint8 by ``data/make_data.py``), turning
them into the model's input, and comparing a compiled model with the float one.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DATA = Path(__file__).resolve().parent / "data"
MODEL = DATA / "effnet_lite0.onnx"
IMAGES = DATA / "effnet_images.npz"
INPUT = "input"  # the model's input name: float [batch, 3, 224, 224]
THREADS = 2


def images(split: str) -> np.ndarray:
    """The bundled ``calib`` (32) or ``eval`` (48) images as the model's input: float32 NCHW.

    EfficientNet-Lite0 preprocessing: x/255, then (x - 0.5) / 0.5, HWC -> CHW.
    """
    with np.load(IMAGES) as data:
        u8 = data[split]
    x = (u8.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def calibration_feeds(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One feed dict per image (batch 1), the form ``qcompiler.compile(calibration=...)`` takes."""
    return [{INPUT: x[i:i + 1]} for i in range(len(x))]


def session(path: str | os.PathLike[str], threads: int = THREADS, *, as_written: bool = False
            ) -> ort.InferenceSession:
    """An onnxruntime CPU session; every model in the examples is run with the same options.

    ``as_written`` turns graph optimization off, so a model built for other hardware (an NPU)
    runs its DequantizeLinear -> float op -> QuantizeLinear steps as the file says. With
    optimization on, onnxruntime fuses them into its own int8 CPU kernels, which on x86 without
    VNNI saturate for weights not made for that CPU (``qcompiler check`` warns when they will)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if as_written:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's output for every image in ``x`` (float64 [n, 1000])."""
    outs = [sess.run(None, {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs).astype(np.float64)


def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely ``candidate`` logits follow ``reference``: top-1 agreement and mean cosine."""
    agree = float(np.mean(reference.argmax(1) == candidate.argmax(1)))
    cos = np.sum(reference * candidate, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    return {"top1_agreement": agree, "logits_cosine": float(np.mean(cos))}


def op_histogram(path: str | os.PathLike[str]) -> dict[str, int]:
    """Node count per op type of a saved model (main graph)."""
    counts = collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return dict(sorted(counts.items()))


def write_json(path: Path | None, summary: dict) -> None:
    """Write a step's printed numbers as JSON (``--json``), creating the folder."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
