"""Step batches of rollouts, each sampled by the weights it is due: inline or ahead of training.

The trainer publishes weight versions (``publish(version, payload)``: after step N the weights
are version N); the batch of step ``s`` (trained from version ``s-1`` to ``s``) must be sampled
by a version of at least ``due_version(s)``. With a staleness bound ``k`` that is ``s-1-k``, so
while step ``s`` trains a background thread can already sample steps ``s+1 … s+k`` with older
weights — generation and training overlap, and no rollout is more than ``k`` steps stale.
``k = 0`` needs the newest weights, and the batch is sampled inline when the trainer asks for it.

The generator always takes the *oldest* published version that is due (and forgets the older
ones), so which weights sample a batch depends on the step alone, not on timing: a run resumed
from a checkpoint samples what the uninterrupted run sampled.

Checkpoints: :meth:`RolloutPipeline.drain` waits until the generator has sampled every batch it
can with the versions published so far and returns the finished, untrained batches; the trainer
stores them with the prompt cursor, and :meth:`restore` puts them back on resume, so a rollout in
flight when the job stopped is trained, not lost or sampled twice.

``generate(step)`` may run collectives (data-parallel ranks exchange their slices): in the
background thread it must use process groups of its own, never ones the training thread uses,
and every rank must call it for the same steps in the same order — which the deterministic
version rule guarantees.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class RolloutPipeline:
    """Produces ``generate(step)`` for steps ``first … last`` in order.

    Args:
        generate: samples one step's batch (with the weights last given to ``apply_weights``).
        apply_weights: ``(version, payload)`` → loads that version into the engine; called
            before a batch whenever the due version changed.
        due_version: step → the oldest weight version allowed to sample it.
        first, last: the steps to produce (a resumed run starts after the trained ones).
        background: sample ahead in a thread (a staleness bound > 0), else inline in ``get``.
    """

    def __init__(self, generate: Callable[[int], Any],
                 apply_weights: Callable[[int, Any], None], due_version: Callable[[int], int],
                 first: int, last: int, *, background: bool):
        self._generate, self._apply, self._due = generate, apply_weights, due_version
        self._cond = threading.Condition()
        self._published: dict[int, Any] = {}
        self._ready: dict[int, Any] = {}
        self._next, self._last = first, last
        self._loaded: int | None = None
        self._waiting_for: int | None = None  # the version the idle generator waits for
        self._error: BaseException | None = None
        self._stop = False
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)

    # -- trainer side ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def publish(self, version: int, payload: Any = None) -> None:
        """Weights ``version`` are available (``payload``: what ``apply_weights`` loads)."""
        with self._cond:
            if version not in self._published and (self._loaded is None
                                                    or version > self._loaded):
                self._published[version] = payload
                self._cond.notify_all()

    def restore(self, batches: dict[int, Any]) -> None:
        """Finished batches from a checkpoint (``drain``'s result): served before sampling."""
        with self._cond:
            self._ready.update(batches)
            if batches:
                self._next = max(self._next, max(batches) + 1)

    def get(self, step: int) -> Any:
        """The batch of ``step`` (blocks while it is being sampled)."""
        if self._thread is None:
            with self._cond:
                if step in self._ready:
                    return self._ready.pop(step)
            if step != self._next:
                raise RuntimeError(f"rollout batch {step} asked for, {self._next} is next")
            self._produce_one()
            with self._cond:
                return self._ready.pop(step)
        with self._cond:
            while step not in self._ready:
                self._raise_if_failed()
                if self._stalled() or self._next > step:
                    raise RuntimeError(
                        f"rollout batch {step} cannot be produced: the generator waits for "
                        f"weight version {self._waiting_for}, published {sorted(self._published)}")
                self._cond.wait(timeout=5.0)
            return self._ready.pop(step)

    def drain(self) -> dict[int, Any]:
        """Wait until every batch that the published versions allow is sampled; return the
        finished, untrained batches (for the checkpoint)."""
        with self._cond:
            while self._thread is not None and not (self._stalled() or self._done()):
                self._raise_if_failed()
                self._cond.wait(timeout=5.0)
            self._raise_if_failed()
            return dict(self._ready)

    def close(self) -> None:
        """Stop the generator (it is idle or done after ``drain``) and wait for it."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()

    # -- generator side ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._produce_one():
                pass
        except BaseException as exc:  # surfaced to the trainer by get/drain
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _produce_one(self) -> bool:
        """Sample the next batch with its due weights; False when there is none to sample."""
        with self._cond:
            if self._stop or self._done():
                return False
            step = self._next
            want = self._due(step)
            while not self._stop and self._due_version(want) is None:
                if self._thread is None:
                    raise RuntimeError(f"rollout batch {step} needs weight version {want}; "
                                       f"published {sorted(self._published)}")
                self._waiting_for = want
                self._cond.notify_all()
                self._cond.wait()
            self._waiting_for = None
            if self._stop:
                return False
            version = self._due_version(want)
            payload = self._published.pop(version, None)  # None: the loaded version is due
            for old in [v for v in self._published if v < version]:
                del self._published[old]
        if version != self._loaded:
            self._apply(version, payload)
            with self._cond:
                self._loaded = version
        batch = self._generate(step)
        with self._cond:
            self._ready[step] = batch
            self._next = step + 1
            self._cond.notify_all()
        return True

    def _due_version(self, want: int) -> int | None:
        ok = [v for v in self._published if v >= want]
        if self._loaded is not None and self._loaded >= want:
            ok.append(self._loaded)
        return min(ok) if ok else None

    def _stalled(self) -> bool:
        return self._waiting_for is not None and self._due_version(self._waiting_for) is None

    def _done(self) -> bool:
        return self._next > self._last

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("rollout generation failed") from self._error
