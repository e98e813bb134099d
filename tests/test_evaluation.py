"""``fastattn eval`` and ``fastattn.evaluation`` on tiny random-weight Wan pipelines (CPU, no downloads).

A fully loadable pipeline (word-level tokenizer built in memory, tiny UMT5 text encoder, tiny Wan VAE and
transformer) is saved with ``save_pretrained`` and run through the command line entry; a pipeline without
text encoder or VAE runs through the Python API with precomputed prompt embeddings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastattn.evaluation import EvalInputError, evaluate_pipeline, parse_spec, write_report  # noqa: E402
from fastattn.evaluation.cli import add_eval_parser, cmd_eval, main  # noqa: E402
from fastattn.evaluation.probe import AttentionErrorProbe  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "_fa_pipeline_tests", Path(__file__).with_name("test_diffusers_pipeline.py")
)
_pipeline_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_pipeline_tests)

BS = 8  # mask block size for the tiny models (the GPU kernel takes 128; the CPU reference any)
WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "on", "the", "grass"]


def _transformer():
    """The tiny Wan transformer the pipeline tests use (one definition, in test_diffusers_pipeline.py)."""
    return _pipeline_tests._wan_pipe(num_layers=2).transformer


def _full_wan_pipe():
    """WanPipeline with every component, all tiny and built offline."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(WORDS),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )
    ).eval()
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_transformer(),
    )


def _bare_wan_pipe():
    """WanPipeline with only a transformer and a scheduler (latent output, prompt embeddings given)."""
    return _pipeline_tests._wan_pipe(num_layers=2)


def _embeddings(prompt: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 * seed + sum(map(ord, prompt)))
    return {
        "prompt_embeds": torch.randn(1, 12, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 12, 32, generator=g),
    }


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-wan") / "pipe"
    _full_wan_pipe().save_pretrained(str(path))
    return str(path)


def _args(pipe_dir, out, *extra):
    return [
        pipe_dir,
        "--prompts",
        "a red cat",
        "--seeds",
        "0",
        "1",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--num-frames",
        "9",
        "--block-size",
        str(BS),
        "--pipe-arg",
        "max_sequence_length=8",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


# ------------------------------------------------------------------------------------ end to end


def test_cli_end_to_end(pipe_dir, tmp_path, capsys):
    out = tmp_path / "report"
    report = main(
        _args(
            pipe_dir,
            out,
            "--method",
            "dense",
            "--method",
            "window3d,window=[0,1,1]",
            "--preset",
            "balanced,dense_steps=0",
        )
    )
    printed = capsys.readouterr().out
    assert "window3d,window=[0,1,1]" in printed and "report.json" in printed
    data = json.loads((out / "report.json").read_text())  # strict JSON: no NaN / Infinity
    for key in ("torch", "triton", "diffusers", "device", "device_type"):
        assert key in data["env"], key
    assert data["env"]["torch"] == torch.__version__ and data["env"]["diffusers"] == diffusers.__version__
    assert data["pipeline"]["class"] == "WanPipeline" and data["pipeline"]["vae"] is True
    assert data["pipeline"]["transformers"] == [{"class": "WanTransformer3DModel", "family": "wan"}]
    assert data["settings"]["call_args"]["num_frames"] == 9 and data["settings"]["seeds"] == [0, 1]
    assert data["dense"]["time_s"] > 0 and len(data["dense"]["runs"]) == 2
    assert data["dense"]["repeat"]["decoded"]["exact"]  # dense on the CPU is repeatable
    assert [c["label"] for c in data["configs"]] == [
        "dense",
        "window3d,window=[0,1,1]",
        "balanced,dense_steps=0",
    ]

    dense, window, preset = data["configs"]
    # A dense plan is exact: identical latents and frames (infinite PSNR, written as null), zero rel-L2.
    for which in ("latents", "decoded"):
        m = dense["mean"][which]
        assert m["psnr"] is None and m["rel_l2"] == 0.0 and m["exact_runs"] == m["runs"] == 2, m
        assert m["ssim"] == pytest.approx(1.0)
    assert dense["density"] == 1.0 and dense["sparse_calls"] == 0
    assert dense["planned_dense"] == {"method dense": 2 * 2 * 2 * 2}  # seeds x steps x CFG passes x layers
    assert dense["attention_error"]["sampled_calls"] == 0
    assert report["configs"][0]["mean"]["decoded"]["psnr"] == math.inf  # the Python dict keeps inf

    for c in (window, preset):
        for which in ("latents", "decoded"):
            m = c["mean"][which]
            assert m["psnr"] is not None and 10 < m["psnr"] < 200 and m["rel_l2"] > 0, (c["label"], m)
            assert 0 < m["ssim"] < 1 and m["exact_runs"] == 0
        assert c["density"] < 1 and c["sparse_calls"] > 0
        assert c["fallbacks"] == {}  # only self-attention reaches the runtime (no cross-attention fallback)
        assert c["repeatable"] is True  # the probed warm-up run gave the same output as the timed run
        assert c["speedup"] > 0 and c["time_s"] > 0 and c["decode_s"] > 0
        att = c["attention_error"]
        assert [r["step"] for r in att["per_step"]] == [0, 1]
        assert att["mean"] > 0 and att["max"] >= att["mean"] and att["sampled_calls"] > 0
        assert len(c["runs"]) == 2 and {r["seed"] for r in c["runs"]} == {0, 1}
    assert window["plan"][0]["window"] == [0, 1, 1] and window["plan"][0]["block_size"] == BS
    # The preset keeps its own knobs (FP8 attention) and takes the override (no dense steps).
    assert preset["plan"][0]["quant"] == "fp8" and preset["plan"][0]["dense_steps"] == 0
    assert preset["planned_dense"] == {}

    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    html = (out / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html
    for label in ("dense (baseline)", "window3d,window=[0,1,1]", "balanced,dense_steps=0", "inf (exact)"):
        assert label in html, label
    assert data["files"]["png"].endswith("report.png") and data["files"]["plot_skipped"] is None


def test_python_api_precomputed_embeddings_and_no_plot(tmp_path, monkeypatch):
    pipe = _bare_wan_pipe()
    configs = ["dense,quant=int8", {"method": "band", "window": 6, "label": "band6"}, "window3d:0.01"]
    with pytest.warns(UserWarning, match="'window3d:0.01' failed: .*impossible on this layout"):
        report = evaluate_pipeline(
            pipe,
            configs,
            prompts=["p0", "p1"],
            seeds=[3],
            steps=3,
            height=64,
            width=96,
            num_frames=9,
            call_kwargs_fn=_embeddings,
            defaults={"block_size": BS},
            attn_layers=1,  # every second self-attention call of a forward (2 layers)
            attn_rows=20,  # of 72 query rows
            progress=False,
        )
    assert report["pipeline"]["vae"] is False and report["settings"]["call_args"]["output_type"] == "latent"
    int8, band, failed = report["configs"]
    # A configuration that fails at run time (density 0.01 is impossible on 72 tokens) is recorded, not fatal.
    assert "impossible on this layout" in failed["error"] and "Traceback" in failed["traceback"]
    assert band["label"] == "band6" and band["enable"] == {"block_size": BS, "method": "band", "window": 6}
    for c in (int8, band):
        assert c["mean"]["decoded"] is None
        m = c["mean"]["latents"]
        assert math.isfinite(m["psnr"]) and m["rel_l2"] > 0 and m["runs"] == 2
        att = c["attention_error"]
        # 3 steps x 2 CFG passes, one sampled call per forward
        assert [(r["step"], r["calls"]) for r in att["per_step"]] == [(0, 2), (1, 2), (2, 2)]
        assert att["rows_per_call"] == 20 and att["mean"] > 0
    assert int8["density"] == 1.0 and int8["sparse_calls"] > 0  # quantized full mask runs our kernel path
    assert int8["attention_error"]["mean"] < band["attention_error"]["mean"]
    assert not hasattr(pipe, "_fastattn_handle")  # every config disabled again
    assert "_progress_bar_config" not in pipe.__dict__

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    files = write_report(report, tmp_path / "r")
    assert files["png"] is None and "matplotlib" in files["plot_skipped"]
    assert not (tmp_path / "r" / "report.png").exists()
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["files"]["plot_skipped"] == files["plot_skipped"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "plot skipped" in html and "band6" in html and "<img" not in html
    assert "failed: ValueError: window3d: density 0.01 is impossible" in html
    assert "not the GPU kernel" in html  # CPU timings are flagged

    with pytest.raises(ValueError, match="impossible on this layout"):
        evaluate_pipeline(
            pipe, ["window3d:0.01"], ["p0"], steps=1, height=64, width=96, num_frames=9,
            call_kwargs_fn=_embeddings, defaults={"block_size": BS}, progress=False, stop_on_error=True,
        )  # fmt: skip
    assert not hasattr(pipe, "_fastattn_handle")


def test_dynamic_density_is_the_one_handle_stats_reports():
    """Regression: the eval summary read the runtime counters before the device-side work of dynamic masks
    was folded in and reported density 0.0; it now comes from ``handle.stats()``."""
    from fastattn.evaluation.evaluate import _stats_summary

    pipe = _bare_wan_pipe()
    method = dict(method="dynamic", block_size=BS, min_density=0.3, max_density=0.6)
    handle = pipe.enable_fast_attention(**method)
    try:
        with torch.no_grad():
            _pipeline_tests._call(pipe, steps=2)
        summary = _stats_summary(handle)
        want = handle.stats()
    finally:
        handle.disable()
    assert summary["sparse_calls"] > 0 and summary["sparse_calls"] == want["sparse_calls"]
    assert 0 < summary["density"] < 1 and summary["density"] == pytest.approx(want["density"])
    assert summary["fallbacks"] == want["fallbacks"] and summary["calls"] == want["calls"]
    assert "kernel_fallbacks" not in summary  # kernel fallbacks are in "fallbacks", prefixed "kernel:"

    report = evaluate_pipeline(
        pipe, [{**method, "label": "dynamic"}], ["p0"], steps=2, height=64, width=96, num_frames=9,
        call_kwargs_fn=_embeddings, attn_layers=1, attn_rows=20, progress=False, stop_on_error=True,
    )  # fmt: skip
    (dyn,) = report["configs"]
    assert 0 < dyn["density"] < 1 and dyn["sparse_calls"] > 0
    assert dyn["density"] == pytest.approx(dyn["models"][0]["density"])
    assert dyn["attention_error"]["sampled_calls"] > 0


def test_stats_summary_over_two_transformers():
    """Several transformers (Wan 2.2's two experts): counters summed, density weighted by calls (the stats
    give no work totals), each model's stats kept."""
    from types import SimpleNamespace

    from fastattn.evaluation.evaluate import _stats_summary

    def model(calls, sparse, density, fallbacks):
        return {"calls": calls, "sparse_calls": sparse, "density": density, "fallbacks": fallbacks,
                "planned_dense": {"dense_steps": calls - sparse}, "notes": {}, "plan": {"method": "x"}}  # fmt: skip

    models = [model(30, 20, 0.5, {"kernel: head_dim 80": 2}), model(10, 10, 0.3, {"kernel: head_dim 80": 1})]
    summary = _stats_summary(SimpleNamespace(stats=lambda: {"models": models}))
    assert summary["density"] == pytest.approx((0.5 * 30 + 0.3 * 10) / 40)
    assert (summary["calls"], summary["sparse_calls"], summary["dense_calls"]) == (40, 30, 10)
    assert summary["fallbacks"] == {"kernel: head_dim 80": 3} and summary["fallback_calls"] == 3
    assert summary["planned_dense"] == {"dense_steps": 10} and summary["models"] == models


# ------------------------------------------------------------------------------------ probe


class _FakeRuntime:
    """The observer side of :class:`~fastattn.attention.runtime.AttentionRuntime`: ``add_observer`` (returns
    the remover), ``num_layers``, ``plan``; ``serve`` plays one call the method served through the kernel."""

    def __init__(self, num_layers=4, residual=False):
        from types import SimpleNamespace

        self.num_layers = num_layers
        self.plan = SimpleNamespace(residual=residual)
        self.observers = []

    def add_observer(self, fn):
        self.observers.append(fn)
        return lambda: self.observers.remove(fn) if fn in self.observers else None

    def serve(self, ctx, layer, q, k, v, out, scale=None, density=0.5, quant="none"):
        from fastattn.attention.observe import ObservedCall

        call = ObservedCall(ctx, layer, q, k, v, out, scale, density, quant)
        for fn in list(self.observers):
            fn(call)


def _noisy_attention(q, k, v, noise: float, seed: int):
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return exact + noise * torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed))


def test_probe_samples_served_calls_per_forward_fake_runtime():
    from fastattn.attention.context import ForwardContext
    from fastattn.masks import TokenLayout

    layout = TokenLayout.video(2, 4, 4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))
    rt, other = _FakeRuntime(num_layers=4), _FakeRuntime(num_layers=2, residual=True)
    # rt: every 2nd served call of a forward; other: every call
    probe = AttentionErrorProbe([rt, other], layers=2, rows=None)
    with probe:
        probe.install()  # a second install while installed registers nothing more
        assert len(rt.observers) == len(other.observers) == 1
        for step in range(2):
            for branch in range(2):
                ctx = ForwardContext(layout, step, 2, branch)  # one context object per forward
                for layer in (0, 1, 3):  # layer 2 ran dense by plan: never observed
                    out = _noisy_attention(q, k, v, 0.01 * (layer + 1), seed=layer)
                    rt.serve(ctx, layer, q, k, v, out, density=torch.tensor(0.25))
        other.serve(ForwardContext(layout, 5, 6, 0), 1, q, k, v, _noisy_attention(q, k, v, 0.1, 9))
    assert rt.observers == [] and other.observers == []  # removed on exit
    rt.serve(ForwardContext(layout, 3, 4, 0), 0, q, k, v, q)  # not recorded any more

    mine = [r for r in probe.records if r["model"] == 0]
    # Per forward the served calls are layers 0, 1, 3: the 1st and 3rd are sampled.
    assert [(r["step"], r["cfg_branch"], r["layer"]) for r in mine] == [
        (s, b, layer) for s in range(2) for b in range(2) for layer in (0, 3)
    ]
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for r in mine:
        got = _noisy_attention(q, k, v, 0.01 * (r["layer"] + 1), seed=r["layer"])
        assert r["rel_l2"] == pytest.approx(float((got - exact).norm() / exact.norm()), rel=1e-5)
        assert r["block_density"] == 0.25 and r["quant"] == "none"
    (theirs,) = [r for r in probe.records if r["model"] == 1]
    assert (theirs["step"], theirs["layer"]) == (5, 1) and theirs["block_density"] == 0.5
    summary = probe.summary()
    assert [(p["step"], p["calls"]) for p in summary["per_step"]] == [(0, 4), (1, 4), (5, 1)]
    assert summary["sampled_calls"] == 9 and summary["before_residual"] is True
    assert summary["max"] == max(r["rel_l2"] for r in probe.records)


def test_probe_rows_and_new_forward_detection_fake_runtime():
    """Sampled query rows only; the same context object with another (step, CFG branch) is a new forward."""
    from fastattn.attention.context import ForwardContext
    from fastattn.masks import TokenLayout

    layout = TokenLayout.video(2, 4, 4)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))
    out = _noisy_attention(q, k, v, 0.05, seed=3)
    rt = _FakeRuntime(num_layers=4)
    probe = AttentionErrorProbe([rt], layers=1, rows=8)
    with probe:
        ctx = ForwardContext(layout, 0, 2, 0)
        for layer in range(4):
            rt.serve(ctx, layer, q, k, v, out, scale=0.5)
        rt.serve(ForwardContext(layout, 0, 2, 0), 0, q, k, v, out, scale=0.5)  # equal, but a new forward
    assert [r["layer"] for r in probe.records] == [0, 0]
    rows = torch.linspace(0, layout.seq_len - 1, 8).round().long().unique()
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)[:, :, rows]
    want = float((out[:, :, rows] - exact).norm() / exact.norm())
    assert probe.records[0]["rel_l2"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="layers"):
        AttentionErrorProbe([rt], layers=0)


def test_probe_with_the_real_runtime():
    """REAL runtime + probe (the runtime's observer interface, not a fake): the testbed DiT through
    ``fastattn.testbed.fast.enable``. The probe records the sampled served calls with their step and layer,
    never changes the output, and unregisters on exit."""
    from fastattn.testbed.fast import enable
    from fastattn.testbed.model import TestbedConfig, TestbedDiT
    from fastattn.testbed.sample import sample

    torch.manual_seed(0)
    model = TestbedDiT(TestbedConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    depth = len(model.blocks)
    kw = dict(frames=2, size=32, num_steps=3, seed=3)
    handle = enable(model, method="band", window=2, block_size=16, dense_steps=1)
    try:
        plain = sample(model, [1], **kw)
        probe = AttentionErrorProbe([handle.runtime], layers=None, rows=None)
        with probe:
            probed = sample(model, [1], **kw)
        after = sample(model, [1], **kw)
        stats = handle.stats()
    finally:
        handle.disable()
    assert torch.equal(plain, probed) and torch.equal(plain, after)  # the probe never changes the output
    assert getattr(handle.runtime, "_observers", []) == []
    # dense_steps=1: step 0 runs dense by plan (never observed); steps 1 and 2 every layer
    assert [(r["step"], r["layer"]) for r in probe.records] == [(s, i) for s in (1, 2) for i in range(depth)]
    assert all(0 < r["block_density"] < 1 and r["rel_l2"] > 0 for r in probe.records)
    assert stats["sparse_calls"] == 3 * 2 * depth  # three runs, two sparse steps each
    summary = probe.summary()
    assert [p["step"] for p in summary["per_step"]] == [1, 2] and summary["sampled_calls"] == 2 * depth


# ------------------------------------------------------------------------------------ bad input


def test_bad_paths(tmp_path):
    with pytest.raises(SystemExit, match="no such pipeline folder"):
        main(_args(str(tmp_path / "missing"), tmp_path / "o"))
    with pytest.raises(SystemExit, match="no model_index.json"):
        main(_args(str(tmp_path), tmp_path / "o"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        main(_args(str(tmp_path / "file.txt"), tmp_path / "o"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(SystemExit, match="could not load a diffusers pipeline"):
        main(_args(str(broken), tmp_path / "o"))


def test_bad_configs_and_prompts(pipe_dir, tmp_path):
    with pytest.raises(
        SystemExit, match=r"configuration 'turbo': unknown preset 'turbo'; valid presets here"
    ):
        main(_args(pipe_dir, tmp_path / "o", "--preset", "turbo"))
    with pytest.raises(SystemExit, match=r"unknown method 'sparse9'; valid methods: \['arrow', 'band'"):
        main(_args(pipe_dir, tmp_path / "o", "--method", "sparse9:0.3"))
    with pytest.raises(SystemExit, match="must be a density like 0.3"):
        main(_args(pipe_dir, tmp_path / "o", "--method", "window3d:abc"))
    with pytest.raises(SystemExit, match=r"unknown field\(s\) \['foo'\]; known for method 'window3d'"):
        main(_args(pipe_dir, tmp_path / "o", "--method", "window3d:0.3,foo=1"))
    with pytest.raises(SystemExit, match="takes no argument 'bogus'"):
        main(_args(pipe_dir, tmp_path / "o", "--method", "dense", "--pipe-arg", "bogus=1"))
    argv = _args(pipe_dir, tmp_path / "o", "--method", "dense")
    no_prompts = argv[:1] + argv[3:]
    assert "--prompts" not in no_prompts
    with pytest.raises(SystemExit, match="no prompts"):
        main(no_prompts)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="no prompts"):
        main([*no_prompts, "--prompts-file", str(empty)])
    with pytest.raises(SystemExit, match="no such prompts file"):
        main([*no_prompts, "--prompts-file", str(tmp_path / "nope.txt")])
    with pytest.raises(SystemExit, match="unknown --dtype 'float8'"):
        main([*argv, "--dtype", "float8"])
    assert not (tmp_path / "o").exists()  # nothing ran, nothing written


def test_python_api_errors():
    pipe = _bare_wan_pipe()
    kw = dict(call_kwargs_fn=_embeddings, progress=False)
    with pytest.raises(EvalInputError, match="no prompts"):
        evaluate_pipeline(pipe, ["dense"], [], **kw)
    with pytest.raises(EvalInputError, match="no configurations"):
        evaluate_pipeline(pipe, [], ["a"], **kw)
    with pytest.raises(EvalInputError, match="no seeds"):
        evaluate_pipeline(pipe, ["dense"], ["a"], seeds=[], **kw)
    with pytest.raises(EvalInputError, match="valid presets here"):
        evaluate_pipeline(pipe, ["wan/turbo"], ["a"], **kw)
    with pytest.raises(EvalInputError, match="attn_layers"):
        evaluate_pipeline(pipe, ["dense"], ["a"], attn_layers=-1, **kw)
    handle = pipe.enable_fast_attention(method="dense")
    with pytest.raises(EvalInputError, match="already enabled"):
        evaluate_pipeline(pipe, ["dense"], ["a"], **kw)
    handle.disable()


# ------------------------------------------------------------------------------------ parsing


def test_parse_spec():
    c = parse_spec("window3d:0.3,quant=int8-fp8,dense_layers=[0,-1],dense_steps=2")
    assert c.label == "window3d:0.3,quant=int8-fp8,dense_layers=[0,-1],dense_steps=2"
    assert c.enable_kwargs == {
        "method": "window3d",
        "density": 0.3,
        "quant": "int8-fp8",
        "dense_layers": (0, -1),
        "dense_steps": 2,
    }
    assert parse_spec("balanced").enable_kwargs == {"preset": "balanced"}
    assert parse_spec("wan/fast,quant=none").enable_kwargs == {"preset": "wan/fast", "quant": "none"}
    assert parse_spec("Dense").enable_kwargs == {"method": "dense"}
    assert parse_spec("dense", kind="preset").enable_kwargs == {"preset": "dense"}  # forced kind
    assert parse_spec("window3d,window=(1,4,4)").enable_kwargs == {"method": "window3d", "window": (1, 4, 4)}
    assert parse_spec("dynamic,top_p=0.9").with_defaults({"block_size": 8, "top_p": 0.5}).enable_kwargs == {
        "block_size": 8,
        "method": "dynamic",
        "top_p": 0.9,
    }
    for bad, msg in (
        ("", "empty"),
        (":0.3", "names no"),
        ("band,7", "key=value"),
        ("band,method=x", "first"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def test_add_eval_parser():
    import argparse

    ap = argparse.ArgumentParser(prog="fastattn")
    sub = ap.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    args = ap.parse_args(
        [
            "eval",
            "some/dir",
            "--preset",
            "fast",
            "--method",
            "window3d:0.3",
            "--preset",
            "safe",
            "--prompts",
            "a",
            "b",
            "--seeds",
            "1",
            "2",
            "--dense-layers",
            "0,-1",
            "--pipe-arg",
            "guidance_scale=4",
        ]
    )
    assert args.func is cmd_eval and args.pipeline == "some/dir"
    assert args.configs == [("preset", "fast"), ("method", "window3d:0.3"), ("preset", "safe")]
    assert args.prompts == ["a", "b"] and args.seeds == [1, 2] and args.dense_layers == (0, -1)
    assert args.pipe_arg == [("guidance_scale", 4)] and args.attn_layers == 4 and args.out == "fastattn-eval"
