"""The 4-host star the simulated-runner tests share (not a test module)."""

TOPO = """\
name: t4
hosts:
  - {name: h1, mem_limit_mib: 64, cpu_cores: 1, source: true}
  - {name: h2, mem_limit_mib: 16, cpu_cores: 0.5}
  - {name: h3, mem_limit_mib: 16, cpu_cores: 0.5}
  - {name: h4, mem_limit_mib: 16, cpu_cores: 0.25}
switches: [s1]
links:
  - {a: h1, b: s1, bandwidth_mbps: 50, delay_ms: 1}
  - {a: h2, b: s1, bandwidth_mbps: 20, delay_ms: 2}
  - {a: h3, b: s1, bandwidth_mbps: 20, delay_ms: 2}
  - {a: h4, b: s1, bandwidth_mbps: 10, delay_ms: 5}
"""
