"""The engine: requests in, outputs out. One step is plan -> execute -> apply."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from conserve.config import DEFAULT_KV_CACHE_GB, EngineConfig
from conserve.engine.attainment import HarvestCounter, ObjectiveCounter
from conserve.engine.batch import IterationPreempted, ScheduledBatch, StepResult, StopFlag
from conserve.engine.latency import BatchShape, LatencyModel
from conserve.engine.output import RequestOutput, SequenceState, stop_status
from conserve.engine.policy import Policy, Slo, make_policy, policy_class
from conserve.engine.request import Request, RequestClass, RequestStatus
from conserve.engine.scheduler import Scheduler
from conserve.engine.stats import EngineStats, HostTierStats, KVStats, StepObserver, StepRecord
from conserve.engine.step_log import StepLog
from conserve.kernels import CpuKernels
from conserve.kv.cache import KVTensors
from conserve.kv.host_file import HostFile
from conserve.kv.host_tier import HostKVStore, TensorMover
from conserve.kv.manager import KVCacheManager
from conserve.model.config import ModelConfig
from conserve.model.llama import LlamaModel
from conserve.model.loader import build_model, read_weights, resolve_model
from conserve.model.tokenizer import Tokenizer
from conserve.platform import tune_cpu_allocator
from conserve.sampling.params import SamplingParams

log = logging.getLogger(__name__)
# a stopped offline step resumes once no online work is left; while online work stays (a long
# stream), its requests are held at most max(MAX_HOLD_S, HOLD_STEPS x its predicted time),
# then it is dropped (measured: beside one continuous stream, a stopped step of long prompts
# held every running offline request for the whole stream, and offline work got nothing)
MAX_HOLD_S = 2.0
HOLD_STEPS = 2.0
# Host-tier checkpoints go in gathered copies of at most this many blocks, with a look for an
# arrived online request before each: 240 offline decodes that crossed a block boundary
# together made one 22 ms copy, which an online arrival waited for in full (a step log of
# `bench coserve`, decode-heavy job, benchmarks/results/coserve-20261203-1336); 16 blocks of the
# default model hold 5.9 MB of K and V.
CHECKPOINT_SLICE_BLOCKS = 16
# An open door (`Engine.door`: the HTTP server is reading requests of a class it does not know
# yet) counts as an online arrival for at most this long after it opened: long enough for the
# API process to validate and tokenize a request (1.5 ms at the median on an idle 2-core AMD
# EPYC, 5.3 ms beside a 240-sequence offline decode step), short enough that a door left open
# by a stream of arrivals costs offline work little.
DOOR_WAIT_S = 0.05


class Runner(Protocol):
    """Computes a planned step. The engine reads `progress` from another thread while a step
    runs (the fraction of its layers done, 0 between steps) to estimate its remaining time.
    A runner whose stopped steps can be finished later also has `resume(continuation, stop)`
    (`ModelRunner.resume`), and puts the continuation in its `IterationPreempted`."""

    progress: float

    def execute(self, batch: ScheduledBatch, stop: Callable[[], bool] | None = None) -> StepResult:
        """Run `batch`. With `stop`, call it at every safepoint; when it returns True, raise
        `IterationPreempted` there (nothing sampled, nothing to commit)."""
        ...


class ContextLengthError(ValueError):
    """The prompt (plus the requested output) does not fit the context window."""


@dataclass
class _Step:
    """A running preemptible step, as the preemption monitor sees it."""

    start: float
    predicted: float
    online: float = 0.0  # predicted seconds of its online work alone
    first: float = 0.0  # fraction of the layers done before it started (a resumed step)
    stop_requested_at: float = 0.0
    stop: StopFlag = field(default_factory=StopFlag)  # what the runner reads at safepoints


@dataclass
class _Stopped:
    """An offline step stopped at a safepoint, with what its finished layers computed."""

    batch: ScheduledBatch
    continuation: object
    layer: int
    at: float = field(default_factory=time.monotonic)  # when it stopped

    def hold_limit(self) -> float:
        """Seconds its requests may stay held while online work never leaves: then it is
        dropped (they compute its tokens again, beside the online work), as it would lose at
        most what it computed before the stop."""
        return max(MAX_HOLD_S, HOLD_STEPS * (self.batch.predicted_s or 0.0))


@dataclass
class _Group:
    """The n sequences of one request, reported together."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceState] = field(default_factory=list)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.output for s in self.sequences],
            num_cached_tokens=self.sequences[0].request.num_cached_tokens,
        )


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Tokenizer,
        scheduler: Scheduler,
        runner: Runner,
        max_model_len: int,
        model_name: str = "model",
        model_config: ModelConfig | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.model_config = model_config
        self.model_source: str | None = None  # file or folder the weights came from
        self._groups: dict[str, _Group] = {}
        self._seq_to_group: dict[str, tuple[_Group, SequenceState]] = {}
        self.num_steps = 0
        self.busy_s = 0.0  # seconds the steps that ran to the end computed
        # what co-serving achieved: online objectives met, offline work beside online work
        self.objectives = ObjectiveCounter()
        self.harvest = HarvestCounter()
        self._observers: list[StepObserver] = [self.harvest]
        self._stopped: _Stopped | None = None  # a stopped offline step, to be resumed
        self.num_layer_resumes = 0  # stopped steps resumed (their finished layers kept)
        self.num_layer_drops = 0  # stopped steps dropped before their resume
        # requests aborted before they finished (a client left, a batch was cancelled), by class
        self.aborted_by_class = {c: 0 for c in RequestClass}
        self.latency: LatencyModel | None = None
        # layer-wise preemption: the step that may be stopped, and which one to stop
        self._current: _Step | None = None
        self.num_layer_preemptions = 0
        # Online arrivals the monitor was told about (`announce_online`) and those the loop
        # has taken in (`online_received`); any gap is a request no plan has seen yet, which
        # may stop a step that starts before the loop takes it in.
        self._stop_lock = threading.Lock()
        self._announced = 0
        self._received = 0
        self._pending_prompt_len: int | None = None
        self._door_opened: float | None = None  # see `door`

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def from_config(config: EngineConfig) -> Engine:
        cfg = config.resolved()
        device = torch.device(cfg.device)
        if device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
            tune_cpu_allocator()
        source = resolve_model(cfg.model)
        model_cfg, tensors = read_weights(source)
        model = build_model(model_cfg, tensors, cfg.torch_dtype, device)
        del tensors
        tokenizer = Tokenizer.load(source)
        num_blocks = _num_blocks(cfg, model_cfg)
        max_len = _max_model_len(cfg, model_cfg, num_blocks)
        cfg = replace(cfg, max_model_len=max_len, cache=replace(cfg.cache, num_blocks=num_blocks))
        kv_manager = KVCacheManager(
            num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching
        )
        kv = KVTensors(model_cfg, num_blocks, cfg.cache.block_size, cfg.torch_dtype, device)
        from conserve.engine.runner import ModelRunner

        kernels = _kernels(cfg, model, device)
        runner = ModelRunner(
            model,
            kv,
            max_len,
            device,
            seed=cfg.seed,
            kernels=kernels if _kernel_attention(cfg, device) else None,
            safepoint_every=cfg.safepoint_every,
        )
        # conserve's latency model comes once the engine exists (profiling runs the runner):
        # until then its policy object plans without one
        policy = make_policy(cfg.scheduler.policy)
        host = None
        if policy.uses_host_tier and cfg.cache.host_kv_gb > 0:
            per_block = KVTensors.bytes_per_block(model_cfg, cfg.cache.block_size, cfg.torch_dtype)
            n_host = max(1, int(cfg.cache.host_kv_gb * 2**30 // per_block))
            file = _host_file(cfg, source.name, list(kv.k.shape), n_host)
            mover = TensorMover(kv.k, kv.v, n_host, file)
            host = HostKVStore(
                n_host,
                cfg.cache.block_size,
                mover,
                file,
                checkpoint_free=1.0 if file is not None else cfg.cache.host_kv_checkpoint_free,
            )
        elif cfg.cache.host_kv_path:
            raise ValueError(
                "--host-kv-path needs the host tier: --policy conserve, --host-kv-gb > 0"
            )
        scheduler = Scheduler(cfg.scheduler, kv_manager, policy, host=host)
        log.info(
            "model %s: %s, %d KV blocks of %d tokens, max_model_len %d",
            source.name,
            cfg.dtype,
            num_blocks,
            cfg.cache.block_size,
            max_len,
        )
        engine = Engine(cfg, tokenizer, scheduler, runner, max_len, source.name, model_cfg)
        engine.model_source = str(source)
        if cfg.step_log:
            engine.add_observer(StepLog(cfg.step_log))
        if policy.uses_latency_model:
            engine.use_latency_model(_load_latency_model(engine, cfg.latency_profile))
        return engine

    def use_latency_model(self, model: LatencyModel) -> None:
        """Predict step times with `model` and plan with a new object of the configured policy
        built on it (objectives left unset in the config are relative to the predicted alone
        latency). Only while no request is in the engine."""
        self._require_idle("use_latency_model")
        self.latency = model
        self._install_policy()

    def set_policy(self, name: str) -> None:
        """Plan with the policy called `name` from now on: a new policy object on the engine's
        latency model and SLOs (the latency model is loaded first if the policy needs one and
        the engine has none; a host tier is made only by `from_config`). Setting the policy in
        force keeps its object and what it learned (conserve's prediction scale, when online
        work was last seen). Only while no request is in the engine."""
        self._require_idle("set_policy")
        if name == self.policy.name:
            return
        sc = replace(self.config.scheduler, policy=name)  # raises for an unknown name
        model = None
        if policy_class(name).uses_latency_model and self.latency is None:
            model = _load_latency_model(self, self.config.latency_profile)
        self.config = replace(self.config, scheduler=sc)
        if model is not None:
            self.use_latency_model(model)
        else:
            self._install_policy()

    @property
    def policy(self) -> Policy:
        """The scheduling policy object in force."""
        return self.scheduler.policy

    @property
    def slo(self) -> Slo | None:
        """The online SLOs the policy plans with and the preemption monitor stops steps by;
        None for a policy without them."""
        return self.scheduler.policy.slo

    def _install_policy(self) -> None:
        sc = self.config.scheduler
        slo = Slo.from_config(sc)
        self.scheduler.set_policy(make_policy(sc.policy, self.latency, slo, sc.offline_step_s))

    def _require_idle(self, what: str) -> None:
        if self.has_unfinished():
            raise RuntimeError(f"{what} needs an engine with no unfinished request")

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_class: RequestClass = RequestClass.ONLINE,
        stream: bool = False,
        arrived: float | None = None,
        api_times: tuple[float | None, float] | None = None,
    ) -> None:
        """Queue a request. `arrived`: when it reached the engine's process
        (`time.monotonic()`; default now), its arrival time for the scheduler and observers.
        `api_times`: (received, sent) by the API process, for observers only."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self.validate_prompt(ids, params)
        if request_id in self._groups:
            raise ValueError(f"duplicate request id {request_id!r}")
        group = _Group(request_id, text, ids)
        now = time.monotonic() if arrived is None else arrived
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seed = None if params.seed is None else params.seed + i
            req = Request(seq_id, ids, params, request_class, now, seed=seed)
            state = SequenceState(req, i, self.tokenizer, stream)
            group.sequences.append(state)
            self._seq_to_group[seq_id] = (group, state)
            self.scheduler.add(req)
            if request_class is RequestClass.ONLINE and self.slo is not None:
                self.objectives.watch(seq_id, now, self._predict_prefill(len(ids)))
        self._groups[request_id] = group
        for obs in self._observers:
            if api_times is not None:
                obs.on_request_received(request_id, *api_times)
            obs.on_request_added(request_id, request_class.value, len(ids), now)

    def validate_prompt(self, ids: Sequence[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        need = len(ids) + (params.max_tokens or 1)
        if need > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(ids)} tokens and {params.max_tokens or 1} more were requested"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return None
        # a group is kept until all its sequences finish: this request had not
        self.aborted_by_class[group.sequences[0].request.request_class] += 1
        for seq in group.sequences:
            self._seq_to_group.pop(seq.request.request_id, None)
            self.objectives.forget(seq.request.request_id)
            if not seq.request.is_finished:
                self.scheduler.finish(seq.request.request_id, RequestStatus.FINISHED_ABORTED)
                seq.refresh(RequestStatus.FINISHED_ABORTED)
        if self.scheduler.held_broken:
            self._drop_stopped()  # a stopped step wrote to its blocks: drop it now
        return group.output()

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def online_pending(self) -> bool:
        """Online work exists: a request has arrived and is not taken in yet, or one is queued
        or running. The core loop holds offline outputs back meanwhile (see `core.process`)."""
        with self._stop_lock:
            if self._arriving():
                return True
        return self.scheduler.has_online_work()

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_plan = time.monotonic()
        stopped = self._resumable()
        if stopped is None:
            batch = self.scheduler.schedule()  # plan
            if batch.empty:
                return []
        else:
            batch = stopped.batch
        t_exec = time.monotonic()
        try:
            result = self._execute(batch, stopped)  # execute
        except IterationPreempted as e:
            # Nothing is committed: the requests keep their counters (and blocks), so the
            # next plan serves the online work first; an offline step is resumed after it
            # from the layer where it stopped (`_keep_stopped`).
            done = self._current
            self.num_layer_preemptions += 1
            wait = time.monotonic() - done.stop_requested_at if done.stop_requested_at else 0.0
            ran = time.monotonic() - t_exec
            self._keep_stopped(batch, e)
            self.objectives.on_step(batch, t_plan, time.monotonic(), (), self.slo, stopped=True)
            resumed = None if stopped is None else stopped.layer
            self._notify(batch, t_exec, t_exec - t_plan, ran, 0.0, e.layer, wait, resumed)
            return []
        finally:
            self._current = None
        self.num_steps += 1
        self.busy_s += result.elapsed_s
        if stopped is not None:
            self.scheduler.release()  # before apply: finishing a held request breaks a hold
            self.num_layer_resumes += 1
        elif self.latency is not None and batch.shape is not None:
            self._observe(batch, result.elapsed_s)  # (a resumed step ran only some layers)
        outputs = self._apply(batch, result, t_plan)  # apply
        applied = time.monotonic() - t_exec - result.elapsed_s
        resumed = None if stopped is None else stopped.layer
        self._notify(batch, t_exec, t_exec - t_plan, result.elapsed_s, applied, None, None, resumed)
        return outputs

    # -- stopped steps ----------------------------------------------------------------------
    def _keep_stopped(self, batch: ScheduledBatch, stop: IterationPreempted) -> None:
        """Keep a stopped offline step to resume later, if the runner gave a continuation;
        a step with online work is dropped (its online requests are planned again at once)."""
        online = any(not c.offline for c in batch.chunks)
        if stop.continuation is None or online or not hasattr(self.runner, "resume"):
            self._drop_stopped()
            return
        self._stopped = _Stopped(batch, stop.continuation, stop.layer)
        self.scheduler.hold(c.request_id for c in batch.chunks)

    def _drop_stopped(self) -> None:
        if self._stopped is not None:
            self.num_layer_drops += 1
        self._stopped = None
        self.scheduler.release()

    def _resumable(self) -> _Stopped | None:
        """The stopped step to resume now: once no online work is left. A stopped step one of
        whose requests was finished or preempted meanwhile is dropped (its blocks may be in
        other hands); its other requests compute the step's tokens again."""
        stopped = self._stopped
        if stopped is None:
            return None
        if self.scheduler.held_broken:
            self._drop_stopped()
            return None
        if self.scheduler.has_online_work():
            if time.monotonic() - stopped.at > stopped.hold_limit():
                # online work has not left since the stop (a long stream, say): waiting on
                # would keep the held requests out of every plan for as long
                self._drop_stopped()
            return None
        self._stopped = None
        return stopped

    # -- observation ------------------------------------------------------------------------
    def add_observer(self, observer: StepObserver) -> None:
        """Call `observer` around every step from now on (in the loop's thread)."""
        self._observers.append(observer)

    def remove_observer(self, observer: StepObserver) -> None:
        self._observers.remove(observer)

    def _notify(
        self,
        batch: ScheduledBatch,
        started: float,
        plan_s: float,
        run_s: float,
        apply_s: float,
        stopped_at: int | None = None,
        stop_wait: float | None = None,
        resumed_from: int | None = None,
    ) -> None:
        if not self._observers:
            return
        record = StepRecord(
            batch,
            started,
            plan_s,
            run_s,
            apply_s,
            stopped_at,
            stop_wait,
            self.policy.prediction_scale,
            resumed_from,
            kept=stopped_at is not None and self._stopped is not None,
        )
        for obs in self._observers:
            obs.on_step_end(record)

    def reset_prefix_cache(self) -> None:
        """Forget the cached contents of the KV blocks no request holds (the next prompts are
        computed in full; a benchmark's later rounds gain nothing from its earlier ones)."""
        self.scheduler.kv.pool.reset_prefix_cache()

    def stats(self) -> EngineStats:
        """A snapshot of queues, KV use (device and host tier) and cumulative counters."""
        sched, kv = self.scheduler, self.scheduler.kv
        host = sched.host
        pool = kv.pool
        return EngineStats(
            num_steps=self.num_steps,
            busy_s=self.busy_s,
            running=len(sched.running),
            waiting=sched.num_waiting(),
            by_class=self.counts_by_class(),
            kv=KVStats(
                num_blocks=pool.num_blocks,
                block_size=kv.block_size,
                free_blocks=pool.num_free_blocks,
                usage=pool.usage(),
                request_tables=kv.num_request_tables,
                prefix_queries=kv.prefix_queries,
                prefix_hits=kv.prefix_hits,
            ),
            host=None if host is None else _host_stats(host),
            num_preemptions=sched.num_preemptions,
            preemptions_by_class={c.value: n for c, n in sched.preemptions_by_class.items()},
            num_layer_preemptions=self.num_layer_preemptions,
            num_layer_resumes=self.num_layer_resumes,
            num_layer_drops=self.num_layer_drops,
            num_pauses=sched.num_pauses,
            tokens_recomputed=sched.tokens_recomputed,
            tokens_restored=sched.tokens_restored,
            shared_prefix_waits=sched.num_shared_waits,
            aborted_by_class={c.value: n for c, n in self.aborted_by_class.items()},
            objectives=self.objectives.counts(),
            harvest=self.harvest.stats(),
        )

    def _execute(self, batch: ScheduledBatch, stopped: _Stopped | None = None) -> StepResult:
        """Run `batch` (or resume it, when `stopped`), stoppable when the plan allows it."""
        if not batch.preemptible:
            for obs in self._observers:
                obs.on_step_start(batch)
            return self.runner.execute(batch)
        layers = self.model_config.num_layers if self.model_config else 0
        first = stopped.layer / layers if stopped is not None and layers else 0.0
        step = _Step(
            time.monotonic(),
            (batch.predicted_s or 0.0) * (1 - first),
            batch.online_predicted_s or 0.0,
            first=first,
        )
        with self._stop_lock:
            self._current = step
            if self._arriving():
                # An online request arrived after this plan was made (while the previous step
                # was applied or this one planned), or one may be on its way (an open door):
                # it may stop this step right away.
                if self._announced > self._received:
                    self._request_stop_locked(self._pending_prompt_len)
                else:
                    self._request_stop_locked(None, door=True)
        for obs in self._observers:
            obs.on_step_start(batch)
        if stopped is not None:
            return self.runner.resume(stopped.continuation, step.stop)
        return self.runner.execute(batch, step.stop)

    def _observe(self, batch: ScheduledBatch, seconds: float) -> None:
        self.latency.observe(batch.shape, seconds)  # refits itself on a schedule
        self.policy.observe_step(batch, seconds)

    def _predict_prefill(self, prompt_len: int) -> float:
        """The predicted time of a prompt's prefill alone (0 without a latency model)."""
        if self.latency is None:
            return 0.0
        return self.latency.predict(BatchShape().with_chunk(0, prompt_len))

    def announce_online(self, prompt_len: int) -> bool:
        """The monitor's entry point, called from another thread as an online request of
        `prompt_len` tokens arrives and before the loop calls `add_request` for it (and then
        `online_received`), and closes the door (`door`). Stops the running step as
        `request_stop` does; if no step is running, the next one to start is checked instead,
        unless the request is in its plan."""
        with self._stop_lock:
            self._announced += 1
            self._pending_prompt_len = prompt_len
            self._door_opened = None  # the request the door was open for (see `door`)
            return self._request_stop_locked(prompt_len)

    def door(self, open_: bool) -> None:
        """The monitor's entry point for the HTTP server's door, called from another thread:
        it has received requests whose class it does not know yet (`open_`), or has none left.
        Until it closes, or for DOOR_WAIT_S at most, the door counts as an arriving online
        request of unknown length: it stops a running step of offline work only at its next
        safepoint (as `request_stop` does; a step with online work runs on), and the core loop
        waits rather than start offline work (`door_wait`). So the API process reads,
        validates and tokenizes the request on cores the engine leaves alone; if it is
        offline, the stopped step resumes. For an online request the server leaves the door
        open and the request's own arrival (`announce_online`) closes it."""
        with self._stop_lock:
            self._door_opened = time.monotonic() if open_ else None
            if open_:
                self._request_stop_locked(None, door=True)

    def door_wait(self) -> float:
        """Seconds the loop should wait for a message before its next step: what is left of an
        open door's DOOR_WAIT_S while no online work is ready (else 0)."""
        with self._stop_lock:
            if self._door_opened is None:
                return 0.0
            left = self._door_opened + DOOR_WAIT_S - time.monotonic()
        return 0.0 if left <= 0 or self.scheduler.has_online_work() else left

    def _arriving(self) -> bool:
        """An online request has arrived that the loop has not taken in, or the door is open.
        Only reads (with or without `_stop_lock` held)."""
        if self._announced > self._received:
            return True
        opened = self._door_opened
        return opened is not None and time.monotonic() - opened < DOOR_WAIT_S

    def online_received(self) -> None:
        """The loop has taken in one announced online request (added or rejected it)."""
        with self._stop_lock:
            self._received += 1

    def request_stop(self, prompt_len: int | None = None) -> bool:
        """An online request (of `prompt_len` tokens) has arrived: stop the running step at its
        next safepoint if it carries offline work and finishing it would delay the online
        request too much (`stop_limit`). Safe to call from another thread while `step` runs."""
        with self._stop_lock:
            return self._request_stop_locked(prompt_len)

    def _request_stop_locked(self, prompt_len: int | None, door: bool = False) -> bool:
        step = self._current
        if step is None or self.latency is None:
            return False
        if door and step.online > 0:
            return False  # online work is not stopped for what may be an offline request
        now = time.monotonic()
        remaining = step.start + step.predicted - now
        # Once layers have run, extrapolate from them: a step that overruns its prediction (a
        # loaded machine, a stale profile) would otherwise never be stopped.
        done = self.runner.progress
        if done > step.first:
            remaining = (now - step.start) * (1 - done) / (done - step.first)
        elif remaining <= 0:
            # No layer has run since it started, or the layers are done and its LM head and
            # sampling run (in slices with safepoints): a step past its predicted end has an
            # unknown time left. Seen in a step log: a 240-row offline step ran 24% over its
            # prediction, and arrivals in its last 13 ms waited for all of it.
            remaining = float("inf")
        own = self.latency.predict(BatchShape().with_chunk(0, prompt_len)) if prompt_len else 0.0
        online_left = step.online * remaining / step.predicted if step.predicted > 0 else 0.0
        if remaining <= stop_limit(self.slo, own, online_left):
            return False
        step.stop_requested_at = now
        step.stop.set()
        return True

    def _apply(
        self, batch: ScheduledBatch, result: StepResult, started: float
    ) -> list[RequestOutput]:
        advanced = self.scheduler.update(batch, result)
        if all(c.offline for c in batch.chunks):
            # Copies to the host tier wait for a step without online work, and go in slices
            # while no online request waits for the loop: their time would delay online
            # tokens. The checkpoint is incremental: what is left goes after a later step.
            while (
                not self._arriving()
                and self.scheduler.checkpoint_offline(CHECKPOINT_SLICE_BLOCKS)
                == CHECKPOINT_SLICE_BLOCKS
            ):
                pass
        touched: dict[str, _Group] = {}
        eos = self.tokenizer.eos_token_ids
        for req in advanced:
            group, seq = self._seq_to_group[req.request_id]
            seq.on_token(result.sampled[req.request_id])
            status = stop_status(req, eos, self.max_model_len)
            if seq.incremental and seq.check_stop_strings():
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self.scheduler.finish(req.request_id, status)
                self._seq_to_group.pop(req.request_id)
            seq.refresh(status)
            touched[group.request_id] = group
        self.objectives.on_step(batch, started, time.monotonic(), advanced, self.slo)
        outputs = []
        for group in touched.values():
            out = group.output()
            if out.finished:
                del self._groups[group.request_id]
            outputs.append(out)
        return outputs

    def counts_by_class(self) -> dict[str, tuple[int, int]]:
        """(running, waiting) sequences per request class."""
        out = {c.value: [0, 0] for c in RequestClass}
        for r in self.scheduler.running:
            out[r.request_class.value][0] += 1
        for r in self.scheduler.waiting:
            out[r.request_class.value][1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    def check_integrity(self) -> None:
        """KV and queue invariants; with nothing in flight, also that no block is held."""
        self.scheduler.check_integrity()
        if not self._groups and self.scheduler.kv.num_request_tables:
            raise AssertionError("idle engine still holds KV block tables")


def stop_limit(slo: Slo | None, own: float, online_left: float) -> float:
    """Seconds an arriving online request may wait for the running step to finish. `own`: its
    predicted prefill time alone; `online_left`: the part of the step's remaining time its
    online work alone would take (alone, the arrival would wait for that too).

    Relative TTFT: the slack of its own prefill on top of `online_left`. Absolute: what is left
    of the TTFT objective after its prefill; an absolute TPOT objective caps it too. No
    objectives: no wait."""
    if slo is None:
        return 0.0
    limits = [slo.ttft - own if slo.ttft is not None else slo.slack * own + online_left]
    if slo.tpot is not None:
        limits.append(slo.tpot)
    return min(limits)


def _host_file(cfg: EngineConfig, model: str, shape: list[int], num_blocks: int) -> HostFile | None:
    """The files behind the host tier (`--host-kv-path`), or None for a tier in memory."""
    if not cfg.cache.host_kv_path:
        return None
    block = shape[:2] + shape[3:]  # [layers, kv heads, block size, head dim]
    layout = {
        "model": model,
        "dtype": str(cfg.torch_dtype),
        "block": block,
        "host_blocks": num_blocks,
    }
    file = HostFile(cfg.cache.host_kv_path, layout)
    log.info("host tier in %s (%s)", file.dir, "reused" if file.reused else "new")
    return file


def _host_stats(host: HostKVStore) -> HostTierStats:
    return HostTierStats(
        num_blocks=host.num_blocks,
        free_blocks=host.num_free_blocks,
        blocks_checkpointed=host.blocks_checkpointed,
        blocks_restored=host.blocks_restored,
        num_checkpoints=host.num_checkpoints,
        num_restores=host.num_restores,
        checkpoint_s=host.checkpoint_s,
        restore_s=host.restore_s,
    )


def _load_latency_model(engine: Engine, where: str) -> LatencyModel:
    from conserve.engine.profiler import load_profile

    return load_profile(engine, where)


def _kernel_attention(cfg: EngineConfig, device: torch.device) -> bool:
    return cfg.attention == "cpu-kernel" or (cfg.attention == "auto" and device.type == "cpu")


def _kernels(cfg: EngineConfig, model: LlamaModel, device: torch.device) -> CpuKernels | None:
    """The compiled CPU kernels the engine's settings ask for (None: none), with the model's
    bf16 layers switched to prepacked weights and compiled ops unless `layers` is "torch"."""
    kernels = None
    if _kernel_attention(cfg, device) or (cfg.layers == "auto" and device.type == "cpu"):
        from conserve.kernels import cpu_kernels

        kernels = cpu_kernels()
        if kernels is None and cfg.attention == "cpu-kernel":
            raise RuntimeError("attention 'cpu-kernel' requested but the kernel did not build")
    if cfg.layers == "auto":
        log.info("decoder layers: %s", model.use_fast_layers(kernels))
    return kernels


def _num_blocks(cfg: EngineConfig, model_cfg: ModelConfig) -> int:
    if cfg.cache.num_blocks:
        return cfg.cache.num_blocks
    per_block = KVTensors.bytes_per_block(model_cfg, cfg.cache.block_size, cfg.torch_dtype)
    gb = cfg.cache.kv_cache_gb
    if gb is None:
        gb = DEFAULT_KV_CACHE_GB
        avail = _available_memory_bytes()
        if avail:
            gb = min(gb, 0.5 * avail / 2**30)
    return max(1, int(gb * 2**30 // per_block))


def _max_model_len(cfg: EngineConfig, model_cfg: ModelConfig, num_blocks: int) -> int:
    limit = model_cfg.max_position_embeddings
    if model_cfg.sliding_window:
        # Attention here is full; within the window that is exactly what the model computes.
        limit = min(limit, model_cfg.sliding_window)
    if cfg.max_model_len:
        if cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's {limit}")
        limit = cfg.max_model_len
    capacity = num_blocks * cfg.cache.block_size
    if capacity < limit:
        log.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, limit)
        limit = capacity
    return limit


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
