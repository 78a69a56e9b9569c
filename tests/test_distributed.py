"""Data-parallel training (DistributedDataParallel under torchrun): real torchrun process groups
of 2 CPU processes on gloo, small data, no mocks.

Equivalence, stated: with a global batch of ``B`` rows, each of the 2 ranks steps on its
contiguous half of the same shuffled global batch, its loss weighted by its share of the rows,
and DDP averages the two gradients. The update is then the 1-process update of batch ``B`` up to
float summation order: after every step of an epoch (DeepFM, no dropout and no unknown-id
masking, the only randomness a rank draws for itself) every weight is within ``TOLERANCE`` of
the 1-process run's, on the in-memory and the streamed rows alike. After one step the two
ranks' weights are equal bit for bit (the all-reduce hands both the same averaged gradient). The
time budget is rank 0's: with a clock that moves on rank 0 only, both ranks stop after the same
epoch with the same weights.

Run as a script under torchrun, this file is the worker of those checks (``_probe``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from test_models import write_tiny_snapshot
from test_streaming import write_signal_snapshot

from models import deepfm, distributed
from models.catalogue import FAMILIES
from models.ctr import ctr_meta
from models.data import Snapshot
from models.distributed import RankSteps
from models.runtime import Runtime, use_runtime
from models.stream import ParquetRows
from models.train import deterministic

REPO = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("test_distributed")
# Largest weight difference allowed between 2 processes and 1 after a whole epoch of steps: the
# float32 gradients differ in summation order only (measured: at most 8e-8 here, on weights of
# size 1e-2 to 1).
TOLERANCE = 1e-6
# name -> (streamed rows?, global batch): the tiny train split has 1410 rows, so 4096 is one step
# and 101 is 14 steps, each global batch split 50/51 rows (the last, 97 rows, 48/49) and the
# ranks' losses weighted by their shares.
CASES = {"one-step-memory": (False, 4096), "one-step-stream": (True, 4096),
         "steps-memory": (False, 101), "steps-stream": (True, 101)}  # fmt: skip


def _config(batch: int) -> deepfm.Config:
    return deepfm.Config(epochs=1, batch_size=batch, unknown_rate=0.0, dropout=0.0)


def _fit(snapshot: Path, runtime: Runtime, batch: int):
    with use_runtime(runtime) as loops:
        model = deepfm.fit(Snapshot(snapshot), _config(batch), lambda _: None)
    return model, loops


def _torchrun(*args: str, procs: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "--max-restarts=0", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


class Ticks:
    """A clock that moves ``step`` seconds every time it is read."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# The budget case: 2.5 s of a clock that only rank 0's moves (1 s a read: at the start, then after
# each epoch, as 14 steps an epoch never reach models.distributed.BUDGET_EVERY).
BUDGET = replace(_config(101), epochs=10, patience=10, max_minutes=2.5 / 60)


def _probe(snapshot: Path, out: Path) -> None:
    """One torchrun rank: fit DeepFM for every case and save this rank's weights."""
    rt = distributed.start("cpu", 1, Runtime().buffer_rows)
    try:
        fits = {name: (replace(rt, stream=stream), _config(batch)) for name, (stream, batch) in CASES.items()}
        fits["budget"] = (replace(rt, clock=Ticks(1.0 if rt.rank == 0 else 0.0)), BUDGET)
        for name, (runtime, config) in fits.items():
            with use_runtime(runtime) as loops:
                model = deepfm.fit(Snapshot(snapshot), config, lambda _: None)
            torch.save({"state": model.module.state_dict(), "history": model.history, "loops": loops},
                       out / f"{name}-rank{rt.rank}.pt")  # fmt: skip
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe")
    snapshot, out = write_tiny_snapshot(root / "snap"), root / "out"
    out.mkdir()
    done = _torchrun(__file__, str(snapshot), str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return snapshot, out


def _saved(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


def test_after_one_step_both_ranks_hold_the_same_parameters(probed):
    snapshot, out = probed
    with deterministic(0):  # the weights before the step, as train_ctr builds them
        init = deepfm.DeepFM.build_module(_config(4096), ctr_meta(Snapshot(snapshot))).state_dict()
    for name in ("one-step-memory", "one-step-stream"):
        ranks = [_saved(out, name, r)["state"] for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() == init.keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in init), name
        assert any(not torch.equal(ranks[0][k], init[k]) for k in init), f"{name}: no step was taken"
        assert len(_saved(out, name, 0)["history"]) == 1


def test_two_processes_with_global_batch_b_match_one_process_with_batch_b(probed):
    snapshot, out = probed
    for name, (stream, batch) in CASES.items():
        one = _fit(snapshot, Runtime(stream=stream), batch)[0].module.state_dict()
        two = _saved(out, name, 0)["state"]
        worst = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert worst <= TOLERANCE, f"{name}: 2 processes differ from 1 by {worst:.3g} > {TOLERANCE}"
        loops = _saved(out, name, 0)["loops"]
        assert loops[0]["world_size"] == 2 and loops[0]["cut"] == "global batches", loops


def test_rank_0s_clock_decides_the_time_budget_for_every_rank(probed):
    _, out = probed
    ranks = [_saved(out, "budget", r) for r in (0, 1)]
    # rank 1's clock never moves: alone it would train all 10 epochs and hang rank 0's all-reduce
    assert [len(r["history"]) for r in ranks] == [3, 3]
    assert all(r["loops"][0]["budget_hit"] and r["loops"][0]["stopped"] == "budget" for r in ranks)
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])


# --- the row cut, in one process per rank's view (no collectives needed) -----------------------------
def _uneven_file(path: Path, sizes: list[int]) -> Path:
    """One row group per size, every row of the train split, ids in file order."""
    start = 0
    schema = pa.schema([("event_id", pa.int64()), ("split", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for n in sizes:
            ids = np.arange(start, start + n)
            writer.write_table(pa.table({"event_id": ids, "split": ["train"] * n}, schema=schema))
            start += n
    return path


def _rank_rows(path: Path, rank: int, world: int) -> ParquetRows:
    return ParquetRows(path, "train", ["event_id"], lambda t: (t.column("event_id").to_numpy(),), seed=5,
                       buffer_rows=150, rank=rank, world_size=world)  # fmt: skip


def test_row_group_cut_takes_the_same_steps_on_every_rank_and_cuts_to_the_minimum(tmp_path):
    sizes = [130, 70, 100, 90, 160, 40, 110, 100, 120, 80]  # 10 groups >= 4 per rank
    path = _uneven_file(tmp_path / "u.parquet", sizes)
    views = [RankSteps(_rank_rows(path, r, 2), Runtime(rank=r, world_size=2)) for r in (0, 1)]
    assert all(v.cut == "row groups" for v in views)
    for epoch in (1, 2):
        runs = [list(v.epoch(epoch, 64)) for v in views]
        assert len(runs[0]) == len(runs[1]) > 0, "the same number of optimiser steps on both ranks"
        ids = [np.concatenate([b[0].numpy() for b, _ in run]) for run in runs]
        assert not set(ids[0]) & set(ids[1]), "disjoint rows"
        for r, view in enumerate(views):  # each rank reads only its own row groups
            own = {i for g in view.rows.groups_for(epoch) for i in range(sum(sizes[:g]), sum(sizes[: g + 1]))}
            assert set(ids[r]) <= own
        for (b0, w0), (b1, w1) in zip(*runs, strict=True):  # weights: each rank's share of the step
            n0, n1 = len(b0[0]), len(b1[0])
            assert w0 == pytest.approx(2 * n0 / (n0 + n1)) and w1 == pytest.approx(2 * n1 / (n0 + n1))
    # what was cut is what the ranks did not see, and less than one row group per rank an epoch
    assert views[0].rows_dropped == views[1].rows_dropped
    assert 0 < views[0].rows_dropped < 2 * 2 * max(sizes)


def test_few_row_groups_cut_global_batches_that_are_the_one_process_batches(tmp_path):
    path = _uneven_file(tmp_path / "few.parquet", [300, 200, 251])  # 3 groups < 4 per rank
    views = [RankSteps(_rank_rows(path, r, 2), Runtime(rank=r, world_size=2)) for r in (0, 1)]
    assert all(v.cut == "global batches" for v in views)
    one = [b[0].numpy() for b in _rank_rows(path, 0, 1).epoch(1, 64)]
    halves = [list(v.epoch(1, 64)) for v in views]
    assert len(halves[0]) == len(halves[1]) == len(one)
    for want, (b0, w0), (b1, w1) in zip(one, *halves, strict=True):
        assert np.array_equal(np.concatenate([b0[0].numpy(), b1[0].numpy()]), want)
        # weight = rows * ranks / global rows: DDP's average is then the global batch's mean loss
        assert (w0, w1) == pytest.approx((2 * len(b0[0]) / len(want), 2 * len(b1[0]) / len(want)))
    with pytest.raises(ValueError, match="batch_size 1 is smaller than the 2 training processes"):
        next(views[0].epoch(1, 1))


# --- through the pipeline: the Dagster asset chain, and a rank that fails -----------------------------
@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    config = tmp_path / "models.toml"
    config.write_text("[deepfm]\nepochs = 4\n")
    for name, value in {"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_TRAIN_PROCS": "2",
                        "RECSYS_DEVICE": "cpu", "RECSYS_FAMILIES": "deepfm",
                        "RECSYS_MODEL_CONFIG": str(config)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    return tmp_path / "home"


def test_two_processes_through_the_dagster_assets_pass_parity_and_blessing(tmp_path, home, dagster_home,
                                                                        monkeypatch):  # fmt: skip
    import dagster as dg

    from orchestration.assets.evaluation import baseline_metrics
    from orchestration.assets.families import build_family_assets
    from orchestration.assets.snapshot import training_snapshot
    from pipeline import steps
    from pipeline.settings import load_settings

    snapshot = write_signal_snapshot(tmp_path / "data")  # 12 row groups: each rank reads its own

    @dg.asset(key=training_snapshot.key)
    def stub_snapshot() -> str:
        return str(snapshot)

    instance = dg.DagsterInstance.get()
    run = dg.materialize([stub_snapshot, baseline_metrics, *build_family_assets("deepfm")], instance=instance)
    assert run.success
    model = run.asset_materializations_for_node("model_deepfm")[0].metadata
    training = model["training"].value
    cut = training["loops"][0]["cut"]
    assert (training["world_size"], training["backend"], cut) == (2, "gloo", "row groups"), training
    checks = {e.check_name: e.passed for e in run.get_asset_check_evaluations()}
    assert checks == {"parity": True, "blessing": True}, checks
    assert run.asset_materializations_for_node("registry_deepfm"), "the blessed 2-process model was promoted"
    # the group's output streamed into the model step's log, line by line, from both ranks
    lines = [e.user_message for e in instance.all_logs(run.run_id) if e.step_key == "model_deepfm"]
    assert any(line.startswith("[default0]:[deepfm] epoch   1") for line in lines), lines
    assert any(line.startswith("[default1]:[deepfm] rank 1 of 2 on cpu (gloo)") for line in lines), lines
    # the number of processes is part of the reuse key: run config procs=2 (the setting unset)
    # reuses the same 2-process model; a 1-process run would be another model
    monkeypatch.delenv("RECSYS_TRAIN_PROCS")
    procs = {"ops": {"model_deepfm": {"config": {"procs": 2}}}}
    model_only = [stub_snapshot, build_family_assets("deepfm")[0]]
    again = dg.materialize(model_only, instance=instance, run_config=procs)
    reused = again.asset_materializations_for_node("model_deepfm")[0].metadata
    assert reused["reused"].value and reused["reuse_key"].value == model["reuse_key"].value
    keys = [steps.training_runtime(load_settings(), procs=n).key() for n in (1, 2)]
    assert keys[0] != keys[1] and keys[0] == Runtime().key()


def _corrupt_column_chunk(path: Path, group: int, column: str) -> None:
    """Overwrite one row group's column chunk with bytes no page header decodes from."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(meta.column(j) for j in range(meta.num_columns) if meta.column(j).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xab" * chunk.total_compressed_size)


def test_a_rank_that_fails_fails_the_step_with_that_ranks_error(tmp_path, home, caplog):
    from pipeline import steps
    from pipeline.settings import load_settings
    from pipeline.torchrun import TrainingProcessFailed

    snapshot = write_signal_snapshot(tmp_path / "data")
    path = snapshot / "fct_ctr_samples.parquet"
    table = pq.read_table(path)  # sorted by split: most row groups then hold train rows only
    pq.write_table(table.take(pc.sort_indices(table, [("split", "ascending")])), path, row_group_size=500)
    stream = Snapshot(snapshot).ctr_stream("train", 1, lambda c: (c.label_like,), rank=1, world_size=2)
    stats = pq.ParquetFile(path).metadata
    train_only = [g for g in stream.groups_for(1) if stats.row_group(g).column(1).statistics.max == "train"
                  and stats.row_group(g).column(1).statistics.min == "train"]  # fmt: skip
    assert stats.schema.column(1).name == "split" and train_only
    _corrupt_column_chunk(path, train_only[0], "label_like")  # a row group only rank 1 reads
    caplog.set_level(logging.INFO, logger=LOG.name)
    with pytest.raises(TrainingProcessFailed) as failed:
        steps.train(FAMILIES["deepfm"], str(snapshot), load_settings(), "bad", LOG, "x")
    message = str(failed.value)
    assert message.startswith("deepfm: rank 1 of 2 failed"), message
    assert f"UnreadableRowGroup: {path}: row group {train_only[0]}" in message, message
    assert "rank 1 of 2 read it" in message and "Couldn't deserialize thrift" in message, message
    assert any(m.startswith("[default1]:") for m in caplog.messages), "rank 1's output reached the step's log"
    assert not (home / "artifacts" / "deepfm" / "bad" / "model" / "config.json").exists()


if __name__ == "__main__":
    _probe(Path(sys.argv[1]), Path(sys.argv[2]))
