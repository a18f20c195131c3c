"""Exact resume: a run interrupted and resumed from its checkpoint computes the same steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segsweep.methods import METHODS, Method
from segsweep.tracking.protocol import NullTracker
from segsweep.training.runner import prepare

from .helpers import Recorder

#: Methods of one stage (not overriding ``stages``); multi-stage pipelines resume stage by
#: stage in ``test_methods_weak``.
ONE_STAGE = [name for name, cls in METHODS.items() if cls.stages is Method.stages]


@pytest.mark.slow
@pytest.mark.parametrize("method", ONE_STAGE)
def test_resumed_run_matches_the_uninterrupted_one(tiny, tmp_path: Path, method: str) -> None:
    """Every one-stage method, its own randomness included (S4MIM's masks, GuidedMix's
    mixing); with the EMA teacher on where a method has one, so its state is resumed too."""
    over: dict[str, object] = {"method": method, "train.steps": 6, "train.eval_every": 3}
    if "ema_teacher" in METHODS[method].Knobs.model_fields:
        over[f"{method}.ema_teacher"] = True
    full = Recorder()
    a = prepare(tiny(**over))
    a.trainer.run(tmp_path / "a", full)

    broken = prepare(tiny(**over, **{"debug.fail_at_step": 5}))
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        broken.trainer.run(tmp_path / "b", Recorder())
    resumed = Recorder()
    b = prepare(tiny(**over, **{"debug.fail_at_step": 5}))
    b.trainer.run(tmp_path / "b", resumed, resume_from=tmp_path / "b" / "checkpoints" / "last.pt")

    for step in (4, 5, 6):  # the steps after the checkpoint at step 3
        assert resumed.metrics[("train/loss", step)] == full.metrics[("train/loss", step)]
    assert ("train/loss", 3) not in resumed.metrics  # nothing before the checkpoint is redone
    assert resumed.metrics[("val/mIoU", 6)] == full.metrics[("val/mIoU", 6)]
    sa, sb = a.trainer.method.state_dict(), b.trainer.method.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_resumed_runs_training_time_counts_its_earlier_attempts(tiny, tmp_path: Path) -> None:
    """``time/run_seconds`` of a resumed run is what earlier attempts trained up to the
    checkpoint plus this attempt, not this attempt alone (the checkpoint is edited to say
    1,000 s were spent before it, which no tiny run takes by itself)."""
    over: dict[str, object] = {"train.steps": 4, "train.eval_every": 2, "debug.fail_at_step": 3}
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        prepare(tiny(**over)).trainer.run(tmp_path / "r", Recorder())
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=False)
    assert 0 < state["progress"]["seconds"] < 1000  # the first attempt's, up to step 2
    state["progress"]["seconds"] = 1000.0
    torch.save(state, last)
    b = prepare(tiny(**over))
    b.trainer.run(tmp_path / "r", Recorder(), resume_from=last)
    assert 1000 < b.trainer.elapsed_seconds() < 1000 + 600


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_run_resumes(tiny, tmp_path: Path) -> None:
    """A checkpoint read back on a GPU run: its RNG states must stay CPU tensors (a CUDA one is
    refused by torch.set_rng_state), its weights and optimizer state land on the GPU."""
    over: dict[str, object] = {"method": "fixmatch", "fixmatch.ema_teacher": True, "train.device": "cuda"}
    over |= {"train.steps": 6, "train.eval_every": 3}
    full = Recorder()
    prepare(tiny(**over)).trainer.run(tmp_path / "a", full)
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        prepare(tiny(**over, **{"debug.fail_at_step": 5})).trainer.run(tmp_path / "b", Recorder())
    resumed = Recorder()
    b = prepare(tiny(**over, **{"debug.fail_at_step": 5}))
    b.trainer.run(tmp_path / "b", resumed, resume_from=tmp_path / "b" / "checkpoints" / "last.pt")
    assert ("train/loss", 3) not in resumed.metrics
    for step in (4, 5, 6):  # cuDNN may pick other kernels: close, not bit-equal
        assert resumed.metrics[("train/loss", step)] == pytest.approx(
            full.metrics[("train/loss", step)], rel=1e-2
        )
    assert all(p.is_cuda for p in b.trainer.method.parameters())


def test_the_honest_number_is_val_at_the_evaluation_best_on_the_tune_split(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model selection: ``val/mIoU_at_best_tune`` is val's score at the evaluation whose tune
    score was highest (first one on a tie), ``best.pt`` holds that step, and the flattering
    best-on-val and the last evaluation are reported apart. The scores are scripted so that
    the three differ."""
    import segsweep.training.evaluation as engine

    val = iter([0.10, 0.40, 0.20, 0.30])  # best on val: evaluation 2 (step 4)
    tune = iter([0.20, 0.10, 0.50, 0.50])  # best on tune: evaluation 3 (step 6), tie at 8
    prepared = prepare(tiny(**{"train.steps": 8, "train.eval_every": 2}))
    trainer = prepared.trainer

    def scripted(model, loader, *args, **kwargs) -> dict:
        score = next(val if loader is trainer.val_loader else tune)
        return {"mIoU": score, "pixel_acc": score, "iou": [score] * trainer.data.source.num_classes}

    monkeypatch.setattr(engine, "evaluate", scripted)
    recorder = Recorder()
    result = trainer.run(tmp_path / "r", recorder)
    assert [recorder.metrics[("tune/mIoU", s)] for s in (2, 4, 6, 8)] == [0.2, 0.1, 0.5, 0.5]
    assert result.metrics["val/mIoU_at_best_tune"] == 0.20
    assert result.metrics["tune/mIoU_best"] == 0.50
    assert result.metrics["val/mIoU_best"] == 0.40
    assert result.metrics["val/mIoU_last"] == 0.30
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=False)
    assert best["progress"]["step"] == 6


class Closing(NullTracker):
    def __init__(self) -> None:
        self.ended: tuple[str, str | None] | None = None

    def finish(
        self, status: str = "FINISHED", segsweep_status: str | None = None, unless_marked: str | None = None
    ) -> None:
        self.ended = (status, segsweep_status)


def test_a_trial_stopped_at_a_report_closes_its_run_and_ends_its_thread(tiny, tmp_path: Path) -> None:
    """Ray ends a stopped trial's thread with SystemExit at the report it is stopped at. The
    run must close as stopped early and the SystemExit must propagate: a trial function that
    returns instead makes Ray's wrapper report once more and wait for ever, and its worker can
    never serve another trial."""
    from segsweep.training.runner import execute

    reports: list[dict] = []

    def stopped_at_first_report(metrics: dict, checkpoint_dir: Path) -> None:
        reports.append(metrics)
        raise SystemExit(0)

    tracker = Closing()
    with pytest.raises(SystemExit):
        execute(
            prepare(tiny(**{"train.steps": 6, "train.eval_every": 2})),
            tracker,
            tmp_path / "r",
            stopped_at_first_report,
        )
    assert len(reports) == 1 and reports[0]["step"] == 2
    assert tracker.ended == ("FINISHED", "stopped_early")
