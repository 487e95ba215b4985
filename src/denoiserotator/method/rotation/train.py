"""Learning R1 and R2 for one decoder layer by minimising the entropy loss (SPEC §4): the entry point,
dispatching to the selected optimizer."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

from denoiserotator.method.rotation.cayley import _train_cayley
from denoiserotator.method.rotation.iterate import RotationResult, StepCallback
from denoiserotator.method.rotation.lbfgs import _train_lbfgs
from denoiserotator.method.rotation.paper import _train_paper
from denoiserotator.method.rotation.problem import LayerProblem
from denoiserotator.settings import RotationSettings

log = logging.getLogger(__name__)


def _problem_damping(problem: LayerProblem) -> float:
    return max((statistic.damping for statistic in problem.inputs.values()), default=0.0)


def train_rotation(
    problem: LayerProblem,
    settings: RotationSettings,
    progress: bool = True,
    description: str = "rotation",
    callback: StepCallback | None = None,
) -> RotationResult:
    """Learn R1 and R2 for one layer; keeps the best iterate seen (identity included).

    `callback(step, rotation, blocks, loss)` is called at every accepted iterate (step 0 is
    the identity); benchmarks use it to evaluate a shared loss outside their timers. If it
    returns True, training stops there (stop reason "callback").
    """
    bar = tqdm(
        total=settings.steps,
        desc=description,
        leave=False,
        disable=not (progress and sys.stderr.isatty()),
    )
    try:
        if settings.optimizer == "paper":
            result = _train_paper(problem, settings, bar, description, callback)
        elif settings.optimizer == "cayley":
            result = _train_cayley(problem, settings, bar, description, callback)
        elif settings.optimizer == "lbfgs":
            result = _train_lbfgs(problem, settings, bar, description, callback)
    finally:
        bar.close()
    result.damping = _problem_damping(problem)
    return result
