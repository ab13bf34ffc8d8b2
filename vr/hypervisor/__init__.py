"""``vr hypervisor``: the metadata path on every hypervisor, through Open vSwitch.

``flows`` (the OpenFlow rules as data and their diff), ``ports`` (the bridge's VM
ports and the port table file), ``ovs`` (the only module running OVS's tools),
``controller`` (follows OVSDB, keeps the flows) and ``services`` (the router's
metadata and password applications fed by the port-based identity).
"""
