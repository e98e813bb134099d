"""Plans on the Hub, through the real huggingface_hub client against a local Hub (tests/hub_server.py):
download, revision pinning, missing repo / file, corrupt file, offline from cache, push + pull, make_plan."""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
import torch
from fastattn.cli import main
from fastattn.plans import HeadTable, SkipConfig, Window3DConfig, make_plan
from fastattn.plans.files import PLAN_JSON, PLAN_TENSORS, PlanFileError, load_plan, save_plan
from fastattn.plans.hub import PlanHubError, push_plan
from fastattn.plans.meta import ModelFingerprint, PlanMeta

_spec = importlib.util.spec_from_file_location(
    "fastattn_test_hub_server", Path(__file__).with_name("hub_server.py")
)
hub_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hub_server)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub; huggingface_hub pointed at it (HF_ENDPOINT and the constants it copied at import),
    with its own cache, no xet, a fake token and online mode."""
    from huggingface_hub import constants

    server = hub_server.HubServer().start()
    cache = str(tmp_path / "hf-cache")
    for k, v in {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": cache, "HF_HUB_DISABLE_XET": "1",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_test_token"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    yield server
    server.stop()


FP = ModelFingerprint("wan", "WanTransformer3DModel", 3, 2, 64)


def table_plan(quant="fp8"):
    heads = HeadTable((Window3DConfig(window=(1, 1, 1)), SkipConfig()), torch.tensor([[[0, 1], [1, 0], [0, 0]]]),
                      reuse=torch.tensor([[[False, True], [False, False], [True, False]]]))  # fmt: skip
    return make_plan("wan", "balanced", quant=quant).replace(heads=heads)


def seed(hub, repo, plan, subdir="", **meta_kw) -> str:
    """Commit ``plan`` into ``repo`` directly on the server; returns the commit id."""
    with tempfile.TemporaryDirectory() as tmp:
        save_plan(plan, tmp, PlanMeta(model=FP, **meta_kw))
        prefix = f"{subdir}/" if subdir else ""
        return hub.commit(repo, {prefix + p.name: p.read_bytes() for p in Path(tmp).iterdir()})


def same(a, b) -> bool:
    if a.to_dict() != b.to_dict() or (a.heads is None) != (b.heads is None):
        return False
    return a.heads is None or all(torch.equal(a.heads.tensors()[k], v) for k, v in b.heads.tensors().items())


def test_download_a_plan(hub):
    commit = seed(hub, "org/plans", table_plan(), subdir="wan/1.3b")
    loaded = load_plan("hf://org/plans/wan/1.3b", fingerprint=FP)
    assert same(loaded.plan, table_plan()) and loaded.commit == commit
    assert loaded.meta.model == FP
    fetched = [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]
    assert fetched == [
        "/org/plans/resolve/main/wan/1.3b/plan.json",
        f"/org/plans/resolve/{commit}/wan/1.3b/plan.safetensors",
    ]


def test_revision_pinning(hub):
    first = seed(hub, "org/plans", table_plan("fp8"))
    second = seed(hub, "org/plans", make_plan("wan", "fast"))
    assert first != second
    assert load_plan("hf://org/plans").plan == make_plan("wan", "fast")
    pinned = load_plan(f"hf://org/plans@{first}")
    assert same(pinned.plan, table_plan("fp8")) and pinned.commit == first
    with pytest.raises(PlanHubError, match="has no revision 'v9'"):
        load_plan("hf://org/plans@v9")


def test_missing_repo_and_missing_file(hub):
    with pytest.raises(PlanHubError, match=r"hf://org/nope: no model repo 'org/nope'"):
        load_plan("hf://org/nope")
    seed(hub, "org/plans", make_plan("wan", "fast"), subdir="a")
    with pytest.raises(PlanHubError, match=r"hf://org/plans/b: org/plans@main has no b/plan.json"):
        load_plan("hf://org/plans/b")


def test_corrupt_tensor_file_on_the_server(hub):
    commit = seed(hub, "org/plans", table_plan())
    blob = bytearray(hub.repos["org/plans"].commits[commit][PLAN_TENSORS])
    blob[-1] ^= 1
    hub.corrupt("org/plans", PLAN_TENSORS, bytes(blob))
    with pytest.raises(
        PlanFileError, match=rf"hf://org/plans@{commit}: plan.safetensors: sha256 .* does not match"
    ):
        load_plan("hf://org/plans")


def test_offline_mode_reads_the_cache(hub, monkeypatch):
    from huggingface_hub import constants

    commit = seed(hub, "org/plans", table_plan())
    online = load_plan("hf://org/plans")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    for address in ("hf://org/plans", f"hf://org/plans@{commit}"):
        offline = load_plan(address)
        assert same(offline.plan, online.plan) and offline.commit == commit
    assert hub.requests == []  # served from the cache, no request made
    with pytest.raises(
        PlanHubError, match=r"hf://org/other: plan.json is not in the Hub cache .*offline mode is on"
    ):
        load_plan("hf://org/other")


def test_push_then_pull(hub, tmp_path):
    plan = table_plan()
    address = plan.push_to_hub("me/my-plans", "wan-1.3b", meta=PlanMeta(model=FP, creator="test"))
    commit = hub.repos["me/my-plans"].branches["main"]
    assert address == f"hf://me/my-plans/wan-1.3b@{commit}"
    assert set(hub.repos["me/my-plans"].commits[commit]) >= {
        "wan-1.3b/plan.json",
        "wan-1.3b/plan.safetensors",
    }
    loaded = load_plan(address)
    assert same(loaded.plan, plan) and loaded.meta.creator == "test"
    # a structural plan pushed over it removes the stale tensor file; the old commit stays loadable
    push_plan(make_plan("wan", "fast"), "me/my-plans", "wan-1.3b", token="hf_other")
    head = hub.repos["me/my-plans"].commits[hub.repos["me/my-plans"].branches["main"]]
    assert "wan-1.3b/plan.json" in head and "wan-1.3b/plan.safetensors" not in head
    assert load_plan("hf://me/my-plans/wan-1.3b").plan == make_plan("wan", "fast")
    assert same(load_plan(address).plan, plan)


def test_make_plan_and_cli_pull_push(hub, tmp_path, capsys):
    plan = table_plan()
    save_plan(plan, tmp_path / "mine", PlanMeta(model=FP))
    main(["preset", "push", str(tmp_path / "mine"), "org/repo"])
    assert "pushed" in capsys.readouterr().out
    pulled = make_plan("wan", "hf://org/repo")
    assert same(pulled, plan)
    assert make_plan("wan", "hf://org/repo", quant="none").quant == "none"
    with pytest.raises(ValueError, match="family: plan 'wan', model 'flux'"):
        make_plan("flux", "hf://org/repo")
    main(["preset", "pull", "hf://org/repo", "--to", str(tmp_path / "copy")])
    assert "pulled hf://org/repo" in capsys.readouterr().out
    assert (tmp_path / "copy" / PLAN_TENSORS).read_bytes() == (tmp_path / "mine" / PLAN_TENSORS).read_bytes()
    assert json.loads((tmp_path / "copy" / PLAN_JSON).read_text()) == json.loads(
        (tmp_path / "mine" / PLAN_JSON).read_text()
    )
    main(["preset", "validate", "hf://org/repo", "--family", "wan", "--layers", "3"])
    assert "ok: hf://org/repo (commit" in capsys.readouterr().out


def test_oversized_file_on_the_server_is_refused_before_download(hub):
    from fastattn.plans.files import MAX_JSON_BYTES

    hub.commit("org/big", {PLAN_JSON: b" " * (MAX_JSON_BYTES + 1)})
    with pytest.raises(
        PlanFileError, match=r"hf://org/big: plan.json is 1048577 bytes, more than a plan file"
    ):
        load_plan("hf://org/big")
    assert not [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]  # only HEAD was asked


def test_enable_a_real_pipeline_from_the_hub_checks_the_model(hub):
    """pipe.enable_fast_attention(preset="hf://...") runs the pulled per-head plan; a plan made for a model
    with other layers / heads is refused before anything is patched."""
    pytest.importorskip("diffusers")
    import fastattn.api as fa

    spec = importlib.util.spec_from_file_location("_fa_tiny_hub", Path(__file__).with_name("test_diffusers.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model, inputs, _ = tiny.build("wan")  # 2 self-attention layers, 2 heads of 16 channels
    table = HeadTable(
        (Window3DConfig(window=(0, 1, 1)), SkipConfig()), torch.tensor([[[0, 1], [1, 0]]], dtype=torch.int16)
    )
    from fastattn.plans import AttentionPlan

    plan = AttentionPlan(Window3DConfig(window=(1, 1, 1)), block_size=tiny.BS, heads=table)
    fits = ModelFingerprint("wan", "WanTransformer3DModel", num_layers=2, num_heads=2, head_dim=16)
    other = ModelFingerprint("wan", "WanTransformer3DModel", num_layers=40, num_heads=40, head_dim=128)
    for repo, fp, p_ in (("org/wan-plan", fits, plan), ("org/wan14b-plan", other, plan.replace(heads=None))):
        with tempfile.TemporaryDirectory() as tmp:
            save_plan(p_, tmp, PlanMeta(model=fp))
            hub.commit(repo, {p.name: p.read_bytes() for p in Path(tmp).iterdir()})
    good, bad = "hf://org/wan-plan", "hf://org/wan14b-plan"
    before = tiny.snapshot(model)
    with pytest.raises(ValueError, match="another model"):
        fa.enable(model, preset=bad)
    assert tiny.snapshot(model) == before and "_diffusers_hook" not in model.__dict__
    handle = fa.enable(model, preset=good)
    out = tiny.run(model, inputs)
    st = handle.stats()
    assert st["sparse_calls"] == 2 and st["plan"]["heads"]["head_methods"] == {"window3d": 2, "skip": 2}, st
    assert torch.isfinite(out).all()
    handle.disable()
    assert tiny.snapshot(model) == before
