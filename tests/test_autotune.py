"""The run-time autotuner of the attention launch configurations (kernels/_autotune.py).

On the CPU the tuner runs against a fake GPU identity, a fake timer (``_autotune.timer``)
and fake compiled kernels (their shared memory, registers and spills); the launcher tests
run the real kernels under the Triton interpreter through the tuner. On a GPU the last
tests tune the real kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama_fast.kernels import _autotune as at

REPO = Path(__file__).resolve().parent.parent
FAKE_GPU = at.GpuIdentity(90, "Fake H100 80GB", 232448)
DEFAULT = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A clean tuner with a private cache folder, switched on; gpu() fakes a GPU identity."""
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAMA_FAST_AUTOTUNE", "1")
    at.reset()
    state = SimpleNamespace(timed=[])

    def gpu():
        monkeypatch.setattr(at, "gpu_identity", lambda device: FAKE_GPU)

    def times(table: dict, default_ms: float = 1.0):
        """The fake timer: ms per config label (default_ms for others); records what it timed."""
        def fake(call, cfg):
            state.timed.append(at.label(cfg))
            return table.get(at.label(cfg), default_ms)
        monkeypatch.setattr(at, "timer", fake)

    state.gpu, state.times = gpu, times
    yield state
    at.reset()


def compiled(shared=65536, registers=128, spills=0):
    """What run_candidate(cfg, warmup=True) returns: the compiled kernel's numbers."""
    return at.KernelStats(shared, registers, spills)


def test_kernel_stats_loads_the_compiled_kernel_to_read_its_registers():
    class Compiled:  # as Triton's CompiledKernel: registers and spills known once loaded
        metadata = SimpleNamespace(shared=98304)

        def _init_handles(self):
            self.n_regs, self.n_spills = 230, 0

    assert at.kernel_stats(Compiled()) == at.KernelStats(98304, 230, 0)
    assert at.kernel_stats(None) is None  # the interpreter compiles nothing

    class TooBig(Compiled):
        def _init_handles(self):
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")

    with pytest.raises(RuntimeError, match="out of resource"):
        at.kernel_stats(TooBig())


def fwd_key(seqlen=4096, **kw):
    args = dict(role="fwd", device=torch.device("cuda"), dtype=torch.bfloat16, head_dim=128, causal=True,
                varlen=False, max_seqlen=seqlen)
    args.update(kw)
    return at.attention_key(**args)


def alt(m, n, w, s):
    return {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}


def test_pruning_drops_what_spills_does_not_fit_duplicates_work_or_fails(tuner):
    tuner.gpu()
    tuner.times({"M64 N64 w4 s3": 0.5})
    spills, big, dup, broken, good = alt(128, 128, 8, 2), alt(128, 32, 8, 2), alt(64, 64, 8, 2), alt(128, 64, 4, 2), \
        alt(64, 64, 4, 3)
    stats = {at.label(spills): compiled(spills=16), at.label(big): compiled(shared=300_000)}

    def run_candidate(cfg, warmup=False):
        if cfg == broken:
            raise RuntimeError("OutOfResources: out of resource: shared memory")
        return stats.get(at.label(cfg), compiled()) if warmup else None

    got = at.choose("fwd", fwd_key(), DEFAULT, [spills, big, dup, broken, good], run_candidate)
    assert got == good
    assert sorted(tuner.timed) == sorted([at.label(DEFAULT), at.label(good)])  # nothing else was timed
    (record,) = at.history()
    assert record["source"] == "tuned" and record["config"] == good and record["default"] == DEFAULT
    dropped = record["dropped"]
    assert dropped[at.label(spills)].startswith("spills 16 bytes")
    assert dropped[at.label(big)].startswith("does not fit: 300000 B")
    assert dropped[at.label(dup)].startswith("duplicated work: 64 MMA rows on 8 warps")
    assert "OutOfResources" in dropped[at.label(broken)]


def test_the_fastest_is_chosen_and_noise_keeps_the_default(tuner):
    tuner.gpu()
    cands = [alt(128, 128, 8, 2), alt(64, 64, 4, 3), alt(128, 64, 8, 2)]
    tuner.times({"M128 N128 w8 s2": 0.9, "M64 N64 w4 s3": 0.7, "M128 N64 w8 s2": 0.8})
    assert at.choose("fwd", fwd_key(), DEFAULT, cands, lambda cfg, warmup=False: compiled()) == alt(64, 64, 4, 3)
    assert at.history()[0]["ms"] == {"M128 N64 w8 s3": 1.0, "M128 N128 w8 s2": 0.9, "M64 N64 w4 s3": 0.7,
                                     "M128 N64 w8 s2": 0.8}
    # Within MIN_GAIN of the default: the default stays.
    tuner.times({"M64 N64 w4 s3": 1.0 - at.MIN_GAIN / 2})
    assert at.choose("fwd", fwd_key(seqlen=1024), DEFAULT, cands, lambda cfg, warmup=False: compiled()) == DEFAULT


def test_the_default_is_timed_first_and_candidates_merge_onto_it(tuner):
    tuner.gpu()
    tuner.times({"M16 N32 w4 s2": 0.5})
    default = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 128, "num_warps": 4, "num_stages": 2}
    key = at.decode_key(torch.device("cuda"), torch.bfloat16, 128, 4, 1, 8, 8192)
    got = at.choose("decode", key, default, [{"BLOCK_N": 32, "num_warps": 4, "num_stages": 2}, {"BLOCK_N": 64}],
                    lambda cfg, warmup=False: compiled())
    assert got == dict(default, BLOCK_N=32)  # BLOCK_M and BLOCK_D stay the launcher's
    assert tuner.timed == ["M16 N64 w4 s2", "M16 N32 w4 s2"]  # the duplicate of the default is not timed twice


def test_keys_are_bucketed_by_length():
    gpu = FAKE_GPU
    key = lambda n: at.TuneKey("fwd", gpu, ("bf16", f"S{at._bucket(n, at.LENGTH_BUCKETS)}"))  # noqa: E731
    assert key(4096) == key(4000) == key(2049)
    assert key(1024) != key(16384) and key(2048) != key(4096)
    assert key(1) == key(1024) and key(16384) == key(100_000)
    assert at._bucket(100_000, at.CONTEXT_BUCKETS) == 131072 and at._bucket(3, at.BATCH_BUCKETS) == 4


def test_attention_and_decode_keys(tuner):
    tuner.gpu()
    cuda = torch.device("cuda")
    assert fwd_key(4096) == fwd_key(4000) and fwd_key(1024) != fwd_key(16384)
    assert fwd_key().text == "fwd sm90 bf16 d128 causal dense S4096"
    assert fwd_key(causal=False) != fwd_key() and fwd_key(varlen=True) != fwd_key()
    assert fwd_key(dtype=torch.float16) != fwd_key() and fwd_key(head_dim=64) != fwd_key()
    assert fwd_key(role="dq") != fwd_key()
    d = at.decode_key(cuda, torch.bfloat16, 128, 4, 1, 8, 8000)
    assert d.text == "decode sm90 bf16 d128 g4 q1 B8 L8192"
    assert d == at.decode_key(cuda, torch.bfloat16, 128, 4, 1, 7, 8192) != at.decode_key(cuda, torch.bfloat16, 128, 8,
                                                                                          1, 8, 8192)


def test_cache_is_written_and_read_back_without_timing(tuner, tmp_path):
    tuner.gpu()
    cands = [alt(64, 64, 4, 3)]
    tuner.times({"M64 N64 w4 s3": 0.5})
    run = lambda cfg, warmup=False: compiled()  # noqa: E731
    assert at.choose("fwd", fwd_key(), DEFAULT, cands, run) == alt(64, 64, 4, 3)
    path = at.cache_path(FAKE_GPU.name)
    assert path.parent == tmp_path / "cache"
    doc = json.loads(path.read_text())
    assert doc["gpu"] == FAKE_GPU.name and doc["kernels"] == at.kernels_fingerprint()
    assert doc["entries"]["fwd sm90 bf16 d128 causal dense S4096"]["config"] == alt(64, 64, 4, 3)
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed over

    # A fresh memo (as a new process starts with): read from the file, nothing timed.
    at.reset()
    tuner.timed.clear()
    assert at.choose("fwd", fwd_key(seqlen=3000), DEFAULT, cands, run) == alt(64, 64, 4, 3)
    assert tuner.timed == [] and at.history()[0]["source"] == "cache"
    # A config the candidates no longer offer is tuned again.
    assert at.choose("fwd", fwd_key(), DEFAULT, [alt(128, 64, 8, 2)], run) == DEFAULT
    assert tuner.timed == ["M128 N64 w8 s3", "M128 N64 w8 s2"]
    # Another key of the same GPU goes into the same file, beside the first.
    at.choose("dq", fwd_key(role="dq"), DEFAULT, cands, run)
    assert set(json.loads(path.read_text())["entries"]) >= {"fwd sm90 bf16 d128 causal dense S4096",
                                                           "dq sm90 bf16 d128 causal dense S4096"}


def test_a_fresh_process_reads_the_cache_and_times_nothing(tuner, tmp_path):
    tuner.gpu()
    tuner.times({"M64 N64 w4 s3": 0.5})
    at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], lambda cfg, warmup=False: compiled())
    script = f"""
import torch
from llama_fast.kernels import _autotune as at
at.gpu_identity = lambda device: at.GpuIdentity{tuple(FAKE_GPU)!r}
def no_timing(call, cfg):
    raise AssertionError("timed on a cache hit")
at.timer = no_timing
key = at.attention_key("fwd", torch.device("cuda"), torch.bfloat16, 128, True, False, 3500)
print(at.choose("fwd", key, {DEFAULT!r}, [{alt(64, 64, 4, 3)!r}], lambda cfg, warmup=False: None))
"""
    env = dict(os.environ, LLAMA_FAST_CACHE_DIR=str(tmp_path / "cache"), LLAMA_FAST_AUTOTUNE="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == repr(alt(64, 64, 4, 3))


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "entries": []}), "foreign"])
def test_a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten(tuner, content):
    tuner.gpu()
    path = at.cache_path(FAKE_GPU.name)
    path.parent.mkdir(parents=True)
    if content == "foreign":  # same name, but written by other kernels
        content = json.dumps({**at._header(FAKE_GPU.name), "kernels": "0123456789abcdef",
                              "entries": {fwd_key().text: {"config": alt(64, 64, 4, 3)}}})
    path.write_text(content)
    tuner.times({"M128 N64 w8 s2": 0.5})
    with pytest.warns(RuntimeWarning, match="ignoring .* it will be rewritten"):
        got = at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3), alt(128, 64, 8, 2)],
                        lambda cfg, warmup=False: compiled())
    assert got == alt(128, 64, 8, 2) and len(tuner.timed) == 3  # tuned, not read from the file
    doc = json.loads(path.read_text())
    assert doc["kernels"] == at.kernels_fingerprint() and set(doc["entries"]) == {fwd_key().text}


def test_the_file_name_names_the_gpu_and_the_versions(tuner):
    import importlib.metadata

    name = at.cache_path("NVIDIA H100 80GB HBM3").name
    assert name == (f"autotune-nvidia-h100-80gb-hbm3-llama_fast-{importlib.metadata.version('llama_fast')}"
                    f"-triton-{importlib.metadata.version('triton')}.json")


def test_info_reports_the_switch_and_the_cache(tuner, monkeypatch):
    import llama_fast
    from llama_fast.info import summary

    tuner.gpu()
    tuner.times({})
    at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], lambda cfg, warmup=False: compiled())
    report = llama_fast.info()["autotune"]
    assert report == {"enabled": True, "cache_dir": str(at.cache_dir()), "cache_files": [at.cache_path(FAKE_GPU.name).name]}
    assert "autotuning: on, on CUDA GPUs (LLAMA_FAST_AUTOTUNE=0: off); cache" in summary()
    monkeypatch.setenv("LLAMA_FAST_AUTOTUNE", "0")
    assert llama_fast.info()["autotune"]["enabled"] is False


def test_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path / "x"))
    assert at.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LLAMA_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert at.cache_dir() == tmp_path / "xdg" / "llama_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert at.cache_dir() == Path.home() / ".cache" / "llama_fast"


def test_an_unwritable_cache_folder_keeps_the_choice_in_the_process(tuner, tmp_path, monkeypatch):
    tuner.gpu()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(blocker / "cache"))  # a folder under a file: cannot be made
    tuner.times({"M64 N64 w4 s3": 0.5})
    run = lambda cfg, warmup=False: compiled()  # noqa: E731
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], run) == alt(64, 64, 4, 3)
    tuner.timed.clear()
    assert at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], run) == alt(64, 64, 4, 3)
    assert tuner.timed == []


@pytest.mark.parametrize("how", ["env", "context"])
def test_switched_off_nothing_is_timed_and_the_default_runs(tuner, monkeypatch, how):
    tuner.gpu()
    tuner.times({"M64 N64 w4 s3": 0.1})
    run = lambda cfg, warmup=False: pytest.fail("ran a candidate")  # noqa: E731
    if how == "env":
        monkeypatch.setenv("LLAMA_FAST_AUTOTUNE", "0")
        key = fwd_key()
    else:
        with at.static_configs():
            key = fwd_key()
        assert fwd_key() is not None  # on again after the block
    assert key is None
    assert at.choose("fwd", key, DEFAULT, [alt(64, 64, 4, 3)], run) == DEFAULT
    assert tuner.timed == [] and not at.cache_path(FAKE_GPU.name).exists()


def test_never_on_the_cpu_or_under_the_interpreter(tuner, monkeypatch):
    tuner.times({})
    assert at.gpu_identity(torch.device("cpu")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert at.gpu_identity(torch.device("cuda")) is None  # asks no CUDA driver
    assert at.attention_key("fwd", torch.device("cpu"), torch.bfloat16, 128, True, False, 4096) is None
    assert at.decode_key(torch.device("cpu"), torch.bfloat16, 128, 4, 1, 1, 4096) is None


def test_float32_and_untuned_head_dims_have_no_candidates():
    assert at.candidates("fwd", 128, torch.float32) == [] and at.candidates("decode", 128, torch.float32) == []
    assert at.candidates("fwd", 96, torch.bfloat16) == [] and at.candidates("dq", 256, torch.float16) == []
    for gpu in ("hopper", "blackwell", "ampere", "consumer"):
        for role in ("fwd", "dkdv", "dq"):
            for head_dim in (64, 128):
                cands = at.candidates(role, head_dim, torch.bfloat16, gpu)
                assert 1 <= len(cands) <= 4, (gpu, role, head_dim)
                # The static rule keeps none that would be pruned for duplicated work.
                assert [c for c in cands if at.static_reason(role, c)] == [], (gpu, role, head_dim)
    assert len(at.candidates("decode", 64, torch.bfloat16)) == 3


@pytest.mark.parametrize("guard", ["compiling", "capturing"])
def test_nothing_is_tuned_while_capturing_or_compiling(tuner, monkeypatch, guard):
    tuner.gpu()
    tuner.times({"M64 N64 w4 s3": 0.5})
    run = lambda cfg, warmup=False: compiled()  # noqa: E731
    # A key tuned before the capture keeps its choice inside it; a new key gets the default.
    assert at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], run) == alt(64, 64, 4, 3)
    tuner.timed.clear()
    if guard == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert at.choose("fwd", fwd_key(), DEFAULT, [alt(64, 64, 4, 3)], run) == alt(64, 64, 4, 3)
    assert at.choose("fwd", fwd_key(seqlen=16384), DEFAULT, [alt(64, 64, 4, 3)], run) == DEFAULT
    assert tuner.timed == []
    assert fwd_key(seqlen=16384).text not in json.loads(at.cache_path(FAKE_GPU.name).read_text())["entries"]


# ---------------------------------------------------------------------------------------
# the real launchers, through the tuner, under the interpreter


def _fake_timer_running_candidates(tuner, monkeypatch, ms):
    """A fake timer that runs each candidate once (into scratch, under the interpreter)."""
    def fake(call, cfg):
        call()
        tuner.timed.append(at.label(cfg))
        return ms(cfg)
    monkeypatch.setattr(at, "timer", fake)


def _tile_ms(cfg):
    return cfg["BLOCK_N"] / 64 + cfg["BLOCK_M"] / 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; on a GPU test_tuning_on_the_gpu runs")
def test_attention_launchers_tune_through_the_tuner_without_changing_results(tuner, monkeypatch):
    from llama_fast.kernels import flash_attn as fa

    tuner.gpu()
    # Small tiles are "fast" here, so the choice differs from the default for some kernels.
    _fake_timer_running_candidates(tuner, monkeypatch, _tile_ms)
    g = torch.Generator().manual_seed(0)
    b, s, hq, hkv, d = 1, 40, 2, 1, 64
    q, k, v, do = (torch.randn(b, s, h, d, generator=g).to(torch.bfloat16) for h in (hq, hkv, hkv, hq))
    out, lse = fa.attn_fwd(q, k, v, True, d ** -0.5)
    dq, dk, dv = fa.attn_bwd(do, q, k, v, out, lse, True, d ** -0.5)
    records = {r["role"]: r for r in at.history()}
    assert set(records) == {"fwd", "dkdv", "dq"} and all(r["source"] == "tuned" for r in records.values())
    for role, r in records.items():
        assert set(r["ms"]) == {at.label(c) for c in [r["default"]] + [dict(r["default"], **a) for a in
                                                                       at.candidates(role, d, q.dtype, "hopper")]}
        configs = [r["default"]] + [dict(r["default"], **a) for a in at.candidates(role, d, q.dtype, "hopper")]
        best = min(configs, key=_tile_ms)  # the default first: it wins ties
        assert r["config"] == (best if _tile_ms(best) < _tile_ms(r["default"]) * (1 - at.MIN_GAIN) else r["default"])
    assert any(r["config"] != r["default"] for r in records.values())
    # The caller's outputs are those of the chosen configurations, launched once afterwards:
    # forcing the chosen configs as the static ones gives the same bits.
    chosen = {role: r["config"] for role, r in records.items()}
    monkeypatch.setattr(fa, "forward_config", lambda *a, **kw: dict(chosen["fwd"]))
    monkeypatch.setattr(fa, "backward_configs", lambda *a, **kw: (dict(chosen["dkdv"]), dict(chosen["dq"])))
    with at.static_configs():
        out2, lse2 = fa.attn_fwd(q, k, v, True, d ** -0.5)
        grads2 = fa.attn_bwd(do, q, k, v, out2, lse2, True, d ** -0.5)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for got, want in zip((dq, dk, dv), grads2):
        assert torch.equal(got, want)
    # And they agree with the float64 reference, as the static default does.
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().repeat_interleave(2, 2).transpose(1, 2),
        v.double().repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert (out.double() - ref).abs().max() < 2e-2
    # A second call hits the memo: nothing is timed.
    tuner.timed.clear()
    fa.attn_fwd(q, k, v, True, d ** -0.5)
    assert tuner.timed == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; on a GPU test_tuning_on_the_gpu runs")
def test_decode_launcher_tunes_through_the_tuner_without_changing_results(tuner, monkeypatch):
    from llama_fast.kernels import flash_decode as fd

    tuner.gpu()
    _fake_timer_running_candidates(tuner, monkeypatch, lambda cfg: {32: 1.0, 64: 2.0}.get(cfg["BLOCK_N"], 3.0))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 300, 1, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    seqlens = torch.tensor([300, 171], dtype=torch.int32)
    out = fd.decode(q, k, v, seqlens, 0.125, 0)
    (record,) = at.history()
    assert record["role"] == "decode" and record["config"]["BLOCK_N"] == 64  # 32 is not a head-dim-64 candidate
    monkeypatch.setattr(fd, "launch_config", lambda *a: dict(record["config"]))
    with at.static_configs():
        assert torch.equal(out, fd.decode(q, k, v, seqlens, 0.125, 0))


# ---------------------------------------------------------------------------------------
# on a GPU: the real thing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tunes the compiled kernels on a CUDA GPU")
def test_tuning_on_the_gpu(tmp_path, monkeypatch):
    import llama_fast

    monkeypatch.setenv("LLAMA_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLAMA_FAST_AUTOTUNE", "1")
    at.reset()
    torch.manual_seed(0)
    q = torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1024, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)

    def run():
        with llama_fast.backend("triton"):
            out = llama_fast.flash_attn(q, k, v, causal=True)
            return (out, *torch.autograd.grad(out, (q, k, v), do))

    with at.static_configs():
        static = run()
    tuned = run()
    roles = {r["role"]: r for r in at.history()}
    assert set(roles) == {"fwd", "dkdv", "dq"} and all(r["source"] == "tuned" for r in roles.values()), at.history()
    for r in roles.values():
        assert r["ms"], r  # the default at least was timed
    for got, want in zip(tuned, static):
        assert torch.isfinite(got).all()
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    doc = json.loads(at.cache_path(torch.cuda.get_device_name()).read_text())
    assert {k.split()[0] for k in doc["entries"]} == {"fwd", "dkdv", "dq"}
    # A fresh memo reads the file: nothing is timed and the results are the same bits.
    at.reset()
    monkeypatch.setattr(at, "timer", lambda call, cfg: pytest.fail("timed on a cache hit"))
    again = run()
    for got, want in zip(again, tuned):
        assert torch.equal(got, want)
    # Decode: tuned eagerly, then captured in a CUDA graph from the cache.
    monkeypatch.setattr(at, "timer", at.cuda_timer)
    kc, vc = (torch.randn(2, 4096, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qd = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([4096, 1000], device="cuda", dtype=torch.int32)
    with llama_fast.backend("triton"):
        eager = llama_fast.flash_decode(qd, kc, vc, lens)
        assert [r["source"] for r in at.history() if r["role"] == "decode"] == ["tuned"]
        monkeypatch.setattr(at, "timer", lambda call, cfg: pytest.fail("timed during capture"))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = llama_fast.flash_decode(qd, kc, vc, lens)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured, eager)
