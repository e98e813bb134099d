"""Real-host tests of the diffusion node pack: a real ComfyUI samples tiny random-weight Flux, SD3, Wan 2.1 and
HunyuanVideo checkpoints with and without fastattn's Fast Attention node.

Runs only where ``COMFYUI_DIR`` points at a ComfyUI source checkout (no package ships the core; fetch it into
the ignored ``.comfyui/``). ComfyUI is GPL-3.0 and none of its code is in this repository: it is started from
that checkout in a subprocess (``main.py --cpu``) and driven over HTTP with API-format graphs built from core
nodes only (UNETLoader, CLIPLoader, CLIPTextEncode, ConditioningZeroOut, EmptySD3LatentImage /
EmptyHunyuanLatentVideo, KSampler, SaveLatent) plus the pack's nodes. ``COMFYUI_PYTHON`` is the host's Python
(README, Development). ``FASTATTN_COMFY_CKPT_CACHE`` (optional) is a folder where the checkpoints are written
once and reused (the Flux one is 1 GB; see ``tests/comfy_checkpoints.py``).

The checkpoints are written by ``tests/comfy_checkpoints.py`` in each family's own file layout, so the host's
``UNETLoader`` detects the family from the tensor shapes. Conditioning comes from a random-weight CLIP-L loaded
with ``CLIPLoader(type="sd3")``: a (1, 77, 4096) context and a 2048-wide pooled vector, which all four families
accept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def _load_helper(name: str):
    spec = importlib.util.spec_from_file_location(f"fastattn_test_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ch = _load_helper("comfy_host")
cc = _load_helper("comfy_checkpoints")

COMFYUI_DIR = ch.checkout_or_skip()

from safetensors.torch import load_file  # noqa: E402  (after the skip: only the real-host run needs it)

FAMILIES = list(cc.FAMILIES)
# What the host's loader must make of each file (ComfyUI's supported-model class and config it infers).
EXPECTED = {
    "flux": (
        "FluxSchnell",
        "Flux",
        {"hidden_size": 3072, "num_heads": 24, "depth": 1, "depth_single_blocks": 1},
    ),
    "sd3": ("SD3", "OpenAISignatureMMDITWrapper", {"depth": 2, "in_channels": 16, "adm_in_channels": 2048}),
    "wan": ("WAN21_T2V", "WanModel", {"dim": 256, "num_heads": 2, "num_layers": 2, "ffn_dim": 512}),
    "hunyuan_video": ("HunyuanVideo", "HunyuanVideo", {"hidden_size": 256, "num_heads": 2, "depth": 1}),
}
PACK_MODULE = "custom_nodes.fastattn"
PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A ComfyUI base directory: the pack in custom_nodes/fastattn, the checkpoints in models/."""
    h = ch.make_base(tmp_path_factory.mktemp("comfyui_diffusion"))
    cache = os.environ.get("FASTATTN_COMFY_CKPT_CACHE") or str(tmp_path_factory.getbasetemp() / "checkpoints")
    h["checkpoints"] = cc.install_into_comfy_base(h["base"], cache=cache)
    # Frontend settings for the browser checks: no first-run template browser, no minimap, and no workflow
    # restored from the last page (each check starts from an empty graph).
    settings = os.path.join(h["base"], "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(settings), exist_ok=True)
    with open(settings, "w") as f:
        json.dump(
            {
                "Comfy.TutorialCompleted": True,
                "Comfy.Minimap.Visible": False,
                "Comfy.Workflow.Persist": False,
            },
            f,
        )
    # A second name for each file: the same weights loaded afresh by another UNETLoader (no executor cache).
    for family in FAMILIES:
        src = h["checkpoints"][family]
        copy = os.path.join(os.path.dirname(src), "again_" + os.path.basename(src))
        try:
            os.link(src, copy)
        except OSError:
            shutil.copy2(src, copy)
    return h


@pytest.fixture(scope="module")
def server(host):
    srv = ch.ComfyServer(host)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    status, info = server.get("/object_info")
    assert status == 200
    return info


def graph(
    family: str,
    patch=None,
    *,
    seed: int = 1,
    steps: int = 4,
    cfg: float = 2.0,
    prefix: str = "latents/out",
    unet_name: str | None = None,
    latent: dict | None = None,
) -> dict:
    """UNETLoader [-> patch nodes] -> KSampler -> SaveLatent, conditioning from the random CLIP-L.

    ``patch`` is None (baseline) or a dict of extra nodes ``{id: node}`` whose inputs may use ``"MODEL"`` for
    the loader's output; the KSampler takes the MODEL output of the node with id ``"fa"``.
    """
    spec = cc.FAMILIES[family]
    latent_node, latent_inputs = spec["latent"]
    nodes = {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": unet_name or spec["file"], "weight_dtype": "default"},
        },
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": cc.CLIP_FILE, "type": cc.CLIP_TYPE}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": latent_node, "inputs": dict(latent_inputs, **(latent or {}))},
    }
    model = ["1", 0]
    if patch:
        for node_id, node in patch.items():
            inputs = {k: (["1", 0] if v == "MODEL" else v) for k, v in node["inputs"].items()}
            nodes[node_id] = {"class_type": node["class_type"], "inputs": inputs}
        model = ["fa", 0]
    nodes["6"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    }
    nodes["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}}
    return nodes


def sample(server, g: dict, timeout: float = 300):
    """Runs ``g`` to success and returns the saved latent tensor."""
    entry = server.run(g, timeout=timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"]["messages"], server.log_tail())
    return load_file(server.output_file(entry, "7"))["latent_tensor"]


_baselines: dict = {}


def baseline(server, family: str, **kw):
    key = (family, json.dumps(kw, sort_keys=True))
    if key not in _baselines:
        _baselines[key] = sample(server, graph(family, prefix=f"latents/{family}_base", **kw))
    return _baselines[key]


def expected_latent_shape(family: str, latent: dict | None = None) -> tuple:
    node, inputs = cc.FAMILIES[family]["latent"]
    inputs = dict(inputs, **(latent or {}))
    h, w = inputs["height"] // 8, inputs["width"] // 8
    if node == "EmptyHunyuanLatentVideo":
        return (inputs["batch_size"], 16, (inputs["length"] - 1) // 4 + 1, h, w)
    return (inputs["batch_size"], 16, h, w)


# ---- the checkpoints and the baseline (core nodes only) ----------------------------------------------------


def test_checkpoints_load_as_their_family_with_every_key_used(host):
    loaded = ch.run_probe(host, "load-checkpoints", host["base"])
    for family, (config_cls, model_cls, facts) in EXPECTED.items():
        info = loaded[cc.FAMILIES[family]["file"]]
        assert info is not None, f"{family}: ComfyUI did not recognise the file"
        assert info["model_config"] == config_cls and info["model_class"] == model_cls, (family, info)
        assert info["missing"] == [] and info["unexpected"] == [] and info["shape_mismatch"] == [], (
            family,
            info,
        )
        for k, v in facts.items():
            assert info["unet_config"][k] == v, (family, k, info["unet_config"])


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_samples_with_core_nodes(server, family):
    x = baseline(server, family)
    assert tuple(x.shape) == expected_latent_shape(family)
    assert x.isfinite().all() and x.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_is_deterministic_across_fresh_model_loads(server, family):
    """The bit-for-bit comparisons below are meaningful only if two fresh runs of one graph agree bit for bit."""
    again = sample(
        server,
        graph(family, unet_name="again_" + cc.FAMILIES[family]["file"], prefix=f"latents/{family}_again"),
    )
    assert again.equal(baseline(server, family))


def test_different_seeds_give_different_latents(server):
    assert not sample(server, graph("sd3", seed=2, prefix="latents/sd3_seed2")).equal(baseline(server, "sd3"))


# ---- the pack's nodes ---------------------------------------------------------------------------------------
#
# Node ids and inputs as nodes/comfy_nodes.py registers them (V3 schema, category "fastattn").

APPLY, PLAN, REPORT = "FastAttnApply", "FastAttnPlan", "FastAttnReport"
PACK_NODES = {APPLY, PLAN, REPORT, "FastAttnPromptEnhancer"}
APPLY_DEFAULTS = {
    "preset": "balanced",
    "method": "window3d",
    "density": 0.3,
    "quant": "default",
    "start_percent": 0.0,
    "end_percent": 1.0,
    "dense_blocks": "",
}
DENSE = {"preset": "custom", "method": "dense", "quant": "none"}
# Sparse runs: the family's "fast" preset with nothing kept dense by the node's own inputs (the preset's own
# dense steps and layers still apply: 4 steps leave the last 2 sparse), on latents large enough for several
# 128-token blocks (the tiny defaults have 64-192 image tokens).
SPARSE = {"preset": "fast"}
SPARSE_LATENT = {
    "flux": {"width": 256, "height": 256},  # 16 x 16 = 256 image tokens + 77 text tokens
    "sd3": {"width": 512, "height": 512},  # 32 x 32 = 1024 image tokens
    "wan": {"width": 256, "height": 256, "length": 17},  # 5 x 16 x 16 = 1280 tokens
    "hunyuan_video": {"width": 256, "height": 256, "length": 17},
}
# Steps of the sparse runs: the presets keep the first 1-3 steps dense (Flux 2 of 4 sparse; Wan and HunyuanVideo
# 5 of 8).
SPARSE_STEPS = {"flux": 4, "sd3": 8, "wan": 8, "hunyuan_video": 8}
# Relative L2 distance of the sparse latent to the dense one: above 0 (the sparse path ran) and below this.
SPARSE_REL_TOL = 0.5


def apply_patch(plan: dict | None = None, **inputs) -> dict:
    """Extra nodes for ``graph()``: Fast Attention ("fa") on the loader's MODEL [with a Plan node "plan"]."""
    fa_inputs = dict(APPLY_DEFAULTS, model="MODEL", **inputs)
    nodes = {"fa": {"class_type": APPLY, "inputs": fa_inputs}}
    if plan is not None:
        nodes["plan"] = {"class_type": PLAN, "inputs": {"source": plan.get("source"), "location": ""} | plan}
        fa_inputs["plan"] = ["plan", 0]
    return nodes


def with_report(g: dict) -> dict:
    """``g`` plus a Fast Attention Report node ("rep") that runs after the sampler."""
    g = dict(g)
    g["rep"] = {"class_type": REPORT, "inputs": {"model": ["fa", 0], "after": ["6", 0]}}
    return g


def test_object_info_lists_the_pack_nodes(object_info):
    pack = {k: v for k, v in object_info.items() if v.get("python_module") == PACK_MODULE}
    assert PACK_NODES <= set(pack), sorted(pack)
    for node_id in PACK_NODES:
        assert object_info[node_id]["category"] == "fastattn", node_id
    apply = object_info[APPLY]
    assert apply["display_name"] == "Fast Attention" and apply["output"] == ["MODEL"]
    required = apply["input"]["required"]
    assert required["model"][0] == "MODEL"
    assert set(APPLY_DEFAULTS) <= set(required), sorted(required)
    assert {"safe", "balanced", "fast", "custom"} <= set(required["preset"][1]["options"])
    assert "dense" in required["method"][1]["options"]
    assert apply["input"]["optional"]["plan"][0] == object_info[PLAN]["output"][0]
    plan_sources = object_info[PLAN]["input"]["required"]["source"][1]["options"]
    for family in ("flux", "sd3", "wan", "hunyuan_video"):
        assert {f"{family}-safe", f"{family}-balanced", f"{family}-fast"} <= set(plan_sources), plan_sources
    assert object_info[REPORT]["output"] == ["STRING"]


def run_with_report(server, g: dict):
    """(latent, report text) of ``g`` run with a Fast Attention Report node after the sampler."""
    entry = server.run(with_report(g))
    assert entry["status"]["status_str"] == "success", (entry["status"]["messages"], server.log_tail())
    return load_file(server.output_file(entry, "7"))["latent_tensor"], entry["outputs"]["rep"]["text"][0]


def achieved_density(report: str) -> float:
    m = re.search(r"density achieved: ([0-9.]+)", report)
    assert m, report
    return float(m.group(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_fast_attention_equals_baseline_bit_for_bit(server, family):
    x, report = run_with_report(server, graph(family, apply_patch(**DENSE), prefix=f"latents/{family}_dense"))
    assert f"fastattn on {family} " in report, report  # applied, and the family recognised
    assert x.equal(baseline(server, family)), f"dense Fast Attention changed the latent\n{report}"


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_fast_attention_is_finite_and_close(server, family):
    kw = {"latent": SPARSE_LATENT[family], "steps": SPARSE_STEPS[family]}
    dense = baseline(server, family, **kw)
    x, report = run_with_report(
        server, graph(family, apply_patch(**SPARSE), prefix=f"latents/{family}_sparse", **kw)
    )
    assert x.shape == dense.shape and x.isfinite().all(), report
    rel = float((x - dense).norm() / dense.norm())
    assert achieved_density(report) < 1.0, f"{family}: no attention work was skipped\n{report}"
    assert 0.0 < rel < SPARSE_REL_TOL, f"{family}: relative L2 distance to dense {rel:.4f}\n{report}"


# ---- node errors, and the queue goes on -------------------------------------------------------------------


def assert_node_error(server, g: dict, node_type: str, needle: str) -> str:
    """``g`` is refused at validation or fails at execution in ``node_type``, with ``needle`` in the message;
    then the queue still runs the next prompt. Returns the message."""
    status, resp = server.post_prompt(g)
    if status == 400:  # refused by the validator
        errors = [
            (g[nid]["class_type"], f"{e.get('message', '')} {e.get('details', '')}")
            for nid, ne in resp.get("node_errors", {}).items()
            for e in ne.get("errors", [])
        ]
        assert errors, resp
        kinds, text = {k for k, _ in errors}, " | ".join(m for _, m in errors)
    else:
        assert status == 200, resp
        entry = server.wait(resp["prompt_id"])
        assert entry["status"]["status_str"] == "error", f"the graph ran: {entry['status']}"
        errors = ch.execution_errors(entry)
        assert errors, entry["status"]
        kinds, text = {errors[0]["node_type"]}, errors[0]["exception_message"]
    assert node_type in kinds, f"error from {kinds}, not from {node_type}: {text}"
    assert needle.lower() in text.lower(), f"{needle!r} not in the error: {text}"
    # The queue keeps running: the next prompt succeeds.
    nxt = sample(server, graph("sd3", seed=7, prefix="latents/after_error"))
    assert nxt.isfinite().all()
    return text


def test_invalid_dense_blocks_is_a_node_error(server):
    g = graph("sd3", apply_patch(dense_blocks="0, 3-x, 7"), prefix="latents/bad_blocks")
    text = assert_node_error(server, g, APPLY, "dense_blocks")
    assert "3-x" in text


def test_dense_block_the_model_lacks_is_a_node_error(server):
    g = graph("sd3", apply_patch(dense_blocks="0,40-41"), prefix="latents/missing_block")
    assert_node_error(server, g, APPLY, "dense_blocks")


def test_plan_for_another_family_is_a_node_error(server):
    g = graph("flux", apply_patch(plan={"source": "wan-balanced"}), prefix="latents/wrong_family")
    assert_node_error(server, g, APPLY, "wan")


def test_missing_hub_repo_is_a_node_error(server):
    plan = {"source": "path or hf://", "location": "hf://fastattn-test/no-such-plan-repo"}
    g = graph("sd3", apply_patch(plan=plan), prefix="latents/missing_repo")
    assert_node_error(server, g, PLAN, "no-such-plan-repo")


def test_shipped_plan_for_the_family_runs(server):
    g = graph("sd3", apply_patch(plan={"source": "sd3-safe"}), prefix="latents/sd3_plan")
    assert sample(server, g).isfinite().all()


# ---- the Fast Attention Cache node ---------------------------------------------------------------------------
#
# Block skipping in a real host: ComfyUI's block replacement (patches_replace) drives the cache. On the tiny Wan
# (2 blocks) and Flux (1 double + 1 single) one block is probed and the other is the one skipped.

CACHE = "FastAttnCache"
CACHE_DEFAULTS = {
    "preset": "balanced",
    "blocks": "auto",
    "threshold": 0.1,
    "max_skips": 2,
    "first_steps": 0.1,
    "last_steps": 1,
    "attn_share_interval": 0,
    "cfg_share": False,
    "cache_budget_gb": 0.0,
    "cache_storage": "auto",
    "cache_offload": False,
    "extrapolate": "preset",
}
# Skips for sure at 4 steps: "fixed" skips half the steps between the first one (first_steps 0.1 -> 1 step) and
# the last one (last_steps 1), i.e. step 2, after captures at steps 0 and 1 (two residuals: first order applies).
FIXED = {"preset": "custom", "blocks": "fixed"}
EXTRAPOLATE_CHOICES = ["preset", "off", "first-order"]


def cache_patch(model="MODEL", **inputs) -> dict:
    """Extra nodes for ``graph()``: Fast Attention Cache ("fa") on ``model`` (default: the loader's MODEL)."""
    return {"fa": {"class_type": CACHE, "inputs": dict(CACHE_DEFAULTS, model=model, **inputs)}}


def cache_stats(report: str) -> dict:
    """Blocks skipped, skipped ranges extrapolated and peak cache MiB, from the Report's cache lines."""
    skipped = re.search(r"blocks skipped: (\d+) of \d+ block calls", report)
    extrapolated = re.search(r"skipped ranges extrapolated \(first order\): (\d+);", report)
    peak = re.search(r"cache memory: \S+ MiB now, ([0-9.]+) MiB peak", report)
    assert skipped and extrapolated and peak, report
    return {
        "skipped": int(skipped.group(1)),
        "extrapolated": int(extrapolated.group(1)),
        "peak_mib": float(peak.group(1)),
    }


def test_object_info_lists_the_cache_node_with_extrapolate_last(object_info):
    node = object_info[CACHE]
    assert node["python_module"] == PACK_MODULE and node["category"] == "fastattn"
    assert node["display_name"] == "Fast Attention Cache" and node["output"] == ["MODEL"]
    required = node["input"]["required"]
    # extrapolate last: saved workflows keep their widget values by position
    assert list(required) == ["model", *CACHE_DEFAULTS], list(required)
    for name, default in CACHE_DEFAULTS.items():
        assert required[name][1]["default"] == default, (name, required[name])
    assert required["extrapolate"][1]["options"] == EXTRAPOLATE_CHOICES
    assert "fixed" in required["blocks"][1]["options"] and "off" in required["preset"][1]["options"]


def test_cache_off_equals_baseline_bit_for_bit(server):
    g = graph("wan", cache_patch(preset="off"), prefix="latents/wan_cache_off")
    x, report = run_with_report(server, g)
    assert "fastattn on wan " in report, report
    assert "blocks skipped:" not in report, report  # preset off: no block cache at all
    assert x.equal(baseline(server, "wan")), f"Fast Attention Cache (off) changed the latent\n{report}"


def test_cache_skips_blocks_and_extrapolate_changes_what_they_add(server):
    plain = baseline(server, "wan")
    runs = {}
    for choice in ("off", "first-order"):
        g = graph("wan", cache_patch(**FIXED, extrapolate=choice), prefix=f"latents/wan_cache_{choice}")
        x, report = run_with_report(server, g)
        stats = cache_stats(report)
        assert x.shape == plain.shape and x.isfinite().all(), report
        assert stats["skipped"] > 0 and stats["peak_mib"] > 0, report
        assert (stats["extrapolated"] > 0) == (choice == "first-order"), report
        assert f"extrapolate={choice}" in report, report  # the node's settings line
        assert not x.equal(plain), f"extrapolate {choice}: skipping left the latent unchanged\n{report}"
        runs[choice] = x
    assert not runs["off"].equal(runs["first-order"]), "extrapolate first-order added the same as off"


def test_fast_attention_then_cache_on_flux_reports_sparse_calls_and_skipped_blocks(server):
    patch = {
        "sp": {"class_type": APPLY, "inputs": dict(APPLY_DEFAULTS, model="MODEL", **SPARSE)},
        **cache_patch(model=["sp", 0], **FIXED),
    }
    # cfg 1: ComfyUI runs the positive branch only (half the work of the slowest graph here)
    kw = {"latent": SPARSE_LATENT["flux"], "steps": SPARSE_STEPS["flux"], "cfg": 1.0}
    x, report = run_with_report(server, graph("flux", patch, prefix="latents/flux_sparse_cache", **kw))
    assert x.isfinite().all(), report
    assert "fastattn on flux " in report and "preset=fast" in report, report  # one plan: the sparse node's
    sparse = re.search(r"self-attention calls: \d+: (\d+) sparse", report)
    assert sparse and int(sparse.group(1)) > 0, report
    assert achieved_density(report) < 1.0, report
    stats = cache_stats(report)
    assert stats["skipped"] > 0 and stats["peak_mib"] > 0, report


def test_bad_extrapolate_is_a_node_error_and_the_queue_goes_on(server):
    g = graph("wan", cache_patch(extrapolate="second-order"), prefix="latents/bad_extrapolate")
    text = assert_node_error(server, g, CACHE, str(EXTRAPOLATE_CHOICES))
    assert "second-order" in text, text
    # ComfyUI 0.3.64 leaves a V3 combo's value to the node: the error is the node's own. A host that checks
    # combo values itself refuses the prompt first ("Value not in list", naming the same choices).
    if not text.startswith("Value not in list"):
        assert f"unknown extrapolate 'second-order'; choose one of {EXTRAPOLATE_CHOICES}" in text, text


# ---- a real browser: the host's frontend in headless Chromium ---------------------------------------------
#
# Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium
# (pip install selenium) in this interpreter; skipped otherwise. FASTATTN_SCREENSHOT=PATH saves the graph
# screenshot there (the README's docs/comfyui-graph.png comes from this run).

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WORKFLOWS = sorted((_HERE.parent / "workflows").glob("*.json"))
MISSING_NODES_TITLE = "Some Nodes Are Missing"  # the frontend's dialog title
# Every load reports what the frontend made of the graph: node types it has no class for, and the dialog.
_LOAD_JS = """
const [wf, name, title, done] = arguments;
(async () => {
  if (wf.nodes) await app.loadGraphData(wf, true, true, name); else await app.loadApiJson(wf, name);
  await new Promise((r) => setTimeout(r, 800));
  const nodes = app.graph.nodes || app.graph._nodes;
  done({
    types: nodes.map((n) => n.type),
    missing: nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type),
    dialog: document.body.innerText.includes(title),
  });
})().catch((e) => done({error: String(e)}));
"""
# Where the screenshot's graph puts each node (canvas units).
_LAYOUT = {  # node id: (x, y[, width, height])
    "1": (40, 60),
    "plan": (40, 230),
    "2": (40, 390),
    "5": (40, 580),
    "fa": (380, 60),
    "3": (380, 390, 300, 130),
    "4": (380, 580),
    "6": (720, 60),
    "7": (1060, 60),
    "rep": (1060, 180, 230, 60),
    "prev": (1060, 280, 430, 380),
}


@pytest.fixture(scope="module")
def browser(server):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("browser check: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser check: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = os.path.join(server.host["tmp"], "chromium-profile")
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1600,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def open_frontend(browser, server):
    """A fresh page of the host's frontend, its node definitions loaded, an empty graph."""
    browser.get(server.url)
    browser.execute_script("localStorage.clear(); sessionStorage.clear()")
    browser.get(server.url)
    ready = (
        "return !!(window.app && app.graph && window.LiteGraph && "
        "LiteGraph.registered_node_types['KSampler'] && LiteGraph.registered_node_types[arguments[0]])"
    )
    deadline = time.monotonic() + 90
    while not browser.execute_script(ready, APPLY):
        assert time.monotonic() < deadline, "the frontend did not load the node definitions"
        time.sleep(0.25)
    time.sleep(1.0)  # the default graph and first-run panels settle
    browser.execute_script("app.graph.clear()")


def load_in_frontend(browser, workflow: dict, name: str) -> dict:
    out = browser.execute_async_script(_LOAD_JS, workflow, name, MISSING_NODES_TITLE)
    assert "error" not in out, out
    return out


def test_browser_node_search_finds_the_pack_nodes(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_frontend(browser, server)
    canvas = browser.find_element(By.CSS_SELECTOR, "canvas#graph-canvas")
    ActionChains(browser).move_to_element(canvas).double_click().perform()  # opens the node search box
    deadline = time.monotonic() + 15
    while not (boxes := browser.find_elements(By.CSS_SELECTOR, ".comfy-vue-node-search-container input")):
        assert time.monotonic() < deadline, "double-click on the canvas did not open the node search"
        time.sleep(0.2)
    boxes[0].send_keys("Fast Attention")
    time.sleep(1.0)
    results = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".p-autocomplete-option")]
    names = [r.splitlines()[0].strip() for r in results if r.strip()]
    ours = [n for n, r in zip(names, results) if "fastattn" in r]
    want = {"Fast Attention", "Fast Attention Plan", "Fast Attention Report", "Fast Attention Cache",
            "Fast Attention Text Encoder Cache"}  # fmt: skip
    assert want <= set(ours), results
    assert names[: len(ours)] == ours and names[0] == "Fast Attention", results  # the pack's nodes rank first


def ui_workflow(browser, server, api_graph: dict) -> dict:
    """``api_graph`` as the frontend saves it (UI format: nodes, links, positions), via its API-format import."""
    open_frontend(browser, server)
    out = load_in_frontend(browser, api_graph, "api-import")
    assert not out["missing"] and not out["dialog"], out
    return browser.execute_script("return app.graph.serialize()")


def test_browser_saved_workflow_reloads_without_missing_nodes(server, browser):
    wf = ui_workflow(browser, server, with_report(graph("wan", apply_patch(plan={"source": "wan-safe"}))))
    assert {"FastAttnApply", "FastAttnPlan", "FastAttnReport"} <= {n["type"] for n in wf["nodes"]}
    open_frontend(browser, server)
    out = load_in_frontend(browser, wf, "saved")
    assert not out["missing"] and not out["dialog"], out
    assert sorted(out["types"]) == sorted(n["type"] for n in wf["nodes"])


def test_browser_detects_a_missing_node(server, browser):
    """The check is live: a saved workflow naming a node type the host lacks raises the frontend's dialog."""
    wf = ui_workflow(browser, server, graph("sd3", apply_patch(**DENSE)))
    for node in wf["nodes"]:
        if node["type"] == APPLY:
            node["type"] = "FastAttnNoSuchNode"
    open_frontend(browser, server)
    out = load_in_frontend(browser, wf, "missing-node-check")
    assert out["missing"] == ["FastAttnNoSuchNode"] and out["dialog"], out


@pytest.mark.parametrize("path", WORKFLOWS or [None], ids=[p.name for p in WORKFLOWS] or ["no-workflows"])
def test_browser_example_workflow_loads_without_missing_nodes(server, browser, path):
    if path is None:
        pytest.skip("no workflows/*.json yet")
    workflow = json.loads(path.read_text())
    open_frontend(browser, server)
    out = load_in_frontend(browser, workflow, path.stem)
    assert out["types"], f"{path.name}: no nodes loaded"
    assert not out["missing"] and not out["dialog"], f"{path.name}: missing node types {out['missing']}"
    assert any(t.startswith("FastAttn") for t in out["types"]), f"{path.name} uses no fastattn node"


def test_browser_graph_runs_and_screenshot(server, browser, tmp_path):
    """The Flux graph with Fast Attention, a shipped plan and the report (shown by the core Preview Any node),
    laid out, queued from the page, and photographed after the run."""
    open_frontend(browser, server)
    patch = apply_patch(plan={"source": "flux-balanced"})
    g = with_report(graph("flux", patch, prefix="latents/flux_ui", latent=SPARSE_LATENT["flux"]))
    g["prev"] = {"class_type": "PreviewAny", "inputs": {"source": ["rep", 0]}}
    out = load_in_frontend(browser, g, "fastattn-flux")
    assert not out["missing"] and not out["dialog"], out
    browser.execute_script(
        """
        const layout = arguments[0];
        for (const n of (app.graph.nodes || app.graph._nodes)) {
          const p = layout[String(n.id)];
          if (!p) continue;
          n.pos = [p[0], p[1]];
          if (p.length > 2) n.size = [p[2], p[3]];
        }
        app.canvas.ds.scale = 1.0;
        app.canvas.ds.offset = [30, 10];
        app.graph.setDirtyCanvas(true, true);
        """,
        _LAYOUT,
    )
    _, before = server.get("/history")
    browser.execute_script("app.queuePrompt(0, 1)")  # what the Run button does
    deadline = time.monotonic() + 300
    while True:
        _, hist = server.get("/history")
        new = [v for k, v in hist.items() if k not in before]
        if new and new[0]["status"].get("completed") is not None:
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    assert new[0]["status"]["status_str"] == "success", new[0]["status"]["messages"]
    report = new[0]["outputs"]["rep"]["text"][0]
    assert "fastattn on flux " in report, report
    time.sleep(1.0)  # the page shows the results
    shown = browser.execute_script(
        "const n = app.graph.getNodeById('prev'); return n && n.widgets ? n.widgets.map(w => String(w.value)) : []"
    )
    assert any("fastattn on flux" in w for w in shown), shown
    target = os.environ.get("FASTATTN_SCREENSHOT") or str(tmp_path / "comfyui-graph.png")
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    assert browser.save_screenshot(target)
    assert os.path.getsize(target) > 20_000
