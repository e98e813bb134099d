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
        assert c["fallbacks"] == {"cross-attention (S_q != S_kv)": c["calls"] // 2}
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


def test_probe_measures_the_kernel_error_and_restores():
    from fastattn.attention.runtime import AttentionRuntime
    from fastattn.masks import TokenLayout
    from fastattn.plans.methods import BandConfig
    from fastattn.plans.schema import AttentionPlan

    layout = TokenLayout.video(2, 4, 4)
    rt = AttentionRuntime(AttentionPlan(method=BandConfig(window=4), block_size=BS), num_layers=2)
    original = rt.sparse_fn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    rt.begin_forward(layout, 500.0)
    plain = rt.attend(q, k, v)
    rt.end_forward()
    probe = AttentionErrorProbe([rt], layers=None, rows=None)
    with probe:
        rt.begin_forward(layout, 400.0)
        probed = rt.attend(q, k, v)
        rt.end_forward()
    assert rt.sparse_fn is original
    assert torch.equal(plain, probed)  # the probe never changes what the model gets
    exact = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    want = float((probed.transpose(1, 2) - exact).norm() / exact.norm())
    (rec,) = probe.records
    assert rec["step"] == 1 and rec["layer"] == 0 and rec["block_density"] < 1
    assert rec["rel_l2"] == pytest.approx(want, rel=1e-5) and want > 0.05
    assert probe.summary()["per_step"] == [
        {"step": 1, "mean": rec["rel_l2"], "max": rec["rel_l2"], "calls": 1}
    ]


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
    with pytest.raises(SystemExit, match=r"method 'window3d' takes .*got \['foo'\]"):
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
