"""Alerts: the model, and the book of active alerts that producers raise and clear."""

from gateway.alerts.book import AlertBook, AlertSink
from gateway.alerts.model import Alert, Severity

__all__ = ["Alert", "AlertBook", "AlertSink", "Severity"]
