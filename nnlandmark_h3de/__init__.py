"""3D anatomical landmark detection on top of nnU-Net v2 (nnLandmark recipe + H3DE-Net)."""
__version__ = "0.1.0"
