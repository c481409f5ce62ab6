"""One request at a time through `LLM` (the default model, no server), 40 greedy tokens each,
eight requests per setting, with 0, 0.5 or 2 s of pause before each request: the median run
time of the decode steps. Usage: python decode_step_inprocess.py
A record of a measurement (session 34), not a maintained command."""
import statistics
import time

from conserve import LLM, SamplingParams
from conserve.engine.stats import StepObserver


class Log(StepObserver):
    def __init__(self):
        self.runs = []

    def on_step_end(self, record):
        self.runs.append(record.run_s * 1e3)


llm = LLM("default")
log = Log()
llm.engine.add_observer(log)
params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
for _ in range(2):
    for pause in (0.0, 0.5, 0.0, 2.0):
        steps = []
        for _ in range(8):
            log.runs.clear()
            time.sleep(pause)
            llm.generate(["Once upon a time"], params)
            steps += log.runs[1:]  # the decode steps (the first computed the prompt)
        p90 = sorted(steps)[int(len(steps) * 0.9)]
        print(f"pause {pause:.1f} s: decode step median {statistics.median(steps):.2f} ms, p90 {p90:.2f}")
