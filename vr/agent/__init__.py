"""The SSH push agent: what the management server talks to on TCP 3922.

A long-running paramiko server that accepts exactly what CloudStack sends: files
copied into ``/var/cache/cloud`` (legacy SCP sink or SFTP) and the commands
``update_config.py <file> [false]`` and ``vr_cfg.sh -c <cfg>``, which run the store's
apply code in-process. Everything else is refused.

Modules: :mod:`.requests` (pure: what a request means), :mod:`.keys` (host keys,
authorized keys), :mod:`.limits` (limits, failed-auth throttle), :mod:`.scp` and
:mod:`.sftp` (uploads confined to the cache folder), :mod:`.server` (one SSH
connection), :mod:`.daemon` (listening socket, signals).
"""
