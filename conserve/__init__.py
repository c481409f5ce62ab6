"""conserve: co-serving LLM engine for online and offline work on one model and device."""

from conserve.engine.output import CompletionOutput, RequestOutput
from conserve.llm import LLM
from conserve.sampling.params import SamplingParams
from conserve.version import __version__

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
