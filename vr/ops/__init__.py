"""Operating the router: Prometheus metrics, health, live reconfiguration and the
read-only diagnostics the SSH agent runs.

``metrics`` (the counters every service writes and their exposition), ``health``
(ready / degraded / down, pure), ``reconfig`` (what an edit of ``vr.json`` restarts,
pure, and the watchdog thread that notices it), ``diagnostics`` (the allowlist of
read-only commands, pure) and ``server`` (the HTTP endpoint on the control network).
"""
