"""Plan files (plan.json + plan.safetensors): round trips, fingerprints, shipped presets, the ``preset`` CLI, and
hostile files -- each refused with a PlanFileError naming the file before anything is returned."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from fastattn.cli import main
from fastattn.masks.layout import TokenLayout
from fastattn.plans import (
    ArrowConfig,
    AttentionPlan,
    BandConfig,
    HeadTable,
    MultiDiagonalConfig,
    RadialConfig,
    SkipConfig,
    StripesConfig,
    Window3DConfig,
    make_plan,
)
from fastattn.plans.build import export_structural_presets
from fastattn.plans.files import (
    MAX_JSON_BYTES,
    PLAN_JSON,
    PLAN_TENSORS,
    PlanFileError,
    PlanMismatchError,
    check_fingerprint,
    load_plan,
    save_plan,
    shipped_plans,
)
from fastattn.plans.hub import parse_hf_address
from fastattn.plans.meta import ModelFingerprint, PlanMeta
from fastattn.presets import PRESET_DIR, structural_presets

G, L, H = 2, 4, 3
FP = ModelFingerprint("wan", "WanTransformer3DModel", L, H, 128)
LAYOUT = TokenLayout.video(3, 4, 4)


def table_plan() -> AttentionPlan:
    """A plan whose head table mixes methods, axis orders, bit-widths and reuse over 2 step groups."""
    g = torch.Generator().manual_seed(0)
    methods = (Window3DConfig(window=(1, 2, 2)), RadialConfig(window=(2, 2)), SkipConfig(), ArrowConfig(factor=4),
               StripesConfig(key_ranges=((0.0, 0.1), (0.5, 0.6))), MultiDiagonalConfig(window=8, frame_offsets=(-1, 0, 1)))  # fmt: skip
    heads = HeadTable(
        methods,
        torch.randint(0, len(methods), (G, L, H), generator=g, dtype=torch.int16),
        step_bounds=(0.0, 0.3, 1.0),
        order_index=torch.randint(0, 6, (G, L, H), generator=g, dtype=torch.int8),
        quant_index=torch.randint(-1, 6, (G, L, H), generator=g, dtype=torch.int32),
        reuse=torch.rand(G, L, H, generator=g) > 0.5,
    )
    return make_plan("wan", "balanced", dense_layers=[0, -1]).replace(heads=heads)


def meta(**kw) -> PlanMeta:
    base = dict(model=FP, layout=LAYOUT, steps=50, creator="test", creator_params={"budget": 0.05, "prompts": ["a"]},
                density=0.3, bits=8, doc="test plan")  # fmt: skip
    return PlanMeta(**{**base, **kw})


@pytest.fixture
def saved(tmp_path):
    return save_plan(table_plan(), tmp_path / "plan", meta())


def read(d):
    return json.loads((d / PLAN_JSON).read_text()), (d / PLAN_TENSORS).read_bytes()


def rewrite(d, header=None, blob=None, fix_sha=True):
    """Write a (hostile) header and/or tensor file into plan dir ``d``; keep the sha consistent by default so
    the check under test is reached."""
    h, b = read(d)
    h = h if header is None else header
    b = b if blob is None else blob
    if fix_sha and isinstance(h, dict) and isinstance(h.get("meta"), dict):
        h["meta"]["tensors_sha256"] = hashlib.sha256(b).hexdigest()
    (d / PLAN_JSON).write_text(json.dumps(h))
    (d / PLAN_TENSORS).write_bytes(b)


def st_bytes(header: dict, data: bytes) -> bytes:
    """A raw safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def refused(d, *patterns):
    with pytest.raises(PlanFileError) as e:
        load_plan(d)
    msg = str(e.value)
    assert str(d) in msg or "plan." in msg, msg  # names the file
    for p in patterns:
        assert p in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- round trips


def test_table_plan_round_trips(saved):
    plan = table_plan()
    loaded = load_plan(saved)
    assert loaded.plan.to_dict() == plan.to_dict() and loaded.adapted == [] and loaded.commit is None
    got, want = loaded.plan.heads, plan.heads
    assert got.methods == want.methods and got.step_bounds == want.step_bounds
    for name, t in want.tensors().items():
        assert got.tensors()[name].dtype == t.dtype and torch.equal(got.tensors()[name], t)
    assert loaded.meta == meta(tensors_sha256=hashlib.sha256((saved / PLAN_TENSORS).read_bytes()).hexdigest())
    assert AttentionPlan.load(saved / PLAN_JSON).to_dict() == plan.to_dict()  # the plan.json path works too


def test_structural_plan_round_trips_without_tensor_file(tmp_path):
    plan = make_plan("flux", "safe")
    (tmp_path / PLAN_TENSORS).write_bytes(b"stale")
    assert plan.save(tmp_path) == tmp_path
    assert not (tmp_path / PLAN_TENSORS).exists()  # no head table: no tensor file (a stale one is removed)
    assert AttentionPlan.load(tmp_path) == plan and load_plan(tmp_path).meta == PlanMeta()
    header = json.loads((tmp_path / PLAN_JSON).read_text())
    assert header["format"] == "fastattn-plan" and header["format_version"] == 1 and header["heads"] is None


def test_fingerprint_mismatch_says_what_differs(saved):
    assert load_plan(saved, fingerprint=FP).plan is not None
    assert (
        load_plan(saved, fingerprint=ModelFingerprint("wan")).plan is not None
    )  # unknown fields: not compared
    with pytest.raises(PlanMismatchError, match=r"layers: plan 4, model 30; heads: plan 3, model 12") as e:
        load_plan(saved, fingerprint=ModelFingerprint("wan", "WanTransformer3DModel", 30, 12, 128))
    assert "another model" in str(e.value)
    with pytest.raises(
        PlanMismatchError, match=r"family: plan 'wan', model 'flux'.*head_dim: plan 128, model 64"
    ):
        load_plan(saved, fingerprint=ModelFingerprint("flux", None, 4, 3, 64))
    with pytest.raises(ValueError, match="another model"):
        make_plan("flux", str(saved))


def test_layout_change_needs_adapt_for_grid_methods(saved, tmp_path):
    other = TokenLayout.video(3, 8, 8)
    assert load_plan(saved, layout=LAYOUT).adapted == []
    with pytest.raises(PlanMismatchError, match="adapt=True"):
        load_plan(saved, fingerprint=FP, layout=other)
    loaded = load_plan(saved, fingerprint=FP, layout=other, adapt=True)
    assert loaded.adapted and "grid (3, 8, 8)" in loaded.adapted[0] and "grid (3, 4, 4)" in loaded.adapted[0]
    band = save_plan(AttentionPlan(method=BandConfig(window=64)), tmp_path / "band", meta())
    assert load_plan(band, layout=other).adapted == []  # a 1-D band does not follow the grid
    assert check_fingerprint(meta(), None, layout=other, adapt=True)  # without the plan: assume grid-bound


def test_make_plan_takes_plan_directories_and_overrides(saved):
    plan = make_plan("wan", str(saved))
    assert plan.to_dict() == table_plan().to_dict() and plan.heads is not None
    plan = make_plan("wan", str(saved / PLAN_JSON), quant="none", density=0.4)
    assert plan.quant == "none" and plan.method.density == 0.4 and plan.heads is not None
    assert not plan.method.clamp_density


def test_shipped_plan_files_match_the_structural_presets(tmp_path):
    fresh = export_structural_presets(tmp_path)
    shipped = [d for d in shipped_plans() if load_plan(d).meta.creator == "fastattn.presets.structural"]
    assert [p.name for p in shipped] == sorted(p.name for p in fresh)
    assert len(shipped) == sum(len(v) for v in structural_presets().values())
    for d in fresh:
        assert (PRESET_DIR / "plans" / d.name / PLAN_JSON).read_bytes() == (d / PLAN_JSON).read_bytes(), (
            d.name
        )
        assert not (PRESET_DIR / "plans" / d.name / PLAN_TENSORS).exists()
    for d in shipped:
        family, level = d.name.rsplit("-", 1)
        assert make_plan(family, str(d)) == make_plan(family, level)


def test_shipped_calibrated_plans_load_for_their_model():
    """Calibrated plans ship beside the structural ones: each loads, checks its tensors' hash, and validates
    against the model it was calibrated for (a per-head table over every layer and head)."""
    calibrated = [d for d in shipped_plans() if load_plan(d).meta.creator == "fastattn.calibrate"]
    assert calibrated, "presets/plans/ ships at least one calibrated plan"
    for d in calibrated:
        loaded = load_plan(d, fingerprint=load_plan(d).meta.model)
        heads = loaded.plan.heads
        model = loaded.meta.model
        assert heads is not None and tuple(heads.method_index.shape[1:]) == (
            model.num_layers,
            model.num_heads,
        )
        assert 0.0 < loaded.meta.density < 1.0


def test_cli_preset_list_inspect_validate(saved, tmp_path, capsys):
    main(["preset", "list"])
    out = capsys.readouterr().out
    assert "wan/balanced: window3d" in out and "plan file:" in out and "flux-safe" in out
    main(["preset", "inspect", str(saved)])
    info = json.loads(capsys.readouterr().out)
    assert info["plan"]["heads"]["layers"] == L and info["meta"]["model"]["family"] == "wan"
    main(["preset", "validate", str(saved), "--family", "wan", "--layers", str(L)])
    assert "ok:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["preset", "validate", str(saved), "--family", "wan", "--layers", "30"])
    assert e.value.code == 1 and "layers: plan 4, model 30" in capsys.readouterr().err
    (saved / PLAN_JSON).write_bytes(b"\xff\xfe")
    with pytest.raises(SystemExit):
        main(["preset", "validate", str(saved)])
    assert "not UTF-8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- hostile plan.json


def test_pickle_header_is_refused(saved):
    (saved / PLAN_JSON).write_bytes(b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.")
    refused(saved, "pickle")


def test_zip_header_is_refused(saved):
    (saved / PLAN_JSON).write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    refused(saved, "zip archive")


def test_non_utf8_header_is_refused(saved):
    (saved / PLAN_JSON).write_bytes('{"format": "fastattn-plan", "doc": "caf\xe9"}'.encode("latin-1"))
    refused(saved, "not UTF-8")


def test_non_json_header_is_refused(saved):
    (saved / PLAN_JSON).write_text("method = window3d\n")
    refused(saved, "not valid JSON")


def test_header_that_is_not_an_object_is_refused(saved):
    (saved / PLAN_JSON).write_text("[1, 2, 3]")
    refused(saved, "expected a JSON object")


def test_unknown_format_version_is_refused(saved):
    h, _ = read(saved)
    rewrite(saved, {**h, "format_version": 3})
    refused(saved, "format_version 3", "reads (1, 2)")


def test_wrong_format_name_is_refused(saved):
    h, _ = read(saved)
    rewrite(saved, {**h, "format": "someone-elses-plan"})
    refused(saved, "expected 'fastattn-plan'")


def test_unknown_header_field_is_refused(saved):
    h, _ = read(saved)
    rewrite(saved, {**h, "code": "import os"})
    refused(saved, "unknown field(s) ['code']")


def test_unknown_plan_setting_is_refused(saved):
    h, _ = read(saved)
    h["plan"]["turbo"] = True
    rewrite(saved, h)
    refused(saved, "unknown field(s) ['turbo']", "known for method 'window3d'")


def test_bad_plan_value_is_refused(saved):
    h, _ = read(saved)
    h["plan"]["quant"] = "int3"
    rewrite(saved, h)
    refused(saved, "unknown quant 'int3'")


def test_unknown_meta_field_is_refused(saved):
    h, _ = read(saved)
    h["meta"]["model"]["evil"] = 1
    rewrite(saved, h)
    refused(saved, "meta.model", "unknown field(s) ['evil']")


def test_nan_in_header_is_refused(saved):
    text = (saved / PLAN_JSON).read_text().replace('"density": 0.2', '"density": NaN')
    (saved / PLAN_JSON).write_text(text)
    refused(saved, "NaN")


def test_duplicate_keys_are_refused(saved):
    text = (saved / PLAN_JSON).read_text().replace('"quant": "fp8"', '"quant": "fp8", "quant": "none"')
    (saved / PLAN_JSON).write_text(text)
    refused(saved, "duplicate key(s) ['quant']")


def test_deeply_nested_header_is_refused(saved):
    h, _ = read(saved)
    h["meta"]["creator_params"] = {"a": json.loads("[" * 20 + "]" * 20)}  # parses, but too deep
    (saved / PLAN_JSON).write_text(json.dumps(h))
    refused(saved, "nested too deeply")
    (saved / PLAN_JSON).write_text("[" * 200_000 + "]" * 200_000)  # RecursionError in the JSON parser
    refused(saved, "nested too deeply")


def test_huge_header_is_refused(saved):
    h, _ = read(saved)
    h["meta"]["doc"] = "x" * MAX_JSON_BYTES
    rewrite(saved, h)
    refused(saved, "more than a plan.json header may hold")


def test_header_that_is_not_a_regular_file_is_refused(tmp_path, saved):
    (tmp_path / PLAN_JSON).mkdir()
    with pytest.raises(PlanFileError, match="not a regular file"):
        load_plan(tmp_path)
    (saved / PLAN_TENSORS).unlink()
    os.mkfifo(saved / PLAN_TENSORS)  # reading a FIFO would block: refused from its stat
    refused(saved, "plan.safetensors: not a regular file")


def test_other_file_names_are_refused(tmp_path):
    (tmp_path / "plan.pt").write_bytes(b"\x80\x04")
    with pytest.raises(PlanFileError, match="expected a plan directory, its plan.json"):
        load_plan(tmp_path / "plan.pt")
    with pytest.raises(PlanFileError, match="no plan.json in this directory"):
        load_plan(tmp_path)


def test_unknown_palette_method_is_refused(saved):
    h, _ = read(saved)
    h["heads"]["methods"][1] = {"method": "evil", "payload": "rm -rf"}
    rewrite(saved, h)
    refused(saved, "heads.methods[1]", "unknown method 'evil'")


def test_dynamic_method_in_palette_is_refused(saved):
    h, _ = read(saved)
    h["heads"]["methods"][0] = {"method": "dynamic"}
    rewrite(saved, h)
    refused(saved, "per-head tables take structural methods")


def test_bad_step_bounds_are_refused(saved):
    h, _ = read(saved)
    h["heads"]["step_bounds"] = [0.0, 0.7, 0.3]
    rewrite(saved, h)
    refused(saved, "step_bounds must be 3 increasing fractions")


def test_table_that_does_not_fit_its_own_meta_is_refused(saved):
    h, _ = read(saved)
    h["meta"]["model"]["num_layers"] = 40
    rewrite(saved, h)
    refused(saved, "does not fit its own meta.model", "covers 4 layers, the model has 40")


# ------------------------------------------------------------------------------ hostile plan.safetensors


def test_tampered_tensor_file_is_refused(saved):
    _, blob = read(saved)
    rewrite(saved, blob=blob[:-1] + bytes([blob[-1] ^ 1]), fix_sha=False)
    refused(saved, "does not match meta.tensors_sha256")


def test_missing_tensor_file_is_refused(saved):
    (saved / PLAN_TENSORS).unlink()
    refused(saved, "plan.safetensors: missing")


def test_missing_sha_is_refused(saved):
    h, _ = read(saved)
    h["meta"]["tensors_sha256"] = None
    rewrite(saved, h, fix_sha=False)
    refused(saved, "needs meta.tensors_sha256")


def test_truncated_tensor_file_is_refused(saved):
    _, blob = read(saved)
    rewrite(saved, blob=blob[: len(blob) // 2])
    refused(saved, "truncated")


def test_tiny_tensor_file_is_refused(saved):
    rewrite(saved, blob=b"\x01\x02")
    refused(saved, "truncated")


def test_huge_declared_header_is_refused(saved):
    rewrite(saved, blob=struct.pack("<Q", 1 << 60) + b"{}")
    refused(saved, "declares a 1152921504606846976-byte header")


def test_huge_declared_dimensions_are_refused_before_allocating(saved):
    big = 1 << 20
    hdr = {"method_index": {"dtype": "I64", "shape": [big, big, big], "data_offsets": [0, 8 * big**3]}}
    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index"]
    rewrite(saved, h, st_bytes(hdr, b"\x00" * 8))
    refused(saved, "expected [groups, layers, heads] each in 1..")


def test_offsets_past_the_data_are_refused(saved):
    hdr = {"method_index": {"dtype": "I16", "shape": [G, L, H], "data_offsets": [0, 2 * G * L * H]}}
    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index"]
    rewrite(saved, h, st_bytes(hdr, b"\x00" * 4))
    refused(saved, "data_offsets", "truncated or corrupt")


def test_float_method_index_is_refused(saved):
    t = torch.zeros(G, L, H).numpy().tobytes()
    hdr = {"method_index": {"dtype": "F32", "shape": [G, L, H], "data_offsets": [0, len(t)]}}
    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index"]
    rewrite(saved, h, st_bytes(hdr, t))
    refused(saved, "dtype 'F32'", "expected one of")


def test_nan_float_tensor_is_refused(saved):
    from safetensors.torch import save

    h, _ = read(saved)
    tensors = {
        "method_index": torch.zeros(G, L, H, dtype=torch.int16),
        "reuse": torch.full((G, L, H), float("nan")),
    }
    h["heads"]["tensors"] = ["method_index", "reuse"]
    rewrite(saved, h, save(tensors))
    refused(saved, "tensor 'reuse' has dtype 'F32'", "['BOOL']")


def test_wrong_shape_is_refused(saved):
    from safetensors.torch import save

    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index"]
    rewrite(saved, h, save({"method_index": torch.zeros(L, H, dtype=torch.int16)}))
    refused(saved, "has shape [4, 3], expected [groups, layers, heads]")


def test_mismatched_shapes_are_refused(saved):
    from safetensors.torch import save

    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index", "order_index"]
    tensors = {"method_index": torch.zeros(G, L, H, dtype=torch.int16),
               "order_index": torch.zeros(G, L, H + 1, dtype=torch.int8)}  # fmt: skip
    rewrite(saved, h, save(tensors))
    refused(saved, "heads.order_index has shape (2, 4, 4), method_index has (2, 4, 3)")


def test_negative_index_is_refused(saved):
    from safetensors.torch import save

    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index"]
    rewrite(saved, h, save({"method_index": torch.full((G, L, H), -1, dtype=torch.int16)}))
    refused(saved, "heads.method_index holds values outside [0, 5]")


def test_out_of_range_order_index_is_refused(saved):
    from safetensors.torch import save

    h, _ = read(saved)
    h["heads"]["tensors"] = ["method_index", "order_index"]
    tensors = {"method_index": torch.zeros(G, L, H, dtype=torch.int16),
               "order_index": torch.full((G, L, H), 7, dtype=torch.int8)}  # fmt: skip
    rewrite(saved, h, save(tensors))
    refused(saved, "heads.order_index holds values outside [0, 5]")


def test_unlisted_tensor_names_are_refused(saved):
    from safetensors.torch import save

    _, blob = read(saved)
    tensors = {
        "method_index": torch.zeros(G, L, H, dtype=torch.int16),
        "../../evil": torch.zeros(1, dtype=torch.int8),
    }
    rewrite(saved, blob=save(tensors))
    refused(saved, "holds tensors ['../../evil', 'method_index']")


def test_tensor_file_that_is_json_is_refused(saved):
    rewrite(saved, blob=b'{"method_index": [0, 1, 2]}')
    refused(saved, "not a safetensors file")


def test_sha_without_table_is_refused(saved):
    h, _ = read(saved)
    h["heads"] = None
    rewrite(saved, h)
    refused(saved, "heads is null")


# ----------------------------------------------------------------------------------------- hf:// addresses


def test_hf_addresses_parse_strictly():
    a = parse_hf_address("hf://org/repo/plans/wan-14b@v1.2")
    assert (a.repo_id, a.subdir, a.revision) == ("org/repo", "plans/wan-14b", "v1.2")
    assert str(a) == "hf://org/repo/plans/wan-14b@v1.2"
    assert parse_hf_address("hf://org/repo@refs/pr/1").revision == "refs/pr/1"
    bad = ["hf://org/repo/../x", "hf://org/repo/a/./b", "hf:///etc/passwd", "hf://org/repo/a\\b", "hf://repo",
           "hf://org/repo//x", "hf://org/repo/x/", "hf://org/repo/%2e%2e/x", "hf://org/repo/.hidden",
           "hf://org/repo@../../x", "hf://org/re po", "hf://../repo", "hf://org/..", "https://org/repo",
           "hf://org/repo@", "hf://org/repo/x\x00y", "hf://C:/repo", "hf://org/repo/ünï"]  # fmt: skip
    for address in bad:
        with pytest.raises(ValueError):
            parse_hf_address(address)
