"""The YAML configuration: pydantic models (:mod:`~forwarder.config.models`) and loading with
errors that name key and line (:mod:`~forwarder.config.load`)."""

from __future__ import annotations

from forwarder.config.load import config_path_from_env, json_schema, load_config, parse_config
from forwarder.config.models import (
    DEFAULT_CONFIG_PATH,
    Config,
    Destination,
    Duration,
    ListenConfig,
    ListenTLS,
    MetricsConfig,
    RetryPolicy,
    StorageCommitment,
    TLSConfig,
    VerifyByQuery,
    WatchConfig,
    WebAuth,
)
from forwarder.config.routing import Route
from forwarder.durations import parse_duration

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "Destination",
    "Duration",
    "ListenConfig",
    "ListenTLS",
    "MetricsConfig",
    "RetryPolicy",
    "Route",
    "StorageCommitment",
    "TLSConfig",
    "VerifyByQuery",
    "WatchConfig",
    "WebAuth",
    "config_path_from_env",
    "json_schema",
    "load_config",
    "parse_config",
    "parse_duration",
]
