"""python -m llama_fast.train on the CPU: 2 ranks under torchrun with gloo (FSDP2, bfloat16
mixed precision, activation checkpointing), a save, a kill and a resume that continues the
uninterrupted run's loss curve; --compile (DDP and FSDP2) against the eager loss curve,
with no graph break; one process on a token file through ``llama-fast train``.

On the CPU the trainer's backend is auto's choice there, the "torch" backend (the PyTorch
reference of the llama_fast ops, still through the custom ops and the patched modules);
the tests also force it with LLAMA_FAST_BACKEND=torch, since the test session switches the
Triton interpreter on, under which auto would pick Triton's kernels, far too slow here.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from llama_fast.__main__ import main as cli_main

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-2", "--warmup", "2", "--log-every", "1"]


def env():
    e = dict(os.environ, LLAMA_FAST_BACKEND="torch", OMP_NUM_THREADS="1")
    e.pop("TRITON_INTERPRET", None)
    return e


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "llama_fast.train", *TINY, *args]


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave them running)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process this test started and every process below it, as a lost node would."""
    pids = descendants(proc.pid)
    proc.kill()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for pid in pids:  # reaped by init, not by us: wait until they are gone
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch build")
def test_torchrun_fsdp_save_kill_resume_continues_the_loss_curve(tmp_path):
    flags = ["--fsdp", "--bf16", "--checkpointing"]
    # The uninterrupted run.
    done = subprocess.run(torchrun(*flags, "--steps", "6", "--metrics", str(tmp_path / "full.jsonl")),
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training tiny on 2 cpu rank(s), FSDP2, bf16, checkpointing" in done.stdout
    assert "tok/s" in done.stdout and "peak" in done.stdout
    full = losses(tmp_path / "full.jsonl")
    assert sorted(full) == list(range(1, 7)) and full[6] < full[1]

    # A run that saves every 2 steps, killed (SIGKILL: torchrun and its workers) once a
    # checkpoint is complete.
    save = tmp_path / "ckpt"
    run = subprocess.Popen(torchrun(*flags, "--steps", "1000", "--save-every", "2", "--save-dir", str(save),
                                    "--metrics", str(tmp_path / "killed.jsonl")),
                           env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (save / "step-2" / ".metadata").is_file():
            assert run.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.2)
    finally:
        kill_tree(run)
    saved = max(int(d.name[5:]) for d in save.glob("step-*") if (d / ".metadata").is_file())
    assert saved < 6, f"the killed run saved step {saved}: nothing left to resume before step 6"

    # Resumed from the newest complete checkpoint, it continues the uninterrupted curve.
    done = subprocess.run(torchrun(*flags, "--steps", "6", "--save-dir", str(save), "--resume",
                                   "--metrics", str(tmp_path / "resumed.jsonl")),
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {save / f'step-{saved}'} at step {saved}" in done.stdout
    resumed = losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(saved + 1, 7))
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], rel=1e-6, abs=1e-6), (step, loss, full[step])


def test_cli_train_one_process_on_a_token_file(tmp_path, capsys, monkeypatch):
    """``llama-fast train`` in this process, no process group: reads a uint16 token file,
    saves at the end; a second call resumes there and stops at once (its steps are done)."""
    monkeypatch.setenv("LLAMA_FAST_BACKEND", "torch")
    tokens = (np.arange(5000) * 7 % 256).astype(np.uint16)
    (tmp_path / "tokens.bin").write_bytes(tokens.tobytes())
    args = ["train", *TINY, "--steps", "3", "--data", str(tmp_path / "tokens.bin"), "--save-dir", str(tmp_path / "c")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "training tiny on 1 cpu rank(s), one process" in out
    assert "step 3/3" in out and f"saved {tmp_path / 'c' / 'step-3'}" in out
    assert cli_main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "at step 3" in out and "step 1/3" not in out


def test_train_usage_errors_name_the_argument(tmp_path, capsys):
    for argv, message in [(["--steps", "0"], "--steps must be at least 1"),
                          (["--model", "llama-9"], "--model 'llama-9' is not a known config"),
                          (["--resume"], "--resume needs --save-dir"),
                          (["--tp", "0"], "--tp must be at least 1"),
                          (["--data", str(tmp_path / "none.bin")], "no such file")]:
        with pytest.raises(SystemExit):
            cli_main(["train", *argv])
        assert message in capsys.readouterr().err


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch build")
def test_torchrun_tensor_parallel_follows_the_one_process_loss_curve(tmp_path):
    """--tp 2 on 2 ranks (tensor + sequence parallel, no data parallel) against one process."""
    done = subprocess.run(torchrun("--tp", "2", "--steps", "3", "--metrics", str(tmp_path / "tp.jsonl")),
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tensor parallel 2" in done.stdout
    one = subprocess.run([sys.executable, "-m", "llama_fast.train", *TINY, "--steps", "3",
                          "--metrics", str(tmp_path / "one.jsonl")],
                         env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    tp, ref = losses(tmp_path / "tp.jsonl"), losses(tmp_path / "one.jsonl")
    assert sorted(tp) == [1, 2, 3]
    for step in ref:
        assert tp[step] == pytest.approx(ref[step], rel=1e-5), (step, tp[step], ref[step])


def test_cli_train_starts_from_a_meta_checkpoint(tmp_path, capsys, monkeypatch):
    """--checkpoint: a Meta folder (params.json + consolidated.00.pth) of a tiny model: its
    first logged loss is the checkpoint's own loss on the first batch."""
    import torch
    import torch.nn.functional as F

    from llama_fast.model import ModelArgs, Transformer
    from llama_fast.train import Batches

    monkeypatch.setenv("LLAMA_FAST_BACKEND", "torch")
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=11)
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                     "vocab_size": 256, "multiple_of": 32}))
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    argv = [a for a in TINY if a not in ("--model", "tiny")]
    assert cli_main(["train", *argv, "--checkpoint", str(folder), "--steps", "1",
                     "--metrics", str(tmp_path / "m.jsonl")]) == 0
    assert f"training {folder} on 1 cpu rank(s)" in capsys.readouterr().out
    batch = Batches(None, 256, 32, 4, 0, None)(0)
    with torch.no_grad():
        expected = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert losses(tmp_path / "m.jsonl")[1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo in this torch build")
@pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")),
                    reason="inductor builds its CPU kernels with a C++ compiler, and none is on PATH")
@pytest.mark.parametrize("flags,rtol", [([], 1e-4), (["--fsdp", "--bf16", "--checkpointing"], 1e-3)],
                         ids=["ddp-fp32", "fsdp-bf16-checkpointing"])
def test_torchrun_compile_follows_the_eager_loss_curve(tmp_path, flags, rtol):
    """--compile on 2 ranks (DDP in float32; FSDP2 with bfloat16 mixed precision and
    activation checkpointing): the blocks compiled by inductor into one graph with no graph
    break (the trainer logs dynamo's counts after the first step and in every metrics
    record), and the loss curve of the same run without --compile, up to the rounding
    inductor's fused kernels change (float32: 1e-4; bfloat16, whose rounding points
    inductor fuses away: 1e-3, an eighth of bfloat16's epsilon)."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        metrics = tmp_path / f"{name}.jsonl"
        done = subprocess.run(torchrun(*flags, *extra, "--steps", "3", "--metrics", str(metrics)),
                              env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = (done.stdout, [json.loads(line) for line in metrics.read_text().splitlines()])
    out, compiled = runs["compiled"]
    assert "compiled blocks: 1 graph(s), 0 graph break(s)" in out, out
    assert [r["graph_breaks"] for r in compiled] == [0, 0, 0], compiled
    eager = runs["eager"][1]
    assert "graphs" not in eager[0]
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3]
    for c, e in zip(compiled, eager):
        assert c["loss"] == pytest.approx(e["loss"], rel=rtol), (c, e)


def test_compile_summary_counts_a_graph_break():
    """What --compile logs is dynamo's own count: a function with a graph break in it shows
    one, with its reason, and two graphs."""
    import torch

    from llama_fast.train import _compile_summary

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()

    def split(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    try:
        assert _compile_summary() == (0, {})
        torch.compile(split, backend="eager")(torch.ones(3))
        graphs, breaks = _compile_summary()
        assert graphs == 2 and sum(breaks.values()) == 1, (graphs, breaks)
    finally:
        torch._dynamo.reset()


def test_cli_train_computes_the_loss_through_the_patched_head(tmp_path, monkeypatch):
    """The patched model trains through its own loss: FusedCrossEntropyHead runs (no logits
    are formed) on every step; --no-patch keeps model.CrossEntropyHead."""
    from llama_fast import model_fused

    calls = []
    real = model_fused.head_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setenv("LLAMA_FAST_BACKEND", "torch")
    monkeypatch.setattr(model_fused, "head_cross_entropy", counted)
    assert cli_main(["train", *TINY, "--steps", "2", "--metrics", str(tmp_path / "m.jsonl")]) == 0
    assert len(calls) == 2
    assert cli_main(["train", *TINY, "--steps", "2", "--no-patch", "--metrics", str(tmp_path / "u.jsonl")]) == 0
    assert len(calls) == 2
    patched, unpatched = losses(tmp_path / "m.jsonl"), losses(tmp_path / "u.jsonl")
    for step in patched:
        assert patched[step] == pytest.approx(unpatched[step], rel=1e-5), (step, patched, unpatched)
