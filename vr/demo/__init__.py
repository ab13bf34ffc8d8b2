"""The demo sandbox: network namespaces with a VR, guests and a management host."""
