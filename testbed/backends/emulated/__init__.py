"""The emulated backend: node-agent processes in Mininet hosts under cgroup limits, driven over the
control protocol (``agents``), warmed up and measured (``warmup``)."""
