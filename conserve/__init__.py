"""conserve: co-serving LLM engine for online and offline work on one model and device."""

from conserve.engine.output import CompletionOutput, RequestOutput
from conserve.llm import LLM
from conserve.sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
