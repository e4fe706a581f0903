"""Serving engine: every role of one bundle served from one paged cache (see ``lragent.serve.engine``).

    from lragent.serve import Engine, SamplingParams, ServeConfig
    engine = Engine("bundle/", ServeConfig(mode="lrshared"))
    out = engine.generate("find the value of k7 .", role="planner", max_new_tokens=8)
"""
from lragent.modes import MODES

from .config import ServeConfig, ServeError
from .engine import Engine
from .sampling import SamplingParams
from .sequence import Completion, RequestOutput, RequestStats
from .tokens import NoChatTemplate
from .trajectory import Trajectory, TrajectoryError, load_trajectory, run_trajectory

__all__ = ["Engine", "MODES", "SamplingParams", "ServeConfig", "Completion", "RequestOutput", "RequestStats",
           "ServeError", "NoChatTemplate", "Trajectory", "TrajectoryError", "load_trajectory", "run_trajectory"]
