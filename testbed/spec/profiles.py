"""Device profiles: real edge devices as decode sees them, each figure next to where it comes from.

A profile carries what one decode block costs on the device (``testbed.partition.cost.roofline``):

- ``flops_per_s``: sustained matmul rate of the whole device (all cores), PER WEIGHT FORMAT: a
  Q4_0 matmul on a Cortex-A72 spends its time unpacking nibbles, so its rate is not the fp32 one;
- ``mem_bw_bytes_per_s``: sustained streaming memory bandwidth (bytes read per second);
- ``call_overhead_s``: fixed cost of one block call (thread wake-up and join, small ops);
- ``mem_limit_mib``: RAM an inference process can use (board RAM minus OS);
- ``cpu_cores``: the share of one core *of this machine* an emulated host gets (the emulated
  backend cannot make a core slower, only give a share of one) — not a property of the device;
- ``sources``: the public measurement behind each figure, or ``estimate:`` when there is none.

``calibrated`` figures were solved from a published single-device token time (the model's FLOPs
and bytes under this roofline): ``bench/bench_devices.py`` prints the derivation; multi-device
figures of the same sources are the test, never the calibration.

A host says ``profile: NAME`` and may override any field (``resolve``). With ``speed: device``
(the default for a profiled host that does not write its own ``cpu_cores``) the simulated backend
times it by the device's roofline, scaled by ``cpu_cores / profile.cpu_cores`` when a scenario
event changes ``cpu_cores``; with ``speed: cores`` (a ``cpu_cores`` written next to the profile,
as every topology did before profiles had rates) by ``cpu_cores`` x this machine's per-core FLOP/s.
Old names stay valid (``ALIASES``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from testbed.core.formats import FORMATS, get_format

G = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    mem_limit_mib: float
    cpu_cores: float
    flops_per_s: dict[str, float]  # weight format -> sustained FLOP/s of the device
    mem_bw_bytes_per_s: float
    call_overhead_s: float
    sources: dict[str, str] = field(default_factory=dict)  # figure -> citation (URL) or "estimate: ..."

    def flops_for(self, weight_format: str) -> float:
        """The matmul rate for ``weight_format`` (an unknown format raises naming the known ones)."""
        get_format(weight_format)
        return self.flops_per_s[weight_format]

    def with_overrides(self, **fields) -> "DeviceProfile":
        """This profile with some fields replaced; ``flops_per_s`` may be one number (every format)
        or a mapping of some formats (the others kept)."""
        rate = fields.pop("flops_per_s", None)
        out = replace(self, **{k: v for k, v in fields.items() if v is not None})
        if rate is None:
            return out
        rates = {f: float(rate) for f in FORMATS} if isinstance(rate, (int, float)) else {**out.flops_per_s, **rate}
        return replace(out, flops_per_s=rates)


DLLAMA = "https://github.com/b4rtaz/distributed-llama (README, 'Average Single Token Generation Time', 16 samples)"
DLLAMA_PI5 = "https://github.com/b4rtaz/distributed-llama/issues/8 (1 x RPi 5 8 GB, Llama-2-7B Q40: mean of the 16 tokens shown 436.25 ms)"
STREAM_PI4 = "https://www.sci-pi.org.uk/bench/stream.html (STREAM on a Pi 4: Copy 5527 MB/s, Scale 5562 MB/s)"
TMB_PI5 = ("https://github.com/raspberrypi/firmware/issues/1876 (tinymembench, 8 GB Pi 5: C copy 5557 MB/s "
           "copied = 11.1 GB/s read + written)")
HPL_PI4 = "https://feiereisen.net/?page_id=924 (HPL on a Pi 4, 64-bit OS: ~8 GFLOP/s fp64)"
HPL_PI5 = "https://github.com/geerlingguy/sbc-reviews/issues/21 (HPL on a Pi 5: 36.7 GFLOP/s fp64)"
ORIN_MEMCPY = "https://github.com/ggml-org/whisper.cpp/issues/89 (Jetson Orin Nano: memcpy 6.26 GB/s, 1 thread)"
TMAC_8G3 = ("https://github.com/microsoft/T-MAC/issues/32 (Snapdragon 8 Gen 3, llama-2-7b 4-bit, 4 threads: "
            "6.61 tokens/s measured by the reporter)")
SLAREN_13900K = ("https://github.com/ggml-org/llama.cpp/issues/34 (i9-13900K + DDR5-6400, 7B, 8 threads: "
                 "54.74 ms/token)")


def _rates(fp32: float, fp16: float, q8: float, q4: float) -> dict[str, float]:
    return {"fp32": fp32, "fp16": fp16, "bf16": fp16, "q8_0": q8, "q4_0": q4}


# Raspberry Pi 4B (4x Cortex-A72 @ 1.5 GHz, LPDDR4-3200): Q4_0 rate calibrated on distributed-llama's
# single-board Llama-2-7B Q40 figure (1312.50 ms; bandwidth alone would allow 0.69 s: compute-bound)
_PI4_RATES = _rates(16 * G, 8 * G, 11 * G, 10.1 * G)
_PI4_SOURCES = {"flops_per_s.q4_0": f"calibrated: {DLLAMA}, 1 x RasPi 4B 8 GB, Llama 2 7B: 1312.50 ms",
                "flops_per_s.fp32": f"estimate: 2x fp64 HPL ({HPL_PI4})",
                "flops_per_s.fp16/bf16/q8_0": "estimate: A72 has no fp16 arithmetic or int8 dot product",
                "mem_bw_bytes_per_s": STREAM_PI4,
                "call_overhead_s": "estimate: 4-thread wake-up and join per call",
                "mem_limit_mib": "board RAM minus ~0.5 GiB for Raspberry Pi OS Lite"}
# Raspberry Pi 5 (4x Cortex-A76 @ 2.4 GHz, LPDDR4X-4267): Q4_0 rate calibrated on one Pi 5's
# Llama-2-7B Q40 tokens in distributed-llama issue #8 (mean of the 16 shown: 436.25 ms)
_PI5_RATES = _rates(70 * G, 35 * G, 33 * G, 30.5 * G)
_PI5_SOURCES = {"flops_per_s.q4_0": f"calibrated: {DLLAMA_PI5}",
                "flops_per_s.fp32": f"estimate: 2x fp64 HPL ({HPL_PI5})",
                "flops_per_s.fp16/bf16/q8_0": "estimate: A76 has fp16 arithmetic and sdot",
                "mem_bw_bytes_per_s": TMB_PI5,
                "call_overhead_s": "estimate: 4-thread wake-up and join per call",
                "mem_limit_mib": "board RAM minus ~0.5 GiB for Raspberry Pi OS Lite"}

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("rpi4-8gb", "Raspberry Pi 4B 8 GB, 4x Cortex-A72 @1.5 GHz", 7680, 0.5,
                  _PI4_RATES, 5.5 * G, 50e-6, _PI4_SOURCES),
    DeviceProfile("rpi4", "Raspberry Pi 4B 2 GB, 4x Cortex-A72 @1.5 GHz", 1536, 0.5,
                  _PI4_RATES, 5.5 * G, 50e-6, _PI4_SOURCES),
    DeviceProfile("rpi5-8gb", "Raspberry Pi 5 8 GB, 4x Cortex-A76 @2.4 GHz", 7680, 1.0,
                  _PI5_RATES, 11.1 * G, 30e-6, _PI5_SOURCES),
    DeviceProfile("rpi5", "Raspberry Pi 5 4 GB, 4x Cortex-A76 @2.4 GHz", 3072, 1.0,
                  _PI5_RATES, 11.1 * G, 30e-6, _PI5_SOURCES),
    DeviceProfile("jetson-nano", "Jetson Nano 4 GB (CPU), 4x Cortex-A57 @1.43 GHz", 3072, 0.75,
                  _rates(10 * G, 5 * G, 6 * G, 5 * G), 4.0 * G, 60e-6,
                  {"*": "estimate: A57 at ~0.6x an A72 clock for clock; LPDDR4 25.6 GB/s peak, ~4 GB/s sustained"}),
    DeviceProfile("jetson-orin-nano", "Jetson Orin Nano 8 GB (CPU), 6x Cortex-A78AE @1.5 GHz", 6144, 1.5,
                  _rates(60 * G, 30 * G, 30 * G, 27 * G), 15.0 * G, 30e-6,
                  {"mem_bw_bytes_per_s": f"estimate: ~2.5x one thread's memcpy ({ORIN_MEMCPY}) on 6 cores; "
                                         "68 GB/s LPDDR5 peak",
                   "flops_per_s": "estimate: A78 ~1.1x an A76 clock for clock, 6 cores @1.5 GHz vs 4 @2.4 GHz"}),
    DeviceProfile("phone-sd8g3", "phone, Snapdragon 8 Gen 3 (1x X4, 5x A720, 2x A520), 12 GB", 6144, 1.5,
                  _rates(120 * G, 90 * G, 90 * G, 87 * G), 40.0 * G, 40e-6,
                  {"flops_per_s.q4_0": f"calibrated: {TMAC_8G3} (a LUT 4-bit kernel, not llama.cpp's Q4_0)",
                   "mem_bw_bytes_per_s": "estimate: LPDDR5X-4800 76.8 GB/s peak, ~50 % sustained by the CPU",
                   "mem_limit_mib": "estimate: what Android leaves one app of 12 GB"}),
    DeviceProfile("laptop", "x86 laptop/desktop class CPU, 16 GB (figures of an i9-13900K, an upper bound)",
                  8192, 2.0, _rates(400 * G, 150 * G, 300 * G, 300 * G), 70.0 * G, 10e-6,
                  {"mem_bw_bytes_per_s": f"calibrated: {SLAREN_13900K} (memory-bound: 3.8 GB / 54.7 ms = 70 GB/s; "
                                         "DDR5-6400 dual channel peaks at 102 GB/s)",
                   "flops_per_s.q4_0": "estimate: above the 241 GFLOP/s that keeps that token memory-bound",
                   "flops_per_s.fp32/fp16/q8_0": "estimate: AVX2, 8 P-cores"}),
)}

ALIASES: dict[str, str] = {"rpi5-4gb": "rpi5", "rpi4-2gb": "rpi4", "phone": "phone-sd8g3"}


def known_profiles() -> list[str]:
    return sorted([*PROFILES, *ALIASES])


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name`` (or an alias of it); an unknown name raises naming the known ones."""
    try:
        return PROFILES[ALIASES.get(name, name)]
    except KeyError:
        raise KeyError(f"unknown device profile {name!r} (known: {', '.join(known_profiles())})") from None


RATE_FIELDS = ("flops_per_s", "mem_bw_bytes_per_s", "call_overhead_s")


def resolve(host: dict) -> dict:
    """A host mapping with ``profile`` gets the profile's limits where it does not set its own."""
    if not host.get("profile"):
        return dict(host)
    p = get_profile(host["profile"])
    out = dict(host)
    out.setdefault("mem_limit_mib", p.mem_limit_mib)
    out.setdefault("cpu_cores", p.cpu_cores)
    return out


def host_device(host) -> DeviceProfile | None:
    """The device a host spec stands for: its profile with the host's rate overrides, or a profile
    built from the rate fields alone; None for a host timed as a share of this machine's cores
    (``speed: cores``, the default when ``cpu_cores`` is written next to a profile)."""
    if getattr(host, "speed", "device") == "cores":
        return None
    over = {k: getattr(host, k, None) for k in RATE_FIELDS}
    if getattr(host, "profile", None):
        base = get_profile(host.profile)
    elif over["flops_per_s"] is not None:
        base = DeviceProfile(host.name, "rates given on the host", host.mem_limit_mib, host.cpu_cores,
                             {f: 0.0 for f in FORMATS}, float("inf"), 0.0, {"*": "the host spec"})
    else:
        return None
    return base.with_overrides(**over)
