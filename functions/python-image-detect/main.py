"""Finds faces in an image file (by reference) with OpenCV's bundled Haar cascades.

params: {"file_id", "ai_model"?: one of MODELS, "min_neighbors"?, "scale_factor"?, "min_size"?}
result: {"file_id", "width", "height", "ai_model", "count",
         "detections": [{"label", "score", "box": {"x", "y", "width", "height"}}]}
"""

import cv2
import fnrt
import numpy as np


class InvalidParams(ValueError):
    code = "INVALID_PARAMS"


# The models this function has: cascades shipped inside opencv-python-headless.
MODELS = {
    "haar-frontalface": ("haarcascade_frontalface_default.xml", "face"),
    "haar-frontalface-alt": ("haarcascade_frontalface_alt2.xml", "face"),
    "haar-profileface": ("haarcascade_profileface.xml", "face"),
    "haar-eye": ("haarcascade_eye.xml", "eye"),
}

# Loaded once per instance, at the first use of each.
_cascades = {}


def _cascade(model):
    if model not in _cascades:
        path, label = MODELS[model]
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + path)
        if cascade.empty():
            raise RuntimeError(f"the cascade of {model} did not load")
        _cascades[model] = (cascade, label)
    return _cascades[model]


def handler(params, context):
    model = params.get("ai_model", "haar-frontalface")
    if model not in MODELS:
        raise InvalidParams(f"unknown ai_model '{model}'; models: {', '.join(MODELS)}")
    data = np.frombuffer(fnrt.files.read(params["file_id"]), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise InvalidParams("the file is not an image OpenCV reads")
    cascade, label = _cascade(model)
    side = params.get("min_size", 24)
    boxes, _, weights = cascade.detectMultiScale3(
        cv2.equalizeHist(image),
        scaleFactor=params.get("scale_factor", 1.1),
        minNeighbors=params.get("min_neighbors", 5),
        minSize=(side, side),
        outputRejectLevels=True,
    )
    detections = [
        {
            "label": label,
            "score": round(float(score), 3),
            "box": {"x": int(x), "y": int(y), "width": int(w), "height": int(h)},
        }
        for (x, y, w, h), score in zip(boxes, np.ravel(weights))
    ]
    detections.sort(key=lambda d: -d["score"])
    return {
        "file_id": params["file_id"],
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
        "ai_model": model,
        "count": len(detections),
        "detections": detections,
    }
