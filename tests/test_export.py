"""Exporting the student of a run to TorchScript and ONNX, checked on real test images."""

from __future__ import annotations

import subprocess
import sys

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from distill_zoo.models import create_model
from distill_zoo.shipping import export
from distill_zoo.teachers.checkpoints import extract_state_dict


def _student_from(checkpoint) -> nn.Module:
    """The reference: resnet8 with the ``student.*`` weights of a run checkpoint."""
    model = create_model("resnet8", num_classes=4, in_channels=3)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(extract_state_dict(state))
    return model.eval()


def _real_test_images(run_dir) -> torch.Tensor:
    data = export.evaluation_data(export.load_config(run_dir))
    return export.first_test_images(data, 64)


def test_torchscript_file_holds_the_student_alone_and_matches(finished_run, capsys):
    run_dir, metrics = finished_run
    assert export.main([str(run_dir), "format=torchscript"]) == 0
    out = run_dir / "export" / "student.pt"
    assert out.is_file()
    assert "checked on 64 real test images" in capsys.readouterr().out

    loaded = torch.jit.load(str(out))
    student = _student_from(metrics["best_checkpoint"])
    assert sum(p.numel() for p in loaded.parameters()) == metrics["student_params"]
    assert set(loaded.state_dict()) == set(student.state_dict())  # no teacher./distiller.
    images = _real_test_images(run_dir)
    assert images.shape == (64, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), student(images), rtol=0, atol=1e-5)


@pytest.mark.slow  # the ONNX exporter takes 5-10 s on one CPU thread; the fast ONNX test is
# test_export_model_runs_at_other_batch_sizes
def test_onnx_file_from_a_checkpoint_has_a_dynamic_batch_and_matches(finished_run, tmp_path):
    run_dir, metrics = finished_run
    last = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "model.onnx"
    assert export.main([str(last), "format=onnx", f"out={out}", "opset=18"]) == 0

    graph = onnx.load(str(out))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert not (tmp_path / "model.onnx.data").exists()  # weights inside the one file
    student = _student_from(last)
    own = set(student.state_dict())
    names = [t.name for t in graph.graph.initializer]
    assert not [n for n in names if n.startswith(("teacher.", "distiller."))]
    weights = sum(onnx.numpy_helper.to_array(t).size for t in graph.graph.initializer)
    # BatchNorm is folded into the convolutions: at most the student's weights, no more.
    assert weights <= sum(v.numel() for v in student.state_dict().values())
    assert any(n in own for n in names)

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = _real_test_images(run_dir)
    for batch in (images, images[:1], images[:5]):
        (logits,) = session.run(None, {"images": batch.numpy()})
        with torch.inference_mode():
            expected = student(batch)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_choice(finished_run):
    run_dir, metrics = finished_run
    best = run_dir / "checkpoints" / metrics["best_checkpoint"].rsplit("/", 1)[-1]
    assert export.resolve_run(run_dir) == (run_dir, best)
    assert export.resolve_run(run_dir, "last") == (run_dir, run_dir / "checkpoints" / "last.ckpt")
    assert export.resolve_run(best, "last") == (run_dir.resolve(), best)  # a file is that file
    with pytest.raises(export.UserError, match="use ckpt=best or ckpt=last"):
        export.resolve_run(run_dir, "first")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "format=tflite"], "format=tflite is unknown: use format=onnx or"),
        (["{tmp}/nowhere", "format=onnx"], "does not exist: pass a run folder"),
        (["{tmp}", "format=onnx"], "is not a run folder (no config.yaml)"),
        (["{tmp}/x.ckpt"], "is not inside a run folder"),
        (["format=onnx"], "expected one run folder or checkpoint"),
        (["{run}", "fromat=onnx"], "unknown option fromat="),
        (["{run}", "opset=high"], "opset=high is not a valid int"),
    ],
)
def test_bad_command_lines_say_what_to_fix(finished_run, tmp_path, capsys, args, message):
    (tmp_path / "x.ckpt").write_bytes(b"")
    args = [a.format(run=finished_run[0], tmp=tmp_path) for a in args]
    assert export.main(args) == 2
    assert message in capsys.readouterr().err


class DictOutput(nn.Module):
    """Returns a dict, which TorchScript tracing refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(x.mean((2, 3)))}


class DataDependentBranch(nn.Module):
    """Branches on a tensor's value, which ``torch.export`` (and so ONNX) refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.mean((2, 3)))
        return logits if logits.sum() > 0 else -logits


class ThroughNumpy(nn.Module):
    """Leaves torch for numpy: a trace records the numpy result as a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.detach().numpy().mean((2, 3)))


@pytest.mark.parametrize(
    ("model", "fmt", "other"),
    [(DictOutput(), "torchscript", "onnx"), (DataDependentBranch(), "onnx", "torchscript")],
)
def test_unsupported_architecture_fails_clearly(tmp_path, model, fmt, other):
    with pytest.raises(export.ExportError) as caught:
        export.export_model(model, fmt, torch.randn(2, 3, 4, 4), tmp_path / "m", name="mynet")
    message = str(caught.value)
    assert f"cannot export the student mynet to {fmt}" in message
    assert f"Try format={other}" in message


def test_an_unfaithful_trace_is_caught_by_the_output_check(tmp_path):
    out = tmp_path / "m.pt"
    notes = export.export_model(ThroughNumpy(), "torchscript", torch.randn(2, 3, 4, 4), out)
    assert any("NumPy" in note for note in notes)  # the tracer's warning is passed on
    images = torch.randn(2, 3, 4, 4)  # other values: the frozen constant shows
    with pytest.raises(export.ExportError, match="differ from eager PyTorch's by up to"):
        export.check_outputs(
            export.run_exported(out, "torchscript", images), ThroughNumpy()(images), 1e-4, 1e-4
        )


class TinyNet(nn.Module):
    """A convolution, pooling and a linear layer: the smallest student worth exporting."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_model_runs_at_other_batch_sizes(tmp_path, fmt):
    torch.manual_seed(0)
    model = TinyNet().eval()
    out = tmp_path / f"tiny.{export.FORMATS[fmt]}"
    assert export.export_model(model, fmt, torch.randn(2, 3, 6, 6), out) == []
    for batch in (1, 7):
        images = torch.randn(batch, 3, 6, 6)
        with torch.inference_mode():
            expected = model(images)
        exported = export.run_exported(out, fmt, images)
        assert export.check_outputs(exported, expected, atol=1e-5, rtol=0) <= 1e-5


def test_check_outputs_tolerance_scales_with_the_logits():
    eager = torch.tensor([[1000.0, -2.0]])
    assert export.check_outputs(eager + 0.05, eager, atol=1e-4, rtol=1e-4) == pytest.approx(0.05)
    with pytest.raises(export.ExportError, match=r"tolerance 0\.1 = atol"):
        export.check_outputs(eager + 0.2, eager, atol=1e-4, rtol=1e-4)
    with pytest.raises(export.ExportError, match="shape"):
        export.check_outputs(eager[:, :1], eager, atol=1e-4, rtol=1e-4)


def test_a_mismatch_exits_nonzero(finished_run, tmp_path, monkeypatch, capsys):
    real = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda *args: real(*args) + 1.0)
    out = tmp_path / "m.pt"
    assert export.main([str(finished_run[0]), "format=torchscript", f"out={out}"]) == 1
    assert "the export is not faithful" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point(finished_run, tmp_path):
    out = tmp_path / "student.pt"
    done = subprocess.run(
        [sys.executable, "-m", "distill_zoo.export", str(finished_run[0]), "format=torchscript"]
        + [f"out={out}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "ok" in done.stdout


class FrozenBatch(nn.Module):
    """Reshapes to the batch size taken as a Python int, which a trace freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3))).reshape(int(x.shape[0]), 4)


def test_a_file_that_fails_at_another_batch_size_exits_nonzero(
    finished_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(export, "load_student", lambda *args, **kwargs: FrozenBatch().eval())
    out = tmp_path / "m.pt"
    assert export.main([str(finished_run[0]), "format=torchscript", f"out={out}"]) == 1
    assert "fails on a batch of 64 real test images" in capsys.readouterr().err


def test_help_shows_the_syntax(capsys):
    assert export.main(["--help"]) == 0
    assert "format=onnx|torchscript" in capsys.readouterr().out


def test_run_folders_named_after_overrides_are_paths_not_options(tmp_path):
    folder = tmp_path / "data.subset=5000,distiller=kd,seed=0"
    folder.mkdir()
    path, options = export.parse_arguments(
        [str(folder), "format=torchscript"], {"format": "onnx"}, ""
    )
    assert path == str(folder) and options == {"format": "torchscript"}
