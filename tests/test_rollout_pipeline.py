"""RolloutPipeline: which weights sample which step, inline and in the background; drain/restore
for checkpoints; failures reach the trainer."""
from __future__ import annotations

import threading
import time

import pytest

from megatron_a1.training.rollout_pipeline import RolloutPipeline


class FakeTrainer:
    """Records which weight version sampled each step; generation can be slowed or failed."""

    def __init__(self, staleness: int, last: int, *, fail_at: int | None = None,
                 gen_seconds: float = 0.0):
        self.k, self.last, self.fail_at, self.gen_seconds = staleness, last, fail_at, gen_seconds
        self.loaded, self.applied, self.sampled_by = None, [], {}
        self.threads = set()

    def due(self, step):
        return max(0, step - 1 - self.k)

    def apply(self, version, payload):
        assert payload == f"w{version}"  # the payload published with that version
        self.loaded = version
        self.applied.append(version)

    def generate(self, step):
        self.threads.add(threading.current_thread().name)
        if step == self.fail_at:
            raise ValueError("engine down")
        time.sleep(self.gen_seconds)
        self.sampled_by[step] = self.loaded
        return f"batch{step}"

    def pipeline(self, first=1, background=None):
        return RolloutPipeline(self.generate, self.apply, self.due, first, self.last,
                               background=self.k > 0 if background is None else background)


def train(trainer: FakeTrainer, pipe: RolloutPipeline, first=1, stop_after=None):
    """The loop's protocol: publish version i, take batch i+1, train (version i+1)."""
    pipe.start()
    got = []
    for i in range(first - 1, trainer.last):
        pipe.publish(i, f"w{i}")
        got.append(pipe.get(i + 1))
        if stop_after is not None and i + 1 == stop_after:
            pipe.publish(i + 1, f"w{i + 1}")  # before_save publishes the newest weights
            return got, pipe.drain()
    return got, None


@pytest.mark.parametrize("k", [0, 1, 3])
def test_each_step_is_sampled_by_its_due_version(k):
    t = FakeTrainer(k, last=7, gen_seconds=0.01)
    pipe = t.pipeline()
    got, _ = train(t, pipe)
    pipe.close()
    assert got == [f"batch{s}" for s in range(1, 8)]
    assert t.sampled_by == {s: max(0, s - 1 - k) for s in range(1, 8)}
    assert t.applied == sorted(set(t.sampled_by.values()))  # each version loaded once, in order
    assert t.threads == ({"rollouts"} if k else {threading.current_thread().name})


def test_background_generation_runs_ahead_up_to_the_bound():
    t = FakeTrainer(2, last=6)
    pipe = t.pipeline()
    pipe.start()
    pipe.publish(0, "w0")
    assert pipe.get(1) == "batch1"
    deadline = time.time() + 10
    while len(t.sampled_by) < 3 and time.time() < deadline:  # steps 2, 3 need version 0 too
        time.sleep(0.01)
    time.sleep(0.05)
    assert sorted(t.sampled_by) == [1, 2, 3]  # step 4 waits for version 1
    assert pipe.drain() == {2: "batch2", 3: "batch3"}
    pipe.close()


@pytest.mark.parametrize("k", [0, 2])
def test_drain_and_restore_continue_exactly(k):
    """Stop after step 3 (drain: the finished, untrained batches), restore into a fresh
    pipeline (the resumed run): the steps after 3 are sampled exactly as without the stop."""
    whole = FakeTrainer(k, last=8)
    pipe = whole.pipeline()
    expected, _ = train(whole, pipe)
    pipe.close()

    first = FakeTrainer(k, last=8)
    pipe = first.pipeline()
    got, in_flight = train(first, pipe, stop_after=3)
    pipe.close()
    # background: every step due with a version <= 3; inline: nothing runs ahead
    assert sorted(in_flight) == (list(range(4, 5 + k)) if k else [])
    second = FakeTrainer(k, last=8)
    pipe = second.pipeline(first=4 + len(in_flight))
    pipe.restore(in_flight)
    rest, _ = train(second, pipe, first=4)
    pipe.close()
    assert got + rest == expected
    assert {**first.sampled_by, **second.sampled_by} == whole.sampled_by


def test_a_generation_failure_reaches_the_trainer():
    t = FakeTrainer(1, last=5, fail_at=3)
    pipe = t.pipeline()
    pipe.start()
    pipe.publish(0, "w0")
    assert pipe.get(1) == "batch1"
    pipe.publish(1, "w1")
    assert pipe.get(2) == "batch2"
    pipe.publish(2, "w2")
    with pytest.raises(RuntimeError, match="rollout generation failed") as info:
        pipe.get(3)
    assert isinstance(info.value.__cause__, ValueError)
    pipe.close()


def test_a_batch_whose_weights_never_come_is_an_error_not_a_hang():
    t = FakeTrainer(1, last=5)
    pipe = t.pipeline()
    pipe.start()
    pipe.publish(0, "w0")
    assert pipe.get(1) == "batch1"
    assert pipe.get(2) == "batch2"
    with pytest.raises(RuntimeError, match="waits for weight version 1"):
        pipe.get(3)  # version 1 was never published
    pipe.close()
    inline = FakeTrainer(0, last=3).pipeline()
    with pytest.raises(RuntimeError, match="needs weight version 0"):
        inline.get(1)
