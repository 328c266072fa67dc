"""TransportService and CapabilityService: the gRPC adapters over the Dispatcher.

Handlers validate input, call the core, translate its outcome into a response
or a status with google.rpc details (domain "slotroute.dispatch.v1"), and log
one line per decision.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import grpc

from slotroute import rpc
from slotroute.dispatch.dispatcher import Dispatcher, LeaseInfo, LoadError, Outcome, Policy
from slotroute.dispatch.resolver import Decision, Kind, Tier
from slotroute.dispatch.v1 import capability_pb2 as _capability_pb2
from slotroute.dispatch.v1 import capability_pb2_grpc as _capability_pb2_grpc
from slotroute.dispatch.v1 import route_pb2 as _route_pb2
from slotroute.dispatch.v1 import transport_pb2 as _transport_pb2
from slotroute.dispatch.v1 import transport_pb2_grpc as _transport_pb2_grpc
from slotroute.ids import InvalidModelId, check_model_id
from slotroute.slot.states import State
from slotroute.slot.v1 import slot_pb2 as _slot_pb2

logger = logging.getLogger("slotroute.dispatch")

DOMAIN = "slotroute.dispatch.v1"
TRANSPORT_SERVICE = _transport_pb2.DESCRIPTOR.services_by_name["TransportService"].full_name
CAPABILITY_SERVICE = _capability_pb2.DESCRIPTOR.services_by_name["CapabilityService"].full_name

CAPABILITY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# Part of the caller's remaining time kept back, within these bounds in seconds, so that
# the dispatcher's own DEADLINE_EXCEEDED (which names the slot) reaches the caller before
# the caller's deadline fires.
_DEADLINE_SHARE = 0.2
_DEADLINE_MARGIN_MIN = 0.05
_DEADLINE_MARGIN_MAX = 0.5

_TIERS = {
    None: _route_pb2.TIER_UNSPECIFIED,
    Tier.REGISTRY: _route_pb2.TIER_REGISTRY,
    Tier.PASSTHROUGH: _route_pb2.TIER_PASSTHROUGH,
    Tier.PREFETCH: _route_pb2.TIER_PREFETCH,
}


# Wire value of each slot state: the enum's values are the wire names' suffixes.
_STATES = {None: _slot_pb2.SLOT_STATE_UNSPECIFIED} | {
    state: _slot_pb2.SlotState.Value(f"SLOT_STATE_{state.value}") for state in State
}


def _state(state: State | None) -> int:
    return _STATES[state]


def _policy(message: _route_pb2.WaitPolicy) -> Policy:
    return Policy(no_wait=message.no_wait, no_cold_start=message.no_cold_start,
                  lease=message.lease, lease_ttl=float(message.lease_ttl_seconds))


def _wait_limit(context: grpc.aio.ServicerContext, default: float) -> float:
    """Return the seconds this call may wait: the caller's deadline less a margin, or `default`."""
    remaining = context.time_remaining()
    if remaining is None:
        return default
    margin = min(max(remaining * _DEADLINE_SHARE, _DEADLINE_MARGIN_MIN), _DEADLINE_MARGIN_MAX)
    return max(remaining - margin, 0.0)


def _target(decision: Decision, lease: LeaseInfo | None) -> _route_pb2.Target:
    slot = decision.slot
    assert slot is not None
    target = _route_pb2.Target(
        source=decision.source,
        slot=slot.name,
        endpoint_url=slot.endpoint_url,
        state=_state(slot.state),
        revision=decision.revision,
        model_id=slot.model_id,
    )
    if lease is not None:
        target.lease.id = lease.id
        target.lease.slot = lease.slot
        target.lease.generation = lease.generation
        target.lease.expire_time.FromNanoseconds(int(lease.expires_at * 1e9))
    return target


def outcome_status(outcome: Outcome, subject: dict[str, str]) -> grpc.Status:
    """Translate a non-ROUTED outcome into a status; `subject` names the model or capability."""
    decision = outcome.decision
    metadata = dict(subject)
    if decision.source:
        metadata["source"] = decision.source
    if decision.slot is not None:
        metadata["slot"] = decision.slot.name
        metadata["state"] = decision.slot.state.value

    if outcome.load_error is not None:
        error = outcome.load_error
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)
        return rpc.rich_status(code, str(error), domain=DOMAIN, reason=error.reason or "LOAD_FAILED",
                               metadata=metadata, retry_delay=error.retry_after)
    if outcome.timed_out:
        slot = decision.slot.name if decision.slot else "?"
        return rpc.rich_status(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"slot {slot!r} was not READY before the deadline ({decision.message}); "
            "the load goes on, retry to pick it up",
            domain=DOMAIN, reason="LOAD_IN_PROGRESS", metadata=metadata, retry_delay=1.0,
        )
    if decision.kind is Kind.NOT_FOUND:
        if decision.tiers_tried:
            metadata["tiers_tried"] = ",".join(decision.tiers_tried)
            metadata["close_matches"] = ",".join(decision.close_matches)
            reason = "NO_ROUTE"
        else:
            metadata["known_capabilities"] = ",".join(decision.known_capabilities)
            reason = "NO_SLOT"
        return rpc.rich_status(grpc.StatusCode.NOT_FOUND, decision.message, domain=DOMAIN,
                               reason=reason, metadata=metadata)
    if decision.kind is Kind.FAILED:
        return rpc.rich_status(grpc.StatusCode.FAILED_PRECONDITION, decision.message,
                               domain=DOMAIN, reason="SLOT_FAILED", metadata=metadata)
    reason = "SLOT_LOADING"
    if outcome.reason:
        reason = outcome.reason
    elif decision.slot is None:
        reason = "SOURCE_UNAVAILABLE"
    elif decision.slot.external:
        reason = "ENDPOINT_UNAVAILABLE"
    elif decision.slot.state is State.ERROR:
        reason = "SLOT_RESTARTING"
    return rpc.rich_status(grpc.StatusCode.UNAVAILABLE, decision.message, domain=DOMAIN,
                           reason=reason, metadata=metadata,
                           retry_delay=decision.retry_after if decision.retry_after is not None else 1.0)


# Called once per Resolve or Route response with (kind, outcome or None when the
# request was invalid, status code name, seconds taken); metrics use it.
DecisionObserver = Callable[[str, Outcome | None, str, float], None]


def _log_decision(kind: str, requested: str, outcome: Outcome | None, started: float,
                  code: str = "OK", observer: DecisionObserver | None = None) -> None:
    latency_ms = (time.perf_counter() - started) * 1000
    if observer is not None:
        observer(kind, outcome, code, latency_ms / 1000)
    if outcome is None:
        logger.info("%s requested=%r outcome=%s latency_ms=%.2f", kind, requested, code, latency_ms)
        return
    # A warm hit is the hot path: it logs at debug, because formatting a line
    # per call costs about a third of the handler's time. Cold starts, misses
    # and errors log at info.
    level = logging.DEBUG if code == "OK" and not outcome.cold_start else logging.INFO
    if not logger.isEnabledFor(level):
        return
    decision = outcome.decision
    logger.log(
        level,
        "%s requested=%r canonical=%r tier=%s slot=%s source=%s revision=%d outcome=%s "
        "cold_start=%s latency_ms=%.2f",
        kind, requested, decision.model or decision.capability,
        decision.tier.value if decision.tier else "-",
        decision.slot.name if decision.slot else "-", decision.source or "-",
        decision.revision, code, outcome.cold_start, latency_ms,
    )


class TransportService(_transport_pb2_grpc.TransportServiceServicer):
    def __init__(self, dispatcher: Dispatcher, *, observer: DecisionObserver | None = None):
        self._dispatcher = dispatcher
        self._observer = observer

    async def Resolve(self, request, context):
        started = time.perf_counter()
        try:
            model = check_model_id(request.model)
        except InvalidModelId as error:
            _log_decision("resolve", request.model[:80], None, started, "INVALID_ARGUMENT",
                          observer=self._observer)
            await rpc.abort(context, rpc.rich_status(
                grpc.StatusCode.INVALID_ARGUMENT, str(error), domain=DOMAIN,
                reason="INVALID_MODEL_ID", metadata={"field": "model"}))

        dispatcher = self._dispatcher
        outcome = await dispatcher.resolve(
            model, _policy(request.policy), _wait_limit(context, dispatcher.config.default_wait)
        )
        decision = outcome.decision
        if decision.kind is not Kind.ROUTED or outcome.load_error or outcome.timed_out:
            status = outcome_status(outcome, {"model": model})
            _log_decision("resolve", model, outcome, started, status.code.name,
                          observer=self._observer)
            await rpc.abort(context, status)

        _log_decision("resolve", model, outcome, started, observer=self._observer)
        return _transport_pb2.ResolveResponse(
            model=decision.model,
            tier=_TIERS[decision.tier],
            target=_target(decision, outcome.lease),
            capability=decision.capability,
            cold_start=outcome.cold_start,
        )

    async def ListRoutes(self, request, context):
        routes = self._dispatcher.routes(include_prefetch=request.include_prefetch)
        return _transport_pb2.ListRoutesResponse(routes=[
            _transport_pb2.RouteEntry(
                model=listing.model, aliases=listing.aliases, tier=_TIERS[listing.tier],
                source=listing.source, slot=listing.slot, state=_state(listing.state),
                capability=listing.capability,
            )
            for listing in routes
        ])

    async def ReleaseLease(self, request, context):
        return await release_lease(self._dispatcher, request, context)


async def release_lease(dispatcher: Dispatcher, request, context):
    source = request.source or (next(iter(dispatcher.tables)) if len(dispatcher.tables) == 1 else "")
    if source not in dispatcher.tables:
        await rpc.abort(context, rpc.rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown source {request.source!r}; pass the target's source from the Resolve "
            f"response ({', '.join(dispatcher.tables)})",
            domain=DOMAIN, reason="UNKNOWN_SOURCE"))
    try:
        released = await dispatcher.release_lease(source, request.lease_id)
    except LoadError as error:
        await rpc.abort(context, rpc.rich_status(
            getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN), str(error),
            domain=DOMAIN, reason=error.reason or "RELEASE_FAILED"))
    return _route_pb2.ReleaseLeaseResponse(released=released)


LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
MAX_LABELS = 32
MAX_LABEL_VALUE = 128


def label_problem(labels) -> str:
    """Describe the first invalid required label, or return "" when all are valid."""
    if len(labels) > MAX_LABELS:
        return f"{len(labels)} labels given; pass at most {MAX_LABELS}"
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            return (f"invalid label key {key[:40]!r}; use 1 to 63 letters, digits, '.', '_', '/' "
                    "or '-', starting with a letter or digit")
        if len(value) > MAX_LABEL_VALUE or not value.isprintable():
            return (f"invalid value for label {key!r}: {value[:40]!r}; use at most "
                    f"{MAX_LABEL_VALUE} printable characters")
    return ""


class CapabilityService(_capability_pb2_grpc.CapabilityServiceServicer):
    def __init__(self, dispatcher: Dispatcher, slot_to_proto, *,
                 observer: DecisionObserver | None = None):
        self._dispatcher = dispatcher
        self._slot_to_proto = slot_to_proto
        self._observer = observer

    async def Route(self, request, context):
        started = time.perf_counter()
        capability = request.capability.strip()
        if not CAPABILITY_RE.match(capability):
            _log_decision("route", request.capability[:80], None, started, "INVALID_ARGUMENT",
                          observer=self._observer)
            await rpc.abort(context, rpc.rich_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"invalid capability {request.capability[:80]!r}; use a lower-case name such as "
                "'chat', 'embed', 'rerank', 'stt', 'tts', 'image' or 'vision'",
                domain=DOMAIN, reason="INVALID_CAPABILITY", metadata={"field": "capability"}))

        problem = label_problem(request.labels)
        if problem:
            _log_decision("route", capability, None, started, "INVALID_ARGUMENT",
                          observer=self._observer)
            await rpc.abort(context, rpc.rich_status(
                grpc.StatusCode.INVALID_ARGUMENT, problem, domain=DOMAIN,
                reason="INVALID_LABELS", metadata={"field": "labels"}))

        dispatcher = self._dispatcher
        outcome = await dispatcher.route(
            capability, dict(request.labels), _policy(request.policy),
            _wait_limit(context, dispatcher.config.default_wait),
        )
        decision = outcome.decision
        if decision.kind is not Kind.ROUTED or outcome.load_error or outcome.timed_out:
            status = outcome_status(outcome, {"capability": capability})
            _log_decision("route", capability, outcome, started, status.code.name,
                          observer=self._observer)
            await rpc.abort(context, status)

        _log_decision("route", capability, outcome, started, observer=self._observer)
        return _capability_pb2.RouteResponse(
            capability=capability,
            target=_target(decision, outcome.lease),
            cold_start=outcome.cold_start,
        )

    async def ListCapabilities(self, request, context):
        grouped: dict[str, list[_capability_pb2.CapabilitySlot]] = {}
        for table in self._dispatcher.tables.values():
            view = table.view()
            for slot in view.slots.values():
                for capability in slot.capabilities:
                    grouped.setdefault(capability, []).append(
                        _capability_pb2.CapabilitySlot(source=view.address, slot=self._slot_to_proto(slot))
                    )
        return _capability_pb2.ListCapabilitiesResponse(capabilities=[
            _capability_pb2.Capability(name=name, slots=slots) for name, slots in sorted(grouped.items())
        ])


def slot_info_to_proto(slot) -> _slot_pb2.Slot:
    return _slot_pb2.Slot(
        name=slot.name, device=slot.device, capabilities=slot.capabilities,
        default_for=slot.default_for, labels=dict(slot.labels), state=_state(slot.state),
        model_id=slot.model_id, endpoint_url=slot.endpoint_url, generation=slot.generation,
        message=slot.message, external=slot.external, in_flight=slot.in_flight,
        default_model=slot.default_model,
    )
