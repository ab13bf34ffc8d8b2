"""The password service: CloudStack's ``DomU_Request`` protocol on port 8080."""
