"""SystemVM boot: CloudStack's boot arguments -> interfaces, key, ``vr.json``.

:mod:`.cmdline` parses the arguments into a typed configuration, :mod:`.plan` decides
what to change (both pure), :mod:`.apply` waits for the arguments and carries the plan
out; ``vr boot`` (:mod:`vr.cmd.boot`) runs it from ``vr-boot.service`` before ``vr up``.
"""
