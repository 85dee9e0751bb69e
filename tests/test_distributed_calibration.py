"""Two-process calibration (Accelerate's ``debug_launcher``: forked CPU processes over gloo) vs one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher

from hf_vitcompress import CompressionConfig, compress
from hf_vitcompress.calibration.distributed import CalibrationProcessError, CalibrationProcesses

from .conftest import tiny_vit

# debug_launcher's gloo rendezvous always binds port 29500: under pytest-xdist (`--dist loadgroup`) these tests
# run in one worker, one at a time
pytestmark = pytest.mark.xdist_group("accelerate_port_29500")

CONFIGS = {
    # one statistics pass, then a block-by-block fit to the dense outputs on the compressed activations,
    # judged on the held-out images (the judgement, too, must be the same on every process count)
    "sequential": dict(target_param_ratio=0.6, sequential="auto", compensation_rank=0),
    "head_factorization": dict(method="head_factorization", target_param_ratio=0.7),
    "taylor_pruning": dict(method="pruning", target_flops_ratio=0.7, pruning_importance="taylor"),
    # compensation residuals trained on every batch in the single-process order
    "compensation": dict(target_param_ratio=0.6, compensation_rank=8, compensation_epochs=2),
}


def _images() -> torch.Tensor:
    # 7 batches of 8 (and 4 left over): the two shards differ in length, as they do in real runs
    return torch.randn(60, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _calibration_batches() -> list[dict[str, torch.Tensor]]:
    return [{"pixel_values": batch} for batch in _images().split(8)]


def _compress(name: str):
    return compress(tiny_vit(), CompressionConfig(**CONFIGS[name]), _calibration_batches(), progress=False)


def _outcome(model) -> dict:
    """What must agree between runs: the plan and the function (factors are only defined up to signs)."""
    with torch.no_grad():
        logits = model(pixel_values=_images()[:16]).logits
    return {"plan": model.config.compression_plan, "logits": logits, "state": model.state_dict()}


def _worker(output: str, names: tuple[str, ...], fault: str | None) -> None:
    """Runs in each forked process: compress, then save the outcome (or the error) under ``output``."""
    # A forked child must not use the OpenMP pool the parent already started (it deadlocks): one thread.
    torch.set_num_threads(1)
    processes = CalibrationProcesses.current()
    for name in names:
        target = Path(output) / f"{name}-{processes.index}"
        try:
            model = tiny_vit()
            batches = _calibration_batches()
            if fault == "double" and processes.index == 1:
                model = model.double()
            if fault == "nan" and processes.index == 1:
                batches[1]["pixel_values"][0, 0, 0, 0] = float("nan")  # batch 1 is process 1's
            if fault == "one_batch":
                batches = batches[:1]  # process 1 gets no batch at all
            if fault == "main_only":  # the usual `if accelerator.is_main_process:` pattern: no collectives
                if processes.index != 0:
                    continue
                compressed = compress(model, CompressionConfig(**CONFIGS[name]), batches, progress=False)
            else:
                config = CompressionConfig(**CONFIGS[name])
                compressed = compress(model, config, batches, progress=False, distributed=True)
            torch.save({"count": processes.count, **_outcome(compressed)}, f"{target}.pt")
        except Exception as error:  # noqa: BLE001 - reported to the parent test, which asserts on it
            Path(f"{target}.error").write_text(json.dumps([type(error).__name__, str(error)]))


def _launch(tmp_path: Path, names: tuple[str, ...], fault: str | None = None) -> None:
    debug_launcher(_worker, args=(str(tmp_path), names, fault), num_processes=2)


def _assert_states_close(first: dict, second: dict, **tolerance) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=lambda m, key=key: f"{key}: {m}", **tolerance)


@pytest.mark.parametrize("name", ["sequential", "head_factorization", "taylor_pruning", "compensation"])
def test_two_process_calibration_equals_one_process(tmp_path, name):
    _launch(tmp_path, (name,))
    assert not list(tmp_path.glob("*.error")), [p.read_text() for p in tmp_path.glob("*.error")]
    single = _outcome(_compress(name))
    for index in range(2):
        saved = torch.load(tmp_path / f"{name}-{index}.pt")
        assert saved["count"] == 2  # really ran as two processes
        assert saved["plan"] == single["plan"]
        # the statistics are equal up to float64 summation order; the factors are then cast to float32
        torch.testing.assert_close(saved["logits"], single["logits"], rtol=1e-4, atol=1e-5)


def test_a_process_without_batches_still_takes_part(tmp_path):
    _launch(tmp_path, ("compensation",), fault="one_batch")
    assert not list(tmp_path.glob("*.error")), [p.read_text() for p in tmp_path.glob("*.error")]
    first, second = (torch.load(tmp_path / f"compensation-{i}.pt") for i in range(2))
    torch.testing.assert_close(first["logits"], second["logits"], rtol=0, atol=0)


def test_a_failure_on_one_process_is_raised_on_every_process(tmp_path):
    _launch(tmp_path, ("sequential",), fault="nan")
    (kind0, message0), (kind1, message1) = (
        json.loads((tmp_path / f"sequential-{i}.error").read_text()) for i in range(2)
    )
    assert kind1 == "CalibrationDataError" and "NaN" in message1  # the process that saw it
    assert kind0 == CalibrationProcessError.__name__ and "process 1 failed during the calibration pass" in message0


def test_without_distributed_each_process_compresses_alone(tmp_path):
    _launch(tmp_path, ("sequential",), fault="main_only")  # would hang if compress ran a collective
    assert not list(tmp_path.glob("*.error")) and (tmp_path / "sequential-0.pt").exists()


def test_mismatched_dtypes_across_processes_raise_on_every_process(tmp_path):
    _launch(tmp_path, ("sequential",), fault="double")
    errors = [json.loads((tmp_path / f"sequential-{i}.error").read_text()) for i in range(2)]
    for kind, message in errors:
        assert kind == CalibrationProcessError.__name__
        assert "model dtype" in message and "torch.float64" in message and "same dtype" in message


def test_single_process_is_the_default():
    processes = CalibrationProcesses.current()
    assert (processes.index, processes.count, processes.is_distributed) == (0, 1, False)
    assert list(processes.shard(range(5))) == [0, 1, 2, 3, 4]
    assert list(CalibrationProcesses(1, 3).shard(range(8))) == [1, 4, 7]
