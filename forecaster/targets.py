"""From a scaler request's trigger (namespace, name, metadata) to a registered engine target.

Credentials stay with the servers the operator configured: KEDA passes no auth to an external
scaler, so a request may only name a configured Prometheus URL; with none configured, none. The
demo's fixed source answers every address.
"""

from __future__ import annotations

import logging
import reprlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping

from forecaster.config import Settings
from forecaster.engine import Engine
from forecaster.errors import InvalidInputError
from forecaster.models import MODEL_FACTORIES
from forecaster.sources import HistorySource
from forecaster.sources.prometheus import PrometheusServerConfig, PrometheusSource
from forecaster.spec import (
    TriggerSpec,
    check_memory,
    check_object_ref,
    parse_trigger_metadata,
    target_id,
)
from forecaster.state import Refused, SavedTarget
from forecaster.target import Target

log = logging.getLogger(__name__)

PARSE_CACHE_SIZE = 20_000

ParseKey = tuple[str, str, frozenset[tuple[str, str]]]


class SourceRegistry:
    """One client per Prometheus server, only for the servers the operator allows."""

    def __init__(
        self, servers: tuple[PrometheusServerConfig, ...], *, fixed: HistorySource | None = None,
        refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self._configured = {server.url: server for server in servers}
        self._fixed = fixed
        self._refused = refused  # told (reason, count) of the points a client refuses
        self._clients: dict[str, HistorySource] = {}
        self._lock = threading.Lock()

    def for_address(self, address: str) -> HistorySource:
        """The client for `address`; InvalidInputError if it is not a configured server."""
        if self._fixed is not None:
            return self._fixed
        url = address.rstrip("/")
        client = self._clients.get(url)
        if client is not None:
            return client
        if not self._configured:
            raise InvalidInputError(
                "serverAddress",
                "names no configured Prometheus server, and none is configured: list it under "
                "`prometheus:` in forecaster's config file, or set FORECASTER_PROMETHEUS_URL",
            )
        if url not in self._configured:
            # The configured addresses are the operator's to know, not every client's.
            raise InvalidInputError(
                "serverAddress",
                f"{reprlib.repr(url)} is not a configured Prometheus server (of "
                f"{len(self._configured)} configured): use the address as forecaster's config "
                f"file lists it",
            )
        with self._lock:
            if url not in self._clients:
                server = self._configured[url]
                self._clients[url] = PrometheusSource(server, refused=self._refused)
            return self._clients[url]


class TargetResolver:
    """Parses trigger metadata (with the configured defaults under it), checks the server, and
    registers the target with the engine. Parsed metadata is cached: KEDA repeats it verbatim
    on every poll, and the hot path must not re-validate it each time."""

    def __init__(self, engine: Engine, settings: Settings, sources: SourceRegistry) -> None:
        self.engine = engine
        self.settings = settings
        self.sources = sources
        self._parsed: OrderedDict[ParseKey, tuple[str, TriggerSpec]] = OrderedDict()
        self._warned: set[str] = set()

    def resolve(self, namespace: str, name: str, metadata: Mapping[str, str]) -> Target:
        key = (namespace, name, frozenset(metadata.items()))
        cached = self._parsed.get(key)
        if cached is None:
            check_object_ref(namespace, name)  # a scaler request's; the config's are the operator's
            cached = self._parse(namespace, name, metadata)
            self._parsed[key] = cached
            if len(self._parsed) > PARSE_CACHE_SIZE:
                self._parsed.popitem(last=False)
        tid, spec = cached
        return self.engine.ensure_target(tid, spec, self.sources.for_address(spec.server_address))

    def __len__(self) -> int:
        """How many parsed triggers are cached."""
        return len(self._parsed)

    def forget(self, target_ids: Collection[str]) -> None:
        """Let go of the parsed triggers of targets dropped or replaced, and of their warning
        of unknown keys: a dropped target's trigger would otherwise stay cached until 20,000
        others pushed it out, and its id would stay in the warned set for good (a target
        asked about again is warned about again)."""
        stale = [key for key, (tid, _) in self._parsed.items() if tid in target_ids]
        for key in stale:
            del self._parsed[key]
        self._warned.difference_update(target_ids)

    def _parse(
        self, namespace: str, name: str, metadata: Mapping[str, str]
    ) -> tuple[str, TriggerSpec]:
        if not namespace:
            raise InvalidInputError("scaledObjectRef.namespace", "is required")
        if not name:
            raise InvalidInputError("scaledObjectRef.name", "is required")
        spec, unknown = parse_trigger_metadata(
            metadata, known_models=MODEL_FACTORIES, defaults=self.settings.defaults,
            limits=self.settings.engine.trigger_limits,
        )
        check_memory(spec, self.settings.engine.target_memory_bytes)
        tid = target_id(namespace, name, spec.effective_metric_name)
        self.sources.for_address(spec.server_address)  # reject unconfigured servers early
        if unknown and tid not in self._warned:
            self._warned.add(tid)
            log.warning("target %s: ignoring unknown metadata keys %s", tid, ", ".join(unknown))
        return tid, spec

    def configured_ids(self) -> list[str]:
        """The target ids of the config file's targets."""
        return [
            self._parse(configured.namespace, configured.name, configured.metadata)[0]
            for configured in self.settings.targets
        ]

    def configured_specs(self) -> dict[str, TriggerSpec]:
        """The config file's targets: id -> spec."""
        return dict(
            self._parse(configured.namespace, configured.name, configured.metadata)
            for configured in self.settings.targets
        )

    def restore(self, saved: SavedTarget, *, configured: bool) -> Target:
        """Recreate a saved target on its server's client; Refused("memory") when its spec is
        over the targetMemoryBytes budget (lowered since it was saved), InvalidInputError
        when its server is no longer configured, TooManyTargetsError past maxTargets."""
        try:
            check_memory(saved.spec, self.settings.engine.target_memory_bytes)
        except InvalidInputError as exc:
            raise Refused("memory", str(exc)) from exc
        source = self.sources.for_address(saved.spec.server_address)
        return self.engine.restore(saved, source, configured=configured)

    def register_configured(self) -> list[Target]:
        """Register the targets listed in the config file, so they are warm before KEDA asks."""
        targets = []
        for configured in self.settings.targets:
            tid, spec = self._parse(configured.namespace, configured.name, configured.metadata)
            source = self.sources.for_address(spec.server_address)
            targets.append(self.engine.ensure_target(tid, spec, source, configured=True))
        return targets
