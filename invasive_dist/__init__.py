"""invasive-dist: distributed ResNet training for the Kaggle Invasive Species Monitoring data."""

__version__ = "0.1.0"
