"""The sidecar: scheduled scans and reaps, Prometheus metrics, health endpoints, one leader among replicas."""

from reaper.service.app import Service, serve
from reaper.service.metrics import ReaperMetrics

__all__ = ["ReaperMetrics", "Service", "serve"]
