"""Canal: a centralized east-west gateway manager for Kubernetes + Istio."""

__version__ = "0.1.0"
