"""The simulator: a fake Midjourney-proxy upstream, in process (`SimulatorUpstream`) or over HTTP (`build_sim_app`)."""

from adapters.simulator.adapter import SimulatorUpstream
from adapters.simulator.engine import SimEngine, SimSettings
from adapters.simulator.server import DIALECTS, build_sim_app

__all__ = ["DIALECTS", "SimEngine", "SimSettings", "SimulatorUpstream", "build_sim_app"]
