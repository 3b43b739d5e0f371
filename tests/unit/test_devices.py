"""Devices as they are (issue 12 items 1-4): weight formats, the roofline, device profiles,
real-size models, the simulated backend on profiled hosts, bad input, and bench_devices' figures."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.backends.simulated.build import build_simulated_cluster
from testbed.cli import app
from testbed.core.formats import FORMATS, get_format
from testbed.core.snapshot import ModelDims
from testbed.partition.cost import blocks as B
from testbed.partition.cost.latency import decode_cost
from testbed.partition.cost.migration import migration_estimate
from testbed.partition.cost.roofline import block_time_s, matvec_rate, roofline_s
from testbed.run.runner import RunError, run_experiment
from testbed.spec.loader import load_experiment
from testbed.spec.models import SIZE_ONLY, WEIGHTED
from testbed.spec.modelref import resolve_model
from testbed.spec.profiles import PROFILES, get_profile, host_device
from testbed.spec.schema import HostSpec, ModelChoice, TopologySpec

ROOT = Path(__file__).resolve().parents[2]

# published parameter counts (model cards / safetensors index); ours count matrices only, so the
# norms (2 per layer + the final one, D each) and Qwen2.5's Q/K/V biases are added back
PUBLISHED_PARAMS = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-3.2-1b": 1_235_814_400,
                    "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
                    "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384}


def dims_of(name: str, fmt: str = "fp32") -> ModelDims:
    return resolve_model(ModelChoice(name=name, weight_format=fmt)).dims


# ---------------------------------------------------------------- formats and sizes

def test_gguf_block_sizes():
    assert get_format("q8_0").weight_bytes * 32 == 34
    assert get_format("q4_0").weight_bytes * 32 == 18
    assert (get_format("fp16").weight_bytes, get_format("bf16").weight_bytes) == (2, 2)
    with pytest.raises(KeyError, match="unknown weight format 'q3_k'.*fp32, fp16, bf16, q8_0, q4_0"):
        get_format("q3_k")
    with pytest.raises(KeyError, match="unknown weight format"):
        ModelDims("m", 1, 64, 4, 4, 16, 256, 100, weight_format="int3")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_real_models_match_published_parameter_counts(name):
    d = dims_of(name)
    norms = d.n_layers * 2 * d.d_model + d.d_model
    biases = d.n_layers * (d.n_heads + 2 * d.n_kv_heads) * d.head_dim if name.startswith("qwen") else 0
    assert B.total_weight_bytes(d) // 4 + norms + biases == PUBLISHED_PARAMS[name]


def test_block_bytes_follow_the_format():
    f32, q4, q8, f16 = (dims_of("llama-2-7b", f) for f in ("fp32", "q4_0", "q8_0", "fp16"))
    assert B.ffn_bytes(q4) == 3 * 4096 * 11008 * 18 // 32 == 76_087_296
    assert B.ffn_bytes(q8) == 3 * 4096 * 11008 * 34 // 32
    assert B.proj_bytes(f16) * 2 == B.proj_bytes(f32)
    assert B.head_kv_bytes(q4, 100) == 2 * 100 * 128 * 2  # fp16 KV cache under a quantised format
    assert B.hidden_bytes(q4) == 4096 * 34 / 32  # Q8_0 activations, as distributed-llama's q80 buffer
    assert B.source_bytes(q4) == 2 * 32000 * 4096 * 18 // 32  # untied: embedding + LM head
    # the whole Llama-2-7B in Q4_0: 3.79 GB (the GGUF file is 3.83 GB with its fp32 norms and headers)
    assert B.total_weight_bytes(q4) == pytest.approx(3.790e9, rel=1e-3)


def test_migration_ships_the_formats_bytes():
    from testbed.core.placement import uniform_layer, Placement
    from testbed.core.snapshot import ClusterSnapshot, DeviceState, LinkState

    d = dims_of("llama-3.2-1b", "q4_0")
    devs = tuple(DeviceState(n, 8 << 30, 0, 1e10, n == "a") for n in ("a", "b", "c"))
    paths = {(x, y): LinkState(1e8, 1e-3) for x in "abc" for y in "abc" if x != y}
    snap = ClusterSnapshot(devs, paths, 64, 8, allow_blocks_on_source=True)
    old = Placement("a", tuple(uniform_layer("b", d.n_kv_heads, d.ffn_dim) for _ in range(d.n_layers)))
    layers = list(old.layers)
    layers[0] = replace(layers[0], heads=("c",) + layers[0].heads[1:])
    est = migration_estimate(old, Placement("a", tuple(layers)), snap, d, 64)
    assert est.bytes_moved == B.head_weight_bytes(d) + B.head_kv_bytes(d, 64)
    assert B.head_weight_bytes(d) == 6 * 2048 * 64 * 18 // 32  # q=4 query heads + K + V, Q4_0


# ---------------------------------------------------------------- the roofline

def test_roofline_takes_the_binding_term_plus_the_call():
    assert roofline_s(2e9, 1e9, 1e10, 2e9, call_s=1e-3) == pytest.approx(0.5 + 1e-3)  # memory-bound
    assert roofline_s(2e10, 1e9, 1e10, 2e9) == pytest.approx(2.0)  # compute-bound
    assert roofline_s(1.0, 1.0, 0.0, 1.0) == float("inf")  # a down device
    assert matvec_rate(1e11, 1e10, 0.5625) == pytest.approx(2e10 / 0.5625)
    assert matvec_rate(1e9, float("inf"), 4) == 1e9


def test_block_time_of_a_profile_agrees_with_the_agents_clock():
    from node_agent.pacing import DeviceClock

    prof, d = get_profile("rpi5-8gb"), dims_of("llama-2-7b", "q4_0")
    work = B.call_work(d, "ffn", cols=d.ffn_dim)
    t = block_time_s(prof, work, "q4_0")
    clock = DeviceClock(prof.flops_for("q4_0"), prof.mem_bw_bytes_per_s, prof.call_overhead_s)
    assert t == pytest.approx(clock.time_s(*work))
    # one Llama-2-7B FFN on a Pi 5: 270 MFLOP at 30.5 GFLOP/s = 8.9 ms > 76 MB at 11.1 GB/s = 6.9 ms
    assert t == pytest.approx(2 * 3 * 4096 * 11008 / 30.5e9 + 30e-6, rel=1e-6)


def test_decode_cost_is_memory_bound_where_the_bandwidth_binds():
    """Same device, bandwidth cut 10x: the fp32 token time follows bytes / bandwidth."""
    from testbed.core.placement import Placement, uniform_layer
    from testbed.core.snapshot import ClusterSnapshot, DeviceState

    d = dims_of("smollm2-360m")
    pl = Placement("a", tuple(uniform_layer("a", d.n_kv_heads, d.ffn_dim) for _ in range(d.n_layers)))
    fast = ClusterSnapshot((DeviceState("a", 8 << 30, 0, 1e12, True, mem_bw_bytes_per_s=1e10),), {}, 16, 1,
                           allow_blocks_on_source=True)
    slow = replace(fast, devices=(replace(fast.devices[0], mem_bw_bytes_per_s=1e9),))
    t_fast, t_slow = decode_cost(pl, fast, d).token_latency_s, decode_cost(pl, slow, d).token_latency_s
    read = B.total_weight_bytes(d) - B.source_bytes(d) + B.lm_head_read_bytes(d)
    assert t_slow == pytest.approx(10 * t_fast, rel=0.01)
    assert t_slow == pytest.approx(read / 1e9, rel=0.01)  # + KV reads (16 positions) and the LM head


# ---------------------------------------------------------------- profiles

def test_profiles_named_in_the_issue_exist_with_sources():
    for name in ("rpi4-8gb", "rpi4", "rpi5-8gb", "jetson-orin-nano", "phone-sd8g3", "laptop", "rpi5", "jetson-nano"):
        p = get_profile(name)
        assert p.sources and all(p.flops_for(f) > 0 for f in FORMATS) and p.mem_bw_bytes_per_s > 0
    assert get_profile("phone").name == "phone-sd8g3" and get_profile("rpi5-4gb").name == "rpi5"
    assert get_profile("rpi4").mem_limit_mib < get_profile("rpi4-8gb").mem_limit_mib
    assert "calibrated" in get_profile("rpi4-8gb").sources["flops_per_s.q4_0"]
    with pytest.raises(KeyError, match=r"unknown device profile 'vax'.*rpi4-8gb"):
        get_profile("vax")


def test_host_overrides_any_profile_field():
    h = HostSpec(name="h2", profile="rpi4-8gb", flops_per_s={"q4_0": 2e10}, mem_bw_bytes_per_s=4e9,
                 mem_limit_mib=1000)
    dev = host_device(h)
    assert (dev.flops_for("q4_0"), dev.flops_for("fp32"), dev.mem_bw_bytes_per_s) == (2e10, 16e9, 4e9)
    assert h.mem_limit_mib == 1000 and h.cpu_cores == PROFILES["rpi4-8gb"].cpu_cores
    bare = HostSpec(name="h3", mem_limit_mib=512, cpu_cores=1, flops_per_s=5e9)
    assert host_device(bare).flops_for("q8_0") == 5e9 and host_device(bare).mem_bw_bytes_per_s == float("inf")
    assert host_device(HostSpec(name="h4", mem_limit_mib=512, cpu_cores=1)) is None
    with pytest.raises(ValueError, match="flops_per_s: unknown weight format 'q2'"):
        HostSpec(name="h5", profile="rpi5", flops_per_s={"q2": 1e9})


def _topo(hosts):
    links = [{"a": h["name"], "b": "s1", "bandwidth_mbps": 1000, "delay_ms": 0.1} for h in hosts]
    return TopologySpec.model_validate({"name": "t", "hosts": hosts, "switches": ["s1"], "links": links})


def test_simulated_hosts_compute_at_their_devices_roofline():
    topo = _topo([{"name": "h1", "profile": "rpi5-8gb", "source": True},
                  {"name": "h2", "profile": "rpi4-8gb", "cpu_cores": 0.25, "speed": "device"},
                  {"name": "h3", "mem_limit_mib": 512, "cpu_cores": 1},
                  {"name": "h4", "profile": "rpi4-8gb", "cpu_cores": 0.25}])
    assert [h.speed for h in topo.hosts] == ["device", "device", "cores", "cores"]
    cluster = build_simulated_cluster(topo, resolve_model(ModelChoice(name="llama-3.2-1b", weight_format="q4_0")))
    h1, h2, h3, h4 = cluster.snapshot(8, 1).devices
    assert (h1.flops_per_s, h1.mem_bw_bytes_per_s) == (30.5e9, 11.1e9)
    assert h2.flops_per_s == pytest.approx(10.1e9 / 2) and h2.call_overhead_s == pytest.approx(100e-6)  # half its cores
    for h in (h3, h4):  # a share of this machine, FLOPs only (h4: cpu_cores written next to its profile)
        assert h.mem_bw_bytes_per_s == float("inf") and h.flops_per_s == cluster.per_core_flops * (1 if h is h3 else 0.25)
    cluster.set_host_limits("h1", cpu_cores=0.5)  # a scenario halves the Pi 5
    assert cluster.snapshot(8, 1).devices[0].flops_per_s == pytest.approx(30.5e9 / 2)


def test_size_only_names_and_the_weighted_registry():
    from node_agent.model.config import REGISTRY

    assert set(WEIGHTED) == set(REGISTRY)
    assert {"llama-2-7b", "llama-2-13b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-0.5b",
            "smollm2-360m", "smollm2-1.7b"} == set(SIZE_ONLY)
    ref = resolve_model(ModelChoice(name="llama-3.1-8b", weight_format="q8_0"))
    assert (ref.has_weights, ref.dims.n_kv_heads, ref.dims.weight_format) == (False, 8, "q8_0")
    assert ref.to_json()["agents_compute"] == "fp32"


# ---------------------------------------------------------------- runs and bad input

EXP = """\
name: real
topology:
  name: two
  hosts:
    - {{name: h1, profile: {src}, source: true}}
    - {{name: h2, profile: {wrk}}}
  switches: [s1]
  links:
    - {{a: h1, b: s1, bandwidth_mbps: 1000, delay_ms: 0.1}}
    - {{a: h2, b: s1, bandwidth_mbps: 1000, delay_ms: 0.1}}
model: {{name: {model}, weight_format: {fmt}}}
workload: {{prompt_tokens: 4, new_tokens: 4}}
algorithms: [edgeshard, resource_aware]
allow_blocks_on_source: true
backend: {backend}
"""


def _exp(tmp_path, backend="simulated", model="llama-2-7b", fmt="q4_0", src="rpi4-8gb", wrk="rpi4-8gb"):
    p = tmp_path / "exp.yaml"
    p.write_text(EXP.format(backend=backend, model=model, fmt=fmt, src=src, wrk=wrk))
    return p


def test_real_model_runs_simulated_and_records_its_format(tmp_path):
    p = _exp(tmp_path)
    (run_dir,) = run_experiment(load_experiment(p), p, tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["weight_format_simulated"] == "q4_0"
    assert manifest["simulated_devices"]["h2"]["profile"] == "rpi4-8gb"
    assert not summary["edgeshard"]["failed"]
    # two Pi 4s: about the 2-board distributed-llama figure for a layer split's sequential time
    assert 1.0 < summary["edgeshard"]["mean_token_latency_s"] < 1.5


def test_a_model_that_fits_nowhere_is_a_recorded_result(tmp_path):
    p = _exp(tmp_path, src="rpi4", wrk="rpi4")  # 2 GB boards, 3.8 GB of weights
    (run_dir,) = run_experiment(load_experiment(p), p, tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    for algo in ("edgeshard", "resource_aware"):
        assert summary[algo]["failed"] and "MiB" in summary[algo]["failure"], summary[algo]


def test_an_emulated_run_of_a_size_only_model_says_it_needs_weights(tmp_path):
    p = _exp(tmp_path, backend="emulated")
    with pytest.raises(RunError, match="'llama-2-7b' is a published config without weights.*backend: simulated"):
        run_experiment(load_experiment(p), p, tmp_path / "out")


@pytest.mark.parametrize("field,value,message", [
    ("fmt", "q5_k", ":11: model.weight_format: unknown weight format 'q5_k' (known: fp32, fp16, bf16, q8_0, q4_0)"),
    ("model", "llama-9", ":11: model.name: unknown model 'llama-9' (known: tiny-gpt2"),
    ("wrk", "cray-1", ":6: topology.hosts[1]: unknown profile 'cray-1' (known: jetson-nano"),
])
def test_bad_names_exit_2_naming_the_known_ones(tmp_path, field, value, message):
    p = _exp(tmp_path, **{field: value})
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    assert message in res.output and str(p) in res.output and "Traceback" not in res.output, res.output


def test_plan_a_real_model_without_weights(tmp_path):
    res = CliRunner().invoke(app, ["plan", str(_exp(tmp_path)), "-a", "galaxy", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 0.7 < out["predicted_token_latency_s"] < 0.8  # 2 x Pi 4, tensor-parallel: ~755 ms


def test_bench_devices_multi_board_rows_within_goal():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_devices as bd

    for setup in bd.SETUPS:
        for n, pub in setup.published_ms.items():
            if pub is None:
                continue
            sim, _ = bd.simulate(setup, n, delay_ms=0.1, tokens=4)
            assert abs(sim / pub - 1) <= 0.15, (setup.title, n, sim, pub)


def test_emulated_run_refuses_a_non_fp32_format(tmp_path):
    """Agents hold fp32 weights: an emulated run in q4_0 would be planned 7x smaller than charged."""
    from testbed.run.runner import RunError, make_cluster
    from testbed.spec.loader import load_experiment

    (tmp_path / "exp.yaml").write_text(
        "name: q4\ntopology: " + str(Path(__file__).resolve().parents[2] / "topologies/star3.yaml") + "\n"
        "model: {name: mini-gpt2, weight_format: q4_0}\nalgorithms: [edgeshard]\nbackend: emulated\n")
    spec = load_experiment(tmp_path / "exp.yaml")
    with pytest.raises(RunError, match=r"weight_format q4_0 runs with backend: simulated only.*7\.1x"):
        make_cluster(spec, resolve_model(spec.model), tmp_path / "run", "emulated", None)
