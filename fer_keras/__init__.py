"""fer_keras: a ResNet-18 facial-expression classifier for FER2013 in TensorFlow 2 / Keras 3."""

import os as _os

# TensorFlow's C++ start-up chatter hides our own messages; users can still set the variable.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

CLASS_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 48
