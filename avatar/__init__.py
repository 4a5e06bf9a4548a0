"""VASA Avatar: one photo plus a voice becomes a talking face (offline video or virtual webcam)."""

__version__ = "0.1.0"
