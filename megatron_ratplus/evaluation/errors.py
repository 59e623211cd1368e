"""The user errors of evaluation: each names what is wrong and, where it can, how to fix it."""

from megatron_ratplus.errors import UserError


class EvaluationError(UserError):
    """Base of the evaluation errors below."""


class UnknownTaskError(EvaluationError):
    """A task name that no suite (lm-eval, RULER, LongBench) knows."""


class DatasetMissingError(EvaluationError):
    """A task's data files are not on this machine (nothing is downloaded)."""


class ContextLengthError(EvaluationError):
    """An input longer than the model's maximum length."""


class UnknownMetricError(EvaluationError):
    """A metric name no scorer implements."""
