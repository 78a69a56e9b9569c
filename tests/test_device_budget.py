"""Where torch families train (RECSYS_DEVICE, RECSYS_TORCH_THREADS, run config) and the time budget
(``max_minutes``). CPU only: the CUDA paths are checked for their errors and choices, never run.
Budgets run on a fake clock injected through the runtime, so no test depends on machine speed."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_models import write_tiny_snapshot

from models import deepfm, mf_implicit, neumf
from models.catalogue import FAMILIES
from models.config import ConfigError, parse_config
from models.data import Snapshot
from models.runtime import DEFAULT_BUFFER_ROWS, DeviceUnavailable, Runtime, resolve_device, use_runtime
from models.train import deterministic
from pipeline import steps
from pipeline.settings import DEFAULT_STREAM_BUFFER_ROWS, SettingsError, load_settings

LOG = logging.getLogger("test_device_budget")


class FakeClock:
    """A clock that moves ``step`` seconds every time it is read (once per batch in the loops)."""

    def __init__(self, step: float = 1.0):
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.now += self.step
        self.reads += 1
        return self.now


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Snapshot:
    return Snapshot(write_tiny_snapshot(tmp_path_factory.mktemp("snap")))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the settings ------------------------------------------------------------------------------
def test_device_and_thread_settings_are_validated_naming_the_variable():
    s = load_settings({})
    assert (s.device, s.torch_threads, s.stream_buffer_rows) == ("auto", 1, DEFAULT_BUFFER_ROWS)
    assert DEFAULT_STREAM_BUFFER_ROWS == DEFAULT_BUFFER_ROWS
    assert load_settings({"RECSYS_DEVICE": " CUDA:1 "}).device == "cuda:1"
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(SettingsError, match="RECSYS_DEVICE"):
            load_settings({"RECSYS_DEVICE": bad})
    with pytest.raises(SettingsError, match="RECSYS_TORCH_THREADS"):
        load_settings({"RECSYS_TORCH_THREADS": "0"})
    with pytest.raises(SettingsError, match="RECSYS_STREAM_BUFFER_ROWS"):
        load_settings({"RECSYS_STREAM_BUFFER_ROWS": "many"})


def test_auto_picks_cuda_only_when_torch_sees_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(DeviceUnavailable, match="RECSYS_DEVICE=cuda.*auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="RECSYS_DEVICE"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DeviceUnavailable, match="cuda:3.*1 CUDA device"):
        resolve_device("cuda:3")


def test_mixed_precision_by_default_only_on_cuda(monkeypatch):
    cpu = Runtime()
    assert cpu.amp_dtype is None and cpu.describe()["amp"] is None and cpu.describe()["device"] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert Runtime(device="cuda").amp_dtype == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert Runtime(device="cuda").describe()["amp"] == "fp16"
    # asked for: bf16 on CPU too, none at all with fp32
    assert Runtime(precision="bf16").describe()["amp"] == "bf16"
    assert Runtime(device="cuda", precision="fp32").amp_dtype is None
    with pytest.raises(ValueError, match="precision"):
        Runtime(precision="fp16")
    with pytest.raises(ValueError, match="rank"):
        Runtime(rank=2, world_size=2)


def test_precision_setting_is_validated_and_bf16_needs_it_on_the_gpu(tmp_path, monkeypatch):
    from models.runtime import PRECISIONS
    from pipeline.settings import PRECISIONS as SETTING_CHOICES

    assert PRECISIONS == SETTING_CHOICES
    assert load_settings({}).precision == "auto"
    assert load_settings({"RECSYS_PRECISION": " BF16 "}).precision == "bf16"
    with pytest.raises(SettingsError, match="RECSYS_PRECISION='fp16'"):
        load_settings({"RECSYS_PRECISION": "fp16"})
    settings = load_settings({"RECSYS_HOME": str(tmp_path)})
    with pytest.raises(SettingsError, match="run config precision"):
        steps.training_runtime(settings, precision="half")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla T4")
    with pytest.raises(DeviceUnavailable, match="run config precision=bf16: the GPU Tesla T4"):
        steps.training_runtime(settings, device="cuda", precision="bf16")
    assert steps.training_runtime(settings, device="cuda").amp_dtype == torch.float16


def test_bf16_on_cpu_trains_under_autocast_and_hands_back_float32_weights(snapshot, tmp_path):
    """RECSYS_PRECISION=bf16: the forward of every step runs in bf16 (a Linear's output), while
    the weights, the saved checkpoint and the exported graph stay float32 and pass the parity
    gate. It is a different model from the float32 one, so it is not reused for it."""
    seen = []
    env = {"RECSYS_HOME": str(tmp_path), "RECSYS_MODEL_CONFIG": str(tmp_path / "m.toml")}
    settings = {p: load_settings({**env, "RECSYS_PRECISION": p}) for p in ("auto", "bf16")}
    (tmp_path / "m.toml").write_text("[deepfm]\nepochs = 1\n")
    # a global hook: it sees every Linear of the model that fit builds inside
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, _, out: seen.append(out.dtype)
        if isinstance(module, torch.nn.Linear) and module.training else None
    )  # fmt: skip
    try:
        bf16 = steps.train(FAMILIES["deepfm"], str(snapshot.path), settings["bf16"], "r1", LOG, "v1")
    finally:
        handle.remove()
    assert seen and set(seen) == {torch.bfloat16}, set(seen)
    assert bf16.training["amp"] == "bf16"
    weights = torch.load(bf16.out / "model.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    fp32 = steps.train(FAMILIES["deepfm"], str(snapshot.path), settings["auto"], "r2", LOG, "v1")
    assert not fp32.reuse.reused and fp32.training["amp"] is None  # trained, not bf16's checkpoint
    assert not _same(weights, torch.load(fp32.out / "model.pt", weights_only=True))
    exported = steps.export(FAMILIES["deepfm"], str(bf16.out), str(snapshot.path), settings["bf16"], "r1",
                            LOG, "v1")  # fmt: skip
    assert exported.parity["passed"], exported.parity


def test_thread_setting_reaches_torch_and_is_restored():
    before = torch.get_num_threads()
    with use_runtime(Runtime(threads=2)), deterministic(0):
        assert torch.get_num_threads() == 2
    with deterministic(0):  # the default runtime: one thread, as before the setting existed
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cuda_requested_without_cuda_fails_naming_who_asked(snapshot, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = load_settings({"RECSYS_HOME": str(tmp_path), "RECSYS_DEVICE": "cuda"})
    with pytest.raises(DeviceUnavailable, match="RECSYS_DEVICE=cuda"):
        steps.train(FAMILIES["deepfm"], str(snapshot.path), settings, "r1", LOG, "v1")
    cpu = load_settings({"RECSYS_HOME": str(tmp_path)})
    with pytest.raises(DeviceUnavailable, match="run config device=cuda"):
        steps.train(FAMILIES["deepfm"], str(snapshot.path), cpu, "r1", LOG, "v1", device="cuda")
    with pytest.raises(SettingsError, match="run config device"):
        steps.train(FAMILIES["deepfm"], str(snapshot.path), cpu, "r1", LOG, "v1", device="gpu")


# --- the time budget -----------------------------------------------------------------------------
def test_max_minutes_is_off_by_default_and_checked():
    for name in ("deepfm", "din", "mmoe", "mf_sgd", "gmf", "neumf", "cdae", "mf_implicit"):
        assert parse_config(FAMILIES[name].config_cls, {}).max_minutes is None
        assert parse_config(FAMILIES[name].config_cls, {"max_minutes": 2}).max_minutes == 2.0
        with pytest.raises(ConfigError, match="max_minutes"):
            parse_config(FAMILIES[name].config_cls, {"max_minutes": 0})


def _fit_on_clock(fit, snapshot, config, clock):
    with use_runtime(Runtime(clock=clock)) as loops:
        model = fit(snapshot, config, lambda _: None)
    return model, loops


def test_budget_out_mid_epoch_keeps_the_best_validated_epoch(snapshot):
    # The tiny train split is 2 batches of 1024: the clock reads 0 at start, then 1, 2 after epoch
    # 1's batches, 3 after its validation, 4 after epoch 2's first batch: 3.5 s runs out there.
    config = deepfm.Config(epochs=10, max_minutes=3.5 / 60)
    model, loops = _fit_on_clock(deepfm.fit, snapshot, config, FakeClock())
    assert [r["epoch"] for r in model.history] == [1]
    assert loops == [{"family": "deepfm", "epochs": 1, "best_epoch": 1, "stopped": "budget",
                      "budget_hit": True, "max_minutes": 3.5 / 60, "device": "cpu",
                      "sparse_tables": []}]  # fmt: skip
    # the partial second epoch was dropped: the weights are epoch 1's, as a 1-epoch fit gives
    one_epoch, _ = _fit_on_clock(deepfm.fit, snapshot, deepfm.Config(epochs=1), FakeClock())
    assert _same(_weights(model), _weights(one_epoch))
    assert model.history[0] == {**one_epoch.history[0], "seconds": model.history[0]["seconds"],
                                "rows_per_s": model.history[0]["rows_per_s"]}  # fmt: skip


def test_budget_out_before_the_first_validation_validates_the_weights_so_far(snapshot):
    config = deepfm.Config(epochs=10, max_minutes=0.5 / 60)  # runs out after the first batch
    model, loops = _fit_on_clock(deepfm.fit, snapshot, config, FakeClock())
    train_rows = len(snapshot.ctr("train"))
    assert train_rows > config.batch_size  # so the first epoch really was cut short
    assert len(model.history) == 1 and model.history[0]["valid_metric"] is not None
    assert model.history[0]["rows_per_s"] * model.history[0]["seconds"] == pytest.approx(config.batch_size)
    assert loops[0]["budget_hit"] and loops[0]["stopped"] == "budget" and loops[0]["epochs"] == 1


def test_no_budget_means_no_clock_reads_and_no_hit(snapshot):
    clock = FakeClock()
    model, loops = _fit_on_clock(deepfm.fit, snapshot, deepfm.Config(epochs=2), clock)
    assert clock.reads == 0 and not loops[0]["budget_hit"] and len(model.history) == 2


def test_budget_in_the_families_with_their_own_loops(snapshot):
    model, loops = _fit_on_clock(
        mf_implicit.fit, snapshot, mf_implicit.Config(epochs=30, max_minutes=1.5 / 60), FakeClock()
    )
    assert loops[0]["budget_hit"] and 1 <= len(model.history) < 30
    # neumf: one budget across its pretraining fits and the fine-tuning, each validating once
    model, loops = _fit_on_clock(neumf.fit, snapshot, neumf.Config(max_minutes=0.5 / 60), FakeClock())
    assert [loop["family"] for loop in loops] == ["gmf", "ncf_mlp", "neumf"]
    assert all(loop["budget_hit"] and loop["epochs"] == 1 for loop in loops)


def test_neumf_shares_its_budget_and_takes_budget_cut_halves_only_under_a_budget(snapshot):
    # 100 clock reads of budget: the gmf half pretrained here may take 40 of them, so the MLP
    # half still trains more than the one batch a first-come budget left it
    model, loops = _fit_on_clock(neumf.fit, snapshot, neumf.Config(max_minutes=100 / 60), FakeClock())
    assert [loop["family"] for loop in loops] == ["gmf", "ncf_mlp", "neumf"]
    assert loops[0]["max_minutes"] == pytest.approx(0.4 * 99 / 60)
    assert 0.3 * 100 / 60 < loops[1]["max_minutes"] < 0.45 * 100 / 60
    # halves fitted by the gmf / ncf_mlp families and cut by their own budgets
    cut = {}
    for name in ("gmf", "ncf_mlp"):
        config = FAMILIES[name].config_cls(max_minutes=1.5 / 60)
        cut[name], (loop,) = _fit_on_clock(FAMILIES[name].fit, snapshot, config, FakeClock())
        assert loop["budget_hit"]
        cut[name].meta["training"] = loop  # what the pipeline's training step records
    with use_runtime(Runtime(clock=FakeClock())) as loops:
        neumf.fit(snapshot, neumf.Config(max_minutes=100 / 60), lambda _: None, upstream=cut)
    assert [loop["family"] for loop in loops] == ["neumf"]  # both halves taken as they are
    with use_runtime(Runtime(clock=FakeClock())) as loops:
        neumf.fit(snapshot, neumf.Config(epochs=1), lambda _: None, upstream=cut)
    assert [loop["family"] for loop in loops] == ["gmf", "ncf_mlp", "neumf"]  # unbounded: pretrained again


def test_the_model_asset_metadata_says_budget_hit(snapshot, tmp_path):
    config = tmp_path / "models.toml"
    config.write_text("[deepfm]\nmax_minutes = 1e-9\n")  # out after the first batch, on any machine
    settings = load_settings({"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MODEL_CONFIG": str(config),
                              "RECSYS_DEVICE": "cpu"})  # fmt: skip
    result = steps.train(FAMILIES["deepfm"], str(snapshot.path), settings, "r1", LOG, "v1")
    training = result.training
    assert training["budget_hit"] is True and training["epochs"] == len(result.history) == 1
    assert (training["device"], training["threads"], training["amp"], training["rows"]) == (
        "cpu",
        1,
        None,
        "stream",
    )
    saved = json.loads((result.out / "config.json").read_text())
    assert saved["meta"]["training"] == training and saved["config"]["max_minutes"] == 1e-9
    again = steps.train(FAMILIES["deepfm"], str(snapshot.path), settings, "r2", LOG, "v1")
    assert again.reuse.reused and again.training == training
    # another thread count is another model: the reuse key says so
    other = load_settings({**{"RECSYS_HOME": str(tmp_path / "home"), "RECSYS_MODEL_CONFIG": str(config)},
                           "RECSYS_TORCH_THREADS": "2"})  # fmt: skip
    assert (
        steps.train(FAMILIES["deepfm"], str(snapshot.path), other, "r3", LOG, "v1").reuse.key
        != result.reuse.key
    )


def test_training_hands_back_a_cpu_model_whatever_the_runtime(snapshot):
    with use_runtime(Runtime(threads=2)):
        model = deepfm.fit(snapshot, deepfm.Config(epochs=1), lambda _: None)
    assert all(t.device.type == "cpu" for t in model.module.state_dict().values())
    assert not model.module.training


def test_run_config_device_reaches_the_model_asset(snapshot, tmp_path, monkeypatch):
    import dagster as dg

    from orchestration.assets.families import model_asset
    from orchestration.assets.snapshot import training_snapshot

    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RECSYS_MODEL_CONFIG", str(tmp_path / "models.toml"))
    (tmp_path / "models.toml").write_text("[deepfm]\nepochs = 1\n")

    @dg.asset(key=training_snapshot.key)
    def stub_snapshot() -> str:
        return str(snapshot.path)

    assets = [stub_snapshot, model_asset(FAMILIES["deepfm"], "v1")]
    run = dg.materialize(assets, run_config={"ops": {"model_deepfm": {"config": {"device": "cpu"}}}})
    [event] = run.asset_materializations_for_node("model_deepfm")
    meta = event.metadata
    assert meta["training"].value["device"] == "cpu" and meta["budget_hit"].value is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    failed = dg.materialize(assets, run_config={"ops": {"model_deepfm": {"config": {"device": "cuda"}}}},
                            raise_on_error=False)  # fmt: skip
    assert not failed.success
    assert "run config device=cuda" in str(failed.all_events)
    bf16 = dg.materialize(assets, run_config={"ops": {"model_deepfm": {"config": {"precision": "bf16"}}}})
    [event] = bf16.asset_materializations_for_node("model_deepfm")
    assert event.metadata["training"].value["amp"] == "bf16"
