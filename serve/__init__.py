"""Serving engine: every role of one bundle served from one paged cache (see ``lragent.serve.engine``).

    from lragent.serve import Engine, SamplingParams
    engine = Engine("bundle/", mode="lrshared")
    out = engine.generate("find the value of k7 .", role="planner", max_new_tokens=8)
"""
from .config import ServeError
from .engine import MODES, Engine
from .sampling import SamplingParams
from .sequence import Completion, RequestStats
from .trajectory import Trajectory, TrajectoryError, load_trajectory, run_trajectory

__all__ = ["Engine", "MODES", "SamplingParams", "Completion", "RequestStats", "ServeError", "Trajectory",
           "TrajectoryError", "load_trajectory", "run_trajectory"]
