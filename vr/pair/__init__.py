"""A redundant router pair: keepalived VRRP per guest network, passwords synced to the peer."""
