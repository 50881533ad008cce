"""forecaster: predictive autoscaling for Kubernetes, served to KEDA as an external scaler."""

__version__ = "0.1.0"
