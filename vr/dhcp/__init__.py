"""Guest DHCP, DNS and router advertisements by dnsmasq, configured from the pushes.

:mod:`vr.dhcp.model` renders dnsmasq's files from the config, the guest networks and
the DHCP entries (pure); :mod:`vr.dhcp.state` writes them and tells the running
service (the push hook); :mod:`vr.dhcp.service` runs dnsmasq under ``vr up``.
"""
