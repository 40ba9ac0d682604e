"""``--metrics-addr HOST:PORT``: the mount's counters as Prometheus metrics.

prometheus-client serves ``/metrics`` from its own thread; at every scrape a collector reads
one consistent copy of the registry (:meth:`~glancefs.fs.status.MountStatus.counters`), so the
data path pays nothing for the metrics beyond the registry's counters themselves. Every series
is ``glancefs_``-prefixed:

========================================  ==========================================
series                                    meaning
========================================  ==========================================
glancefs_requests_total{method,status}    HTTP exchanges with Glance (status "error": no answer)
glancefs_retries_total{method}            of those, retries
glancefs_read_bytes_total                 image data received from Glance
glancefs_served_bytes_total               data answered to readers of the mount
glancefs_uploaded_bytes_total             data handed to Glance by uploads
glancefs_uploads_total{outcome}           uploads ended: uploaded, failed, aborted, empty
glancefs_errors_total{errno}              FUSE requests refused, by errno name
glancefs_open_files                       image files open for reading or uploading
glancefs_streams                          prefetching downloads running
glancefs_spool_bytes                      image data in the spool (reads without ranges, uploads)
glancefs_cache_hits_total                 reads answered from the data cache (``--cache-dir``)
glancefs_cache_hit_bytes_total            their bytes
glancefs_cache_misses_total               reads that found a cache block missing
glancefs_cache_stored_bytes_total         data stored in the cache
glancefs_cache_evictions_total            entries evicted to stay within ``--cache-size``
glancefs_cache_damaged_blocks_total       blocks dropped because they failed their check
glancefs_cache_rejected_entries_total     whole entries that failed the image's hash
glancefs_cache_bytes, ..._max_bytes       what the cache holds on disk, and its bound
glancefs_cache_entries                    images with data in the cache
glancefs_uptime_seconds                   since the mount started
========================================  ==========================================
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import ConfigError
from .status import MountStatus

__all__ = ["MetricsServer", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair; ConfigError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics-addr {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]"), int(port)


#: The data cache's figures (``CacheStats`` fields); all 0 without a cache.
_CACHE_COUNTERS = (
    ("glancefs_cache_hits", "hits", "Reads answered from the data cache."),
    ("glancefs_cache_hit_bytes", "hit_bytes", "Bytes answered from the data cache."),
    ("glancefs_cache_misses", "misses", "Reads that found a cache block missing."),
    ("glancefs_cache_stored_bytes", "written_bytes", "Data bytes stored in the cache."),
    ("glancefs_cache_evictions", "evictions", "Cache entries evicted to stay within the size."),
    ("glancefs_cache_damaged_blocks", "damaged_blocks", "Cache blocks dropped on a failed check."),
    ("glancefs_cache_rejected_entries", "rejected_entries", "Entries that failed the image hash."),
)
_CACHE_GAUGES = (
    ("glancefs_cache_bytes", "bytes", "Bytes the data cache holds on disk."),
    ("glancefs_cache_max_bytes", "max_bytes", "The data cache's size bound."),
    ("glancefs_cache_entries", "entries", "Images with data in the cache."),
)


class _RegistryCollector(Collector):
    def __init__(self, registry: MountStatus) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        counters: dict[str, Any] = self._registry.counters()
        requests = CounterMetricFamily(
            "glancefs_requests", "HTTP requests to Glance.", labels=["method", "status"]
        )
        for (method, status), count in sorted(counters["requests"].items()):
            requests.add_metric([method, status], count)
        yield requests
        retries = CounterMetricFamily("glancefs_retries", "Retried requests.", labels=["method"])
        for method, count in sorted(counters["retries"].items()):
            retries.add_metric([method], count)
        yield retries
        for name, key, text in (
            ("glancefs_read_bytes", "bytes_from_glance", "Image data received from Glance."),
            ("glancefs_served_bytes", "bytes_served", "Data answered to readers."),
            ("glancefs_uploaded_bytes", "bytes_uploaded", "Data sent to Glance by uploads."),
        ):
            yield CounterMetricFamily(name, text, value=counters[key])
        uploads = CounterMetricFamily("glancefs_uploads", "Uploads ended.", labels=["outcome"])
        for outcome, count in sorted(counters["uploads"].items()):
            uploads.add_metric([outcome], count)
        yield uploads
        errors = CounterMetricFamily("glancefs_errors", "Refused FUSE requests.", labels=["errno"])
        for name, count in sorted(counters["errors"].items()):
            errors.add_metric([name], count)
        yield errors
        yield GaugeMetricFamily(
            "glancefs_open_files", "Files open for reading or uploading.", counters["open_files"]
        )
        yield GaugeMetricFamily("glancefs_streams", "Prefetching downloads.", counters["streams"])
        yield GaugeMetricFamily(
            "glancefs_spool_bytes", "Image data in the spool.", counters["spool_bytes"]
        )
        cache = counters["cache"] or {}
        for name, key, text in _CACHE_COUNTERS:
            yield CounterMetricFamily(name, text, value=cache.get(key, 0))
        for name, key, text in _CACHE_GAUGES:
            yield GaugeMetricFamily(name, text, value=cache.get(key, 0))
        yield GaugeMetricFamily("glancefs_uptime_seconds", "Since the mount.", counters["uptime"])


class MetricsServer:
    """The ``/metrics`` HTTP server, bound at construction (a taken port fails at once)."""

    def __init__(self, address: tuple[str, int], registry: MountStatus) -> None:
        collectors = CollectorRegistry(auto_describe=True)
        collectors.register(_RegistryCollector(registry))
        host, port = address
        self._server, self._thread = start_http_server(port, addr=host, registry=collectors)
        self.address = address
        self._stopped = threading.Event()

    def stop(self) -> None:
        """Close the socket and wait for the server thread (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
