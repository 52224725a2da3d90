"""What the agent derives from its configuration and its buffer before the first cycle: the
supervisor's configuration, and its state (saved, migrated from an older agent, or new)."""

from __future__ import annotations

import logging
import math
from typing import Any

from lmt.config.agent import AgentConfig
from lmt.control import modes
from lmt.control.cap import LoadSpec
from lmt.control.supervisor import (
    MODES_OWNER,
    STATE_VERSION,
    LoadConfig,
    SupervisorConfig,
    SupervisorState,
    initial_state,
)

from .state_store import StateStore

log = logging.getLogger("lmt.agent")

RECORD_AFTER_S = 120.0  # a switching decision is recorded again with the site power this later


def supervisor_config(cfg: AgentConfig) -> SupervisorConfig:
    c = cfg.control
    loads = tuple(
        LoadConfig(LoadSpec(ld.name, ld.rated_kw, ld.priority, kind=ld.kind, min_on_s=ld.min_on_s,
                            min_off_s=ld.min_off_s, max_off_s=ld.max_off_s, min_pct=ld.min_pct),
                   device=ld.device, point=ld.point, full_scale=ld.full_scale or 100.0,
                   round=ld.round, rewrite_s=ld.rewrite_s)
        for ld in cfg.loads)
    return SupervisorConfig(
        cfg.terminal.id, loads, poll_interval_s=cfg.poll.interval_s, margin_kw=c.margin_kw,
        hysteresis_kw=c.restore_hysteresis_kw, min_off_s=c.min_off_s, min_on_s=c.min_on_s,
        restore_step_kw=c.restore_step_kw, baseline_window_s=cfg.dr.baseline_window_s,
        level_fractions=dict(cfg.dr.level_fractions), utc_offset_s=cfg.modes.utc_offset_s,
        response_fraction=c.response_fraction, response_readings=c.response_readings,
        noise_k=c.response_noise_k, record_after_s=RECORD_AFTER_S)


def load_state(store: StateStore, config: SupervisorConfig, now: float) -> SupervisorState:
    """The supervisor's state from the buffer: the saved one; or, from a buffer an older agent
    wrote, its held loads, DR events and mode parameters; or a new one. A saved state that
    cannot be read is reported and replaced by a new one (the held loads are then unknown: a
    load shed before is brought back by hand or by the next command)."""
    try:
        raw = store.load("supervisor")
    except ValueError as exc:
        log.error("%s; starting from a new control state", exc)
        raw = None
    if raw is not None:
        try:
            if raw.get("v") != STATE_VERSION:
                raise ValueError(f"version {raw.get('v')!r}, this agent writes {STATE_VERSION}")
            state = SupervisorState.from_dict(raw)
            if state.dr is not None and state.dr.get("terminal_id") not in (None, config.terminal):
                log.warning("DR state in the buffer is for terminal %s, not %s: not used",
                            state.dr.get("terminal_id"), config.terminal)
                state.dr = None
            return state
        except (ValueError, AttributeError) as exc:
            log.error("the control state in the buffer is unreadable (%s): starting from a new "
                      "one", exc)
    legacy = store.legacy()
    state = migrate(legacy, config, now)
    if legacy:  # taken over: saved as the supervisor's, the older agent's tables forgotten
        with store.file.atomic():
            store.save("supervisor", state.to_dict(), now)
            store.drop_legacy()
    return state


def migrate(legacy: dict[str, Any], config: SupervisorConfig, now: float) -> SupervisorState:
    """A supervisor state from what an agent before the supervisor kept (or a new one). The
    control clock starts at 0 with the first cycle: a load shed ``since`` (wall clock) gets
    its switch time that far before it, so its minimum and maximum off times run on."""
    st = initial_state(config)
    if not legacy:
        return st
    modes_kv: dict[str, Any] = legacy.get("modes", {})
    for name, (owner, since) in legacy.get("shed", {}).items():
        if name in st.loads:
            ld = st.loads[name]
            ld.held, ld.owner, ld.since, ld.on = True, owner, since, False
            ld.switched_t = -max(0.0, now - since)
    for name, pct in (modes_kv.get("restore_pct") or {}).items():
        if name in st.loads and isinstance(pct, int | float) and math.isfinite(pct):
            st.loads[name].restore_pct = float(pct)
            st.loads[name].on = True
    try:
        if modes_kv.get("params") is not None:
            st.mode_params = modes.ModeParams.from_dict(modes_kv["params"])
        if modes_kv.get("state") is not None:
            st.mode_state = modes.ModeState.from_dict(modes_kv["state"])
    except ValueError as exc:
        log.error("terminal control mode data in the buffer is unreadable (%s): starting from "
                  "what could be read", exc)
    dr = legacy.get("dr")
    if isinstance(dr, dict) and dr.get("terminal_id") == config.terminal:
        st.dr = dr
    # what a tripped round held: the modes' state says it; the rest was a command's
    tripped = set((st.mode_state.tripped if st.mode_state is not None else {}).keys())
    st.mode_held = sorted(lc.name for lc in config.loads if lc.round in tripped)
    for name in st.mode_held:
        st.loads[name].owner = MODES_OWNER
    log.info("control state migrated from an older buffer: %d held loads, mode parameters, "
             "%s", sum(ld.held for ld in st.loads.values()),
             "DR events" if st.dr else "no DR events")
    return st
