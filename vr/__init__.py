"""vr: a CloudStack-compatible virtual router metadata appliance."""

__version__ = "0.1.0"
