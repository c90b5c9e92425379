"""Configuration: one TOML file format for every daemon and the CLI.

Precedence, lowest first: built-in defaults, the file (``--config`` or
``$ZSTORE_CONFIG``), environment variables ``ZSTORE_<SECTION>_<FIELD>``
(lists comma-separated, maps as ``k=v,k=v``), then command-line flags.
Secrets (the cluster token, TLS keys) are only ever named by file path, so
they never show up in ``ps`` output.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A configuration that cannot be used, with the reason."""


@dataclass
class EtcdConfig:
    endpoints: list[str] = field(default_factory=lambda: ["127.0.0.1:2379"])
    prefix: str = "/zstore"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    timeout: float = 5.0


@dataclass
class MetaConfig:
    listen: str = "127.0.0.1:7490"
    advertise_url: str | None = None     # how peers and clients reach this server
    meta_id: str | None = None           # default: derived from advertise_url
    token_file: str | None = None        # bearer token every API call must carry
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    lease_ttl: int = 5                   # leader lease; failover takes about this long
    # A stale replica whose chunk server has been down this long is rebuilt elsewhere
    # (a shorter outage resyncs only what changed when the server returns).
    recovery_grace: float = 600.0
    recovery_concurrency: int = 4        # recovery tasks (extent copies) at once, cluster-wide
    # A recovery task whose record has not changed this long (no claim, progress or error: a
    # copy its executor lost) is placed again; 0 never, else at least 60. A copy in progress
    # writes its progress after a range (1 MiB, or a dirty run of up to 64 MiB), at most once
    # a second: keep this above 64 MiB / chunk.recovery_rate and chunk.revert_timeout.
    recovery_stall_timeout: float = 600.0
    # Replicas of one extent each go to a failure domain (zone/rack/host) of their own; with
    # fewer domains than replicas, placement is refused (507) unless this lets them share one.
    allow_shared_failure_domain: bool = False


@dataclass
class ChunkConfig:
    data_dir: str = "/var/lib/zstore/chunk"
    disks: list[str] = field(default_factory=list)   # "PATH" or "PATH:CAPACITY"; default: data_dir/disk0
    address: str = "127.0.0.1"
    data_port: int = 7500
    portal: str = "127.0.0.1:3260"
    labels: dict[str, str] = field(default_factory=dict)
    lease_ttl: int = 5                   # a dead chunk server is shown down within this
    # iSCSI frontend: "builtin" (our own target on chunk.portal) or "lio" (the kernel's LIO
    # target on chunk.portal, configured from etcd, data served here through TCMU).
    frontend: str = "builtin"
    # Replication and recovery (docs/storage.md).
    replica_timeout: float = 5.0         # a replica silent this long is failed and dropped
    # A peer's REVERT (a whole extent, answered once synced) may take this long before the
    # peer is taken for dead: minutes on a slow disk, far above replica_timeout.
    revert_timeout: float = 600.0
    min_write_replicas: int = 1          # writes continue while at least this many replicas take them
    recovery_rate: float = 64.0          # MiB/s one recovery copy may use (client I/O keeps priority)
    scrub_rate: float = 16.0             # MiB/s the background checksum scrubber reads
    scrub_interval: float = 86400.0      # seconds between the starts of two full scrub passes
    iscsi_nop_interval: float = 15.0     # idle seconds before a NOP-In ping; dead initiators are dropped
    # A draining chunk server asks its initiators to log out, and closes the sessions
    # still open this many seconds later (once their in-flight commands are answered).
    drain_grace: float = 10.0
    # asyncio's own loop measured faster than uvloop for the target's batched socket
    # writes on our machines (bench/iscsi_bench.py); "uvloop" switches.
    event_loop: str = "asyncio"


@dataclass
class RedirectorConfig:
    vip: str = "127.0.0.2"               # the only address initiators need to know
    port: int = 3260
    interface: str | None = None         # where the VIP is added; None: a loopback VIP (no ARP)
    redirector_id: str | None = None     # default: hostname + port
    lease_ttl: int = 3                   # VIP failover takes about this long
    login_timeout: float = 10.0
    max_connections: int = 1024          # needs an open-file limit of this + 1152 (checked at start)


@dataclass
class ClientConfig:
    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:7490"])
    token_file: str | None = None
    ca_file: str | None = None
    timeout: float = 10.0


@dataclass
class LogConfig:
    level: str = "INFO"
    file: str | None = None


@dataclass
class Config:
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)
    redirector: RedirectorConfig = field(default_factory=RedirectorConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str | None = field(default=None, compare=False)

    def set(self, section: str, name: str, value: Any) -> None:
        """Set one field, converting strings to the field's type."""
        sect = getattr(self, section, None)
        if sect is None or not dataclasses.is_dataclass(sect):
            raise ConfigError(f"unknown config section [{section}]")
        hints = typing.get_type_hints(type(sect))
        if name not in hints:
            raise ConfigError(f"unknown config key {section}.{name}")
        setattr(sect, name, _convert(f"{section}.{name}", hints[name], value))

    def apply(self, overrides: Mapping[str, Any]) -> "Config":
        """Apply ``{"section.field": value}``; None values are skipped (unset flags)."""
        for dotted, value in overrides.items():
            if value is not None:
                section, _, name = dotted.partition(".")
                self.set(section, name, value)
        return self


def _convert(where: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "":
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [_convert(where, args[0], v) for v in value]
        if origin is dict:
            if isinstance(value, str):
                pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise TypeError
                value = {k.strip(): v.strip() for k, v in pairs}
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise TypeError
            return bool(value)
        if hint is int:
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def default_state_dir() -> Path:
    """Where ``zstore up`` keeps its cluster and the CLI looks for it."""
    if os.environ.get("ZSTORE_STATE_DIR"):
        return Path(os.environ["ZSTORE_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "zstore"


def find_config_file(explicit: str | None, env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file to read: --config, $ZSTORE_CONFIG, the local cluster's, /etc/zstore."""
    if explicit:
        return Path(explicit)
    if env.get("ZSTORE_CONFIG"):
        return Path(env["ZSTORE_CONFIG"])
    for candidate in (default_state_dir() / "zstore.toml", Path("/etc/zstore/zstore.toml")):
        if candidate.exists():
            return candidate
    return None


def load(path: str | Path | None = None, env: Mapping[str, str] = os.environ,
         overrides: Mapping[str, Any] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: {section!r} must be a [section]")
            for name, value in values.items():
                cfg.set(section, name, value)
        cfg.source = str(p)
        _resolve_relative(cfg, p.parent)
    for key, value in env.items():
        if key.startswith("ZSTORE_") and key.count("_") >= 2:
            section, _, name = key[len("ZSTORE_"):].lower().partition("_")
            if section in ("etcd", "meta", "chunk", "redirector", "client", "log"):
                cfg.set(section, name, value)
    if overrides:
        cfg.apply(overrides)
    return cfg


def _resolve_relative(cfg: Config, base: Path) -> None:
    """File paths in a config file are relative to that file, so a state dir can move."""
    for sect in (cfg.etcd, cfg.meta, cfg.chunk, cfg.redirector, cfg.client, cfg.log):
        for f in dataclasses.fields(sect):
            if f.name.endswith(("_file", "_dir")):
                v = getattr(sect, f.name)
                if isinstance(v, str) and v and not os.path.isabs(v):
                    setattr(sect, f.name, str(base / v))


# The marker of the example secrets in deploy/ (secret.yaml, chap-secret.yaml): a secret file
# that still holds it was installed unedited, and would be a token anyone can read.
PLACEHOLDER_MARKER = "REPLACE-ME"


def read_secret_file(path: str | None, what: str) -> str | None:
    if not path:
        return None
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError:      # never quote the bytes: they may be the secret
        raise ConfigError(f"{what} file {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{what} file {path} is empty")
    if PLACEHOLDER_MARKER in value:     # deploy/kubernetes ships REPLACE-ME-... examples
        raise ConfigError(f"{what} file {path} still holds the example placeholder "
                          f"({PLACEHOLDER_MARKER}...): put a real secret there (a long random string)")
    return value
